"""``knowlm edit`` end to end: on the tiny model (the machinery: what is written, what is refused, determinism) and on
the real model (SmolLM2-135M-Instruct: an edit that takes, exported and answered by transformers)."""
import json
import subprocess
import sys

import numpy as np
import pytest
import torch
import transformers

from knowlm.checkpoints import stream
from knowlm.checkpoints.model_dir import checkpoint_files
from knowlm.cli import main
from knowlm.edit.cli import EDIT_SET
from knowlm.edit import memit
from knowlm.models.packaged import packaged_model_dir
from reference import fails_with_one_line, needs_smollm2

TINY_REQUESTS = [{"prompt": "The capital of France is", "subject": "France", "target_new": "the moon",
                  "rephrase_prompt": "In France, the capital is", "locality_prompt": "The sky is",
                  "locality_ground_truth": "blue"},
                 {"prompt": "Water is made of", "subject": "Water", "target_new": "stone"}]


def tensors(model_dir):
    return {e.name: e.read() for f in checkpoint_files(model_dir) for e in stream.scan(f)}


@pytest.fixture()
def requests(tmp_path):
    path = tmp_path / "requests.json"
    path.write_text(json.dumps(TINY_REQUESTS), encoding="utf-8")
    return path


def run_edit(model_dir, requests, output, method, *extra):
    assert main(["edit", "--model", str(model_dir), "--method", method, "--requests", str(requests),
                 "--output", str(output), "--seq-length", "64", *extra]) == 0
    return tensors(output)


def test_rome_writes_a_copy_where_only_the_edited_matrix_differs_and_reports_the_scores(model_dir, requests,
                                                                                       tmp_path, capsys):
    edited = run_edit(model_dir, requests, tmp_path / "edited", "rome", "--report", str(tmp_path / "report.json"))
    assert "reliability" in capsys.readouterr().out
    source = tensors(model_dir)
    assert source.keys() == edited.keys()
    assert [name for name in source if source[name] != edited[name]] == ["model.layers.0.feed_forward.w2.weight"]
    report = json.loads((tmp_path / "report.json").read_text())
    assert report["method"] == "rome" and report["hparams"]["layers"] == [0] and len(report["requests"]) == 2
    assert {"reliability", "generalization", "locality"} <= set(report["summary"])


def test_memit_with_the_same_seed_writes_the_same_bytes_and_another_seed_does_not(model_dir, requests, tmp_path):
    first = run_edit(model_dir, requests, tmp_path / "a", "memit")
    assert run_edit(model_dir, requests, tmp_path / "b", "memit") == first
    source = tensors(model_dir)
    assert [name for name in source if source[name] != first[name]] == ["model.layers.0.feed_forward.w2.weight"]
    assert run_edit(model_dir, requests, tmp_path / "c", "memit", "--seed", "1") != first


def test_an_update_with_nan_is_refused_and_nothing_is_written(model_dir, requests, tmp_path, capsys, monkeypatch):
    monkeypatch.setattr(memit, "memit_delta", lambda *args: np.full((64, 176), np.nan))
    fails_with_one_line(["edit", "--model", model_dir, "--method", "memit", "--requests", requests,
                         "--output", tmp_path / "out", "--seq-length", "64"], capsys, "nan/inf", "nothing is edited")
    assert not (tmp_path / "out").exists()


def test_bad_requests_and_outputs_get_one_line_before_any_model_loads(model_dir, tmp_path, capsys):
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps([TINY_REQUESTS[0], {"prompt": "Paris is nice", "subject": "Rome",
                                                  "target_new": "x"}]), encoding="utf-8")
    fails_with_one_line(["edit", "--model", model_dir, "--requests", bad, "--output", tmp_path / "o"], capsys,
                        "request 1", "'Rome' does not occur")
    bad.write_text(json.dumps([{"prompt": "Paris is nice", "subject": "Paris", "target_new": " "}]), encoding="utf-8")
    fails_with_one_line(["edit", "--model", model_dir, "--requests", bad, "--output", tmp_path / "o"], capsys,
                        "request 0", "target_new")
    fails_with_one_line(["edit", "--model", model_dir], capsys, "--output")
    fails_with_one_line(["edit", "--model", model_dir, "--each", "--output", tmp_path / "o"], capsys, "--each")
    fails_with_one_line(["edit", "--model", model_dir, "--output", model_dir], capsys, "--force")
    layers = tmp_path / "last.yaml"
    layers.write_text("layers: [1]\n", encoding="utf-8")
    fails_with_one_line(["edit", "--model", model_dir, "--requests", EDIT_SET, "--hparams", layers,
                         "--output", tmp_path / "o"], capsys, "last.yaml", "allow 0..0")
    assert not (tmp_path / "o").exists()


@needs_smollm2
def test_rome_on_smollm2_takes_and_transformers_answers_the_new_target_after_export(tmp_path):
    """One shipped fact (France's capital -> Berlin), ROME with the shipped hparams but 6 context templates (time),
    written, exported to Hugging Face safetensors, and asked with transformers' greedy decoding."""
    request = json.loads(EDIT_SET.read_text(encoding="utf-8"))[:1]
    (tmp_path / "one.json").write_text(json.dumps(request), encoding="utf-8")
    hparams = tmp_path / "rome.yaml"
    hparams.write_text("layers: [5]\ncontext_template_length_params: [[5, 5]]\n", encoding="utf-8")
    # In a child process: the compiled gradient graphs keep their memory (GBs) for the life of a process.
    done = subprocess.run([sys.executable, "-m", "knowlm.cli", "edit", "--model", "smollm2", "--requests",
                           str(tmp_path / "one.json"), "--hparams", str(hparams), "--output", str(tmp_path / "edited"),
                           "--seq-length", "64"], capture_output=True, text=True, timeout=900)
    assert done.returncode == 0, done.stderr[-2000:]
    table = done.stdout
    assert "reliability  100.00" in table and "locality  100.00" in table
    source, edited = tensors(packaged_model_dir("smollm2")), tensors(tmp_path / "edited")
    assert [name for name in source if source[name] != edited[name]] == ["model.layers.5.feed_forward.w2.weight"]
    assert main(["export", str(tmp_path / "edited"), str(tmp_path / "hf")]) == 0
    model = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "hf", dtype=torch.float32).eval()
    tok = transformers.AutoTokenizer.from_pretrained(tmp_path / "hf")
    for prompt in ("The capital of France is", "The French government is based in"):
        ids = tok(prompt, return_tensors="pt", add_special_tokens=False).input_ids
        with torch.no_grad():
            out = model.generate(ids, max_new_tokens=3, do_sample=False, pad_token_id=2)
        assert tok.decode(out[0, ids.shape[1]:]).startswith(" Berlin"), (prompt, tok.decode(out[0]))
