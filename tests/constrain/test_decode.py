"""Constrained decoding through the model (random weights: a model that writes garbage): the tokens transformers
chooses under the same constraint, every answer valid where unconstrained ones are not, seeded sampling, the CLI."""
import json

import numpy as np
import pytest
import torch

from knowlm import KnowLMForCausalLM
from knowlm.checkpoints.convert import convert_checkpoint
from knowlm.constrain.constraint import Constraint, vocabulary_of
from knowlm.constrain.decode import Picker
from knowlm.constrain.formats import answer_grammar
from knowlm.generate import encode_prompts, generate, text_generator
from knowlm.ie.extract import extract
from knowlm.ie.parse import parse
from knowlm.ie.prompts import build_prompts
from knowlm.models import decoding
from knowlm.models.load import load_model
from knowlm.models.llama import padding_id
from knowlm.tokenizer.load import load_tokenizer
from reference import fails_with_one_line, hf_dir, hf_llama, needs_smollm2

RECORDS = [{"id": "en-1", "text": "Lin Zhiyuan was born in Baishi City."},
           {"id": "zh-1", "text": "石桥是南溪国的首都。"},
           {"id": "en-2", "text": "Stone Bridge is the capital of Nanxi, where Lin Zhiyuan studied."},
           {"id": "zh-2", "text": "林知远出生于白石城。"}]
SCHEMA = {"en": ["place of birth", "capital"], "zh": ["出生地", "首都"]}
NER_SCHEMA = {"en": ["person", "city"], "zh": ["人物", "城市"]}
INSTRUCTION = "Extract (head, relation, tail) triples of the relations capital, place of birth."
NEW_TOKENS = 24


@pytest.fixture(scope="module")
def long_dir(tmp_path_factory):
    """Random weights at 512 positions: room for OneKE's prompts in the builtin 1000-piece tokenizer."""
    root = tmp_path_factory.mktemp("long")
    return convert_checkpoint(hf_dir(root, hf_llama(seed=1, max_position_embeddings=512)), root / "model").output


@pytest.fixture(scope="module")
def loaded(model_dir):
    return KnowLMForCausalLM.from_pretrained(model_dir, use_past=True), load_tokenizer(model_dir)


def grammars_for(language_texts):
    return [answer_grammar("re", "tuple", language, SCHEMA[language], text) for language, text in language_texts]


def transformers_constrained(hf_model, ids, constraint, new_tokens, eos):
    """The reference: transformers' logits of the whole sequence at each step (no cache), the same mask, argmax."""
    ids, out = list(ids), []
    for step in range(new_tokens):
        with torch.no_grad():
            logits = hf_model(torch.tensor([ids])).logits[0, -1].numpy()
        allowed = constraint.allowed(new_tokens - step)
        token = int(allowed[np.argmax(logits[allowed])])
        out.append(token)
        if token in eos:
            break
        constraint.advance(token)
        ids.append(token)
    return out


def constrained_tokens(model, tokenizer, encoded, grammars, picker=None):
    """knowlm's tokens for each row of one batch, constrained greedy decoding with the KV cache and the kernels."""
    vocabulary = vocabulary_of(tokenizer, [model.config.eos_token_id])
    pad = padding_id(encoded, tokenizer.pad_token_id)
    width = max(map(len, encoded))
    outputs = model.generate([ids + [pad] * (width - len(ids)) for ids in encoded], pad_token_id=pad,
                             max_new_tokens=NEW_TOKENS, pick=picker or Picker(grammars, vocabulary, encoded))
    return [list(out[len(ids):]) for ids, out in zip(encoded, outputs)], vocabulary


class Counted(Picker):
    """A Picker that counts what the steps kernel's guesses came to."""
    accepted = refused = 0

    def accepts(self, row, token, remaining):
        taken = super().accepts(row, token, remaining)
        self.accepted, self.refused = self.accepted + taken, self.refused + (not taken)
        return taken


def test_the_steps_kernel_running_ahead_gives_the_tokens_of_one_step_per_call(loaded, monkeypatch):
    model, tokenizer = loaded
    monkeypatch.setattr(decoding, "AGREED", 0)          # guess ahead after every step: many guesses refused
    cases = [("en", RECORDS[2]["text"]), ("zh", RECORDS[3]["text"]), ("en", RECORDS[0]["text"])]
    encoded = encode_prompts(tokenizer, [INSTRUCTION + "\n" + text for _, text in cases], chat="alpaca")
    vocabulary = vocabulary_of(tokenizer, [model.config.eos_token_id])
    one_step = Picker(grammars_for(cases), vocabulary, encoded)
    one_step.speculative = False
    ahead = Counted(grammars_for(cases), vocabulary, encoded)
    expected, _ = constrained_tokens(model, tokenizer, encoded, None, one_step)
    assert constrained_tokens(model, tokenizer, encoded, None, ahead)[0] == expected
    assert ahead.refused > 0          # random weights: the argmax is seldom allowed (accepted guesses: below)
    single = Counted(grammars_for(cases[:1]), vocabulary, encoded[:1])
    assert constrained_tokens(model, tokenizer, encoded[:1], None, single)[0] == expected[:1]


def test_greedy_constrained_tokens_equal_transformers_under_the_same_constraint(hf_model, loaded):
    model, tokenizer = loaded
    cases = [("en", RECORDS[0]["text"]), ("zh", RECORDS[1]["text"]), ("en", RECORDS[2]["text"])]
    encoded = encode_prompts(tokenizer, [INSTRUCTION + "\n" + text for _, text in cases], chat="alpaca")
    assert len({len(ids) for ids in encoded}) == 3           # rows of different lengths in one batch
    tokens, vocabulary = constrained_tokens(model, tokenizer, encoded, grammars_for(cases))
    for ids, out, grammar in zip(encoded, tokens, grammars_for(cases)):
        expected = transformers_constrained(hf_model, ids, Constraint(grammar, vocabulary), NEW_TOKENS,
                                            [model.config.eos_token_id])
        assert out == expected
        answer = tokenizer.decode(expected, skip_special_tokens=True)
        assert parse("re", answer).errors == 0, answer


@needs_smollm2
def test_real_model_constrained_greedy_equals_transformers_in_its_chat_template(smollm2_reference):
    """SmolLM2 in its ChatML template (a system turn ending in <|im_end|>, its pad id, before the prompt)."""
    hf_model, _ = smollm2_reference
    model, tokenizer = load_model("smollm2", use_past=True, seq_length=512, batch_size=2)
    cases = [("en", RECORDS[2]["text"]), ("zh", RECORDS[1]["text"])]
    prompts = [build_prompts("re", text, SCHEMA[language], "knowlm", language, 1)[0] for language, text in cases]
    encoded = encode_prompts(tokenizer, [prompt.instruction + "\n" + prompt.input for prompt in prompts], chat="model")
    assert all(2 in ids[:-1] for ids in encoded)
    vocabulary = vocabulary_of(tokenizer, [model.config.eos_token_id])
    ahead = Counted(grammars_for(cases), vocabulary, encoded)
    tokens, _ = constrained_tokens(model, tokenizer, encoded, None, ahead)
    for ids, out, grammar in zip(encoded, tokens, grammars_for(cases)):
        assert out == transformers_constrained(hf_model, ids, Constraint(grammar, vocabulary), NEW_TOKENS,
                                               [model.config.eos_token_id])
    assert ahead.accepted > 0         # the steps kernel ran ahead where the model kept to the format


def extract_all(generate_fn, task, schema, constrained, family="knowlm"):
    return list(extract(RECORDS, task, schema, generate_fn, family=family, template=1, batch_size=4,
                        constrained=constrained))


@pytest.mark.parametrize("task, schema, family", [("re", SCHEMA, "knowlm"), ("ner", NER_SCHEMA, "knowlm"),
                                                  ("re", SCHEMA, "oneke")])
def test_random_weights_answer_only_valid_tuples_constrained_and_mostly_garbage_unconstrained(long_dir, task, schema,
                                                                                                family):
    generate_fn = text_generator(str(long_dir), 4, max_new_tokens=64)
    constrained = extract_all(generate_fn, task, schema, True, family)
    free = extract_all(generate_fn, task, schema, False, family)
    outputs = sum(len(result["outputs"]) for result in constrained)
    assert sum(result["unparsable"] for result in constrained) == 0
    assert sum(result["run_on"] for result in constrained) == 0
    key, name = ("relation", "relation") if task == "re" else ("entity", "entity_type")
    found = 0
    for record, result in zip(RECORDS, constrained):
        language = "zh" if record["id"].startswith("zh") else "en"
        for item in result[key]:
            found += 1
            assert item[name] in schema[language]
            spans = [item["head"], item["tail"]] if task == "re" else [item["entity"]]
            assert all(span in record["text"] for span in spans), item
    assert found > 0
    # Unconstrained, the same model writes mostly what cannot be read.
    assert sum(result["unparsable"] for result in free) > outputs // 2, [r["outputs"] for r in free]


def test_seeded_sampling_repeats_and_a_prompt_gets_the_same_answer_alone_or_in_a_batch(loaded):
    model, tokenizer = loaded
    cases = [("en", RECORDS[2]["text"]), ("zh", RECORDS[3]["text"])]
    prompts = [INSTRUCTION + "\n" + text for _, text in cases]
    options = dict(max_new_tokens=NEW_TOKENS, do_sample=True, top_k=0, temperature=1.5)
    options = dict(options, chat="alpaca")
    first = generate(model, tokenizer, prompts, grammars=grammars_for(cases), seed=7, **options)
    again = generate(model, tokenizer, prompts, grammars=grammars_for(cases), seed=7, **options)
    alone = generate(model, tokenizer, prompts[1:], grammars=grammars_for(cases[1:]), seed=7, **options)
    others = [generate(model, tokenizer, prompts, grammars=grammars_for(cases), seed=seed, **options)
              for seed in (8, 9)]
    assert first == again and alone == first[1:]
    assert any(other != first for other in others)
    assert all(parse("re", answer).errors == 0 for answer in first + [a for other in others for a in other])


def test_extract_constrained_on_the_command_line_and_its_refusals(model_dir, tmp_path, capsys):
    from knowlm.cli import main
    inputs = tmp_path / "in.jsonl"
    inputs.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in RECORDS), encoding="utf-8")
    schema = tmp_path / "schema.json"
    schema.write_text(json.dumps(SCHEMA, ensure_ascii=False), encoding="utf-8")
    output = tmp_path / "out.jsonl"
    common = ["extract", "--model", str(model_dir), "--schema", str(schema), "--input", str(inputs), "--template",
              "1", "--max-new-tokens", str(NEW_TOKENS)]
    assert main([*common, "--output", str(output), "--constrained", "--do-sample", "--seed", "3"]) == 0
    results = [json.loads(line) for line in output.read_text(encoding="utf-8").splitlines()]
    assert [r["id"] for r in results] == [r["id"] for r in RECORDS] and all(r["unparsable"] == 0 for r in results)
    capsys.readouterr()
    events = tmp_path / "events.json"
    events.write_text(json.dumps([{"event_type": "born", "arguments": ["person"]}]), encoding="utf-8")
    fails_with_one_line([*common[:4], str(events), *common[5:], "--output", tmp_path / "ee.jsonl", "--task", "ee",
                         "--constrained"], capsys, "--constrained: task 'ee' is not supported")
    fails_with_one_line([*common, "--output", tmp_path / "list.jsonl", "--format", "json_list", "--constrained"],
                        capsys, "--constrained: answer format 'json_list' is not supported")
    assert not (tmp_path / "ee.jsonl").exists() and not (tmp_path / "list.jsonl").exists()
