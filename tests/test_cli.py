"""The knowlm command line: output equals the library's, errors are one line with exit status 2."""
import pytest

from knowlm import KnowLMForCausalLM, KnowLMTokenizer
from knowlm.cli import main
from knowlm.generate import generate


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


@pytest.mark.parametrize("argv, message", [
    (["generate", "--model", "missing-model", "x"], "knowlm: error: model 'missing-model': not a model directory"),
    (["generate", "--model", "tiny", "--do-sample", "--temperature", "0", "x"], "knowlm: error: temperature 0.0"),
])
def test_bad_input_gives_one_line_error(argv, message, capsys):
    assert main(argv) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1].startswith(message)


def test_prompt_longer_than_seq_length_is_one_line_error(model_dir, capsys):
    assert main(["generate", "--model", str(model_dir), "知识 " * 300]) == 2
    assert "the model's seq_length is 256" in capsys.readouterr().err
