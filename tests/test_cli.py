"""The knowlm command line: output equals the library's, errors are one line with exit status 2."""
import json
import os
from pathlib import Path

import pytest

from knowlm import KnowLMForCausalLM, KnowLMTokenizer
from knowlm.cli import main
from knowlm.generate import generate
from reference import fails_with_one_line


def test_generate_prints_prompt_and_continuation_equal_to_library(model_dir, capsys):
    prompts = ["知识图谱由实体组成", "Paris is"]
    expected = generate(KnowLMForCausalLM.from_pretrained(model_dir, use_past=True, batch_size=2),
                        KnowLMTokenizer(vocab_file=str(model_dir)), prompts, max_new_tokens=6)
    assert main(["generate", "--model", str(model_dir), "--max-new-tokens", "6", *prompts]) == 0
    assert capsys.readouterr().out.splitlines() == [p + t for p, t in zip(prompts, expected)]


def test_generate_with_seed_is_reproducible(model_dir, capsys):
    args = ["generate", "--model", str(model_dir), "--do-sample", "--top-k", "20", "--top-p", "0.9",
            "--temperature", "1.2", "--repetition-penalty", "1.3", "--seed", "11", "--max-new-tokens", "8", "你好"]
    main(args)
    first = capsys.readouterr().out
    main(args)
    assert capsys.readouterr().out == first


@pytest.mark.parametrize("flag, value, expected", [
    ("--max-new-tokens", "0", "an integer >= 1"), ("--max-new-tokens", "-3", "an integer >= 1"),
    ("--top-k", "-5", "an integer >= 0"), ("--top-p", "1.5", "a number in (0, 1]"), ("--top-p", "0", "(0, 1]"),
    ("--temperature", "0", "a number > 0"), ("--temperature", "-1", "a number > 0"),
    ("--repetition-penalty", "0", "a number > 0"), ("--seed", "-1", "an integer in [0, 2**32)"),
])
def test_every_generation_flag_out_of_range_is_refused_by_name_before_loading(flag, value, expected, capsys):
    # "no-such-model": the flag is refused before the model is even looked for.
    fails_with_one_line(["generate", "--model", "no-such-model", "--do-sample", flag, value, "x"], capsys,
                        f"{flag} {value if flag != '--top-p' else float(value)}", expected)


def test_unknown_model_is_one_line(capsys):
    fails_with_one_line(["generate", "--model", "missing-model", "x"], capsys,
                        "model 'missing-model': not a model directory")


def test_prompt_plus_new_tokens_past_the_context_is_refused_not_capped(model_dir, capsys):
    fails_with_one_line(["generate", "--model", model_dir, "知识 " * 300], capsys, "passes the model's seq_length 256")
    # Fits alone, not with the tokens asked for: refused too, with the largest value that fits.
    fails_with_one_line(["generate", "--model", model_dir, "--max-new-tokens", "250", "知识图谱由实体组成"], capsys,
                        "--max-new-tokens 250", "lower --max-new-tokens to at most")


def test_generating_exactly_up_to_the_context_is_allowed(model_dir, capsys):
    from knowlm import KnowLMTokenizer
    length = len(KnowLMTokenizer(vocab_file=str(model_dir))("知识图谱")["input_ids"])
    assert main(["generate", "--model", str(model_dir), "--max-new-tokens", str(256 - length), "知识图谱"]) == 0


def unwritable(tmp_path):
    """A folder this process cannot write in (as root, chmod does not stop writes: use a read-only system one)."""
    if os.geteuid() != 0:
        tmp_path.chmod(0o555)
        return tmp_path
    for candidate in (Path("/sys/kernel"), Path("/proc/sys")):
        try:
            (candidate / "knowlm-probe").mkdir()
        except OSError:
            return candidate
        (candidate / "knowlm-probe").rmdir()
    pytest.skip("no read-only folder to write into")


INSTRUCTIE = {"id": "1", "text": "林知远出生于白石城。", "relation": [{"head": "林知远", "relation": "出生地", "tail": "白石城"}]}


def test_output_in_a_folder_that_cannot_be_written_is_one_line_naming_it(tmp_path, capsys):
    records = tmp_path / "in.jsonl"
    records.write_text(json.dumps(INSTRUCTIE, ensure_ascii=False) + "\n", encoding="utf-8")
    target = unwritable(tmp_path / "ro") if os.geteuid() != 0 else unwritable(tmp_path)
    fails_with_one_line(["kg2instruct", "--input", records, "--output", target / "out.jsonl"], capsys, str(target))


@pytest.mark.parametrize("verb", ["kg2instruct", "prepare-data", "extract", "finetune"])
def test_input_that_is_not_utf8_is_one_line_naming_the_file(verb, model_dir, tmp_path, capsys):
    bad = tmp_path / ("in.yaml" if verb == "finetune" else "in.jsonl")
    bad.write_bytes('{"id": "1", "text": "Zoë was born in Liège.", "relation": []}\n'.encode("latin-1"))
    schema = tmp_path / "schema.json"
    schema.write_text('["出生地"]', encoding="utf-8")
    argv = {"kg2instruct": ["--input", bad, "--output", tmp_path / "out.jsonl"],
            "prepare-data": ["--input", bad, "--output", tmp_path / "out.mindrecord", "--tokenizer", model_dir,
                             "--seq-length", "64"],
            "extract": ["--input", bad, "--output", tmp_path / "out.jsonl", "--model", "tiny", "--schema", schema],
            "finetune": ["--config", bad]}[verb]
    fails_with_one_line([verb, *argv], capsys, str(bad), "not UTF-8")
    assert not list(tmp_path.glob("out*"))


def test_yaml_syntax_error_names_file_line_and_column(tmp_path, capsys):
    config = tmp_path / "run.yaml"
    config.write_text("model:\n  model_config: {type: KnowLMConfig\nseed: 0\n", encoding="utf-8")
    fails_with_one_line(["check-config", config], capsys, f"{config}:", "invalid yaml")
    fails_with_one_line(["generate", "--model", config, "x"], capsys, f"{config}:", "invalid yaml")


def test_debug_shows_the_traceback_of_an_error(capsys):
    from knowlm.errors import KnowLMError
    with pytest.raises(KnowLMError, match="--top-k -5"):
        main(["generate", "--debug", "--top-k", "-5", "x"])
