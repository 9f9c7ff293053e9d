"""EasyEdit's scores (``knowlm.edit.evaluate``) on the real model (SmolLM2-135M-Instruct) and the shipped edit set
(``knowlm/assets/edit/smollm2_facts.json``): the same token accuracies as EasyEdit's own ``test_prediction_acc``
computed with transformers on the same weights, and facts the model demonstrably knows before any edit."""
import json

import numpy as np
import pytest
import torch

from knowlm import KnowLMForCausalLM
from knowlm.checkpoints.model_dir import load_config
from knowlm.cli import main
from knowlm.edit.cli import EDIT_SET
from knowlm.edit.evaluate import TeacherForcing, accuracy, score_requests
from knowlm.edit.requests import read_requests
from knowlm.models.packaged import packaged_model_dir
from knowlm.tokenizer.load import load_tokenizer
from reference import needs_smollm2

pytestmark = needs_smollm2


@pytest.fixture(scope="module")
def scorer():
    folder = packaged_model_dir("smollm2")
    model = KnowLMForCausalLM.from_pretrained(folder, use_past=False, seq_length=64)
    return model, load_tokenizer(folder, load_config(folder))


def easyedit_prediction_acc(model, tok, prompt, target):
    """EasyEdit's ``test_prediction_acc`` for one prompt (evaluate_utils.py, non-vanilla path, batch of one: no
    padding): ``prompt + ' ' + target`` tokenized together, predictions from the prompt's last token on. ``tok``:
    knowlm's tokenizer, so that both sides score the same ids (transformers' GGUF tokenizer adds a BOS that the
    model's tokenizer.json does not)."""
    prompt_target = torch.tensor([tok(prompt + " " + target)["input_ids"]])
    num_prompt_toks = len(tok(prompt)["input_ids"])
    with torch.no_grad():
        answers = model(prompt_target).logits.argmax(-1)[0].tolist()
    labels = prompt_target[0].tolist()
    answers, labels = answers[num_prompt_toks - 1:-1], labels[num_prompt_toks:]
    return float(np.mean(np.equal(answers, labels)))


def pairs(requests):
    for request in requests:
        yield request.prompt, request.target_new
        yield request.prompt, request.ground_truth
        yield from ((prompt, request.target_new) for prompt in request.rephrase_prompts)
        yield from request.locality
        yield from request.portability


def test_token_accuracies_equal_easyedit_test_prediction_acc_on_transformers(scorer, smollm2_reference):
    hf = smollm2_reference[0]
    teacher = TeacherForcing(*scorer)
    checked = list(pairs(read_requests(EDIT_SET)))
    assert len(checked) == 12 * 5
    for (prompt, answer), predicted in zip(checked, teacher.predict_all(checked)):
        assert accuracy(*predicted) == easyedit_prediction_acc(hf, scorer[1], prompt, answer), (prompt, answer)


def test_the_shipped_facts_are_known_before_any_edit_and_the_new_targets_are_not(scorer):
    scores = score_requests(*scorer, read_requests(EDIT_SET), base=scorer[0])
    assert scores["summary"]["knows"] == 100.0              # every old fact, every token, under teacher forcing
    assert scores["summary"]["reliability"] < 20.0          # the counterfactual targets are not what it says
    assert scores["summary"]["locality"] == 100.0           # the model against itself


def test_cli_edit_eval_prints_the_table_and_writes_the_scores(tmp_path, capsys):
    """The verb on the tiny random model (fast to build): the table, the JSON, no locality without --base."""
    requests = tmp_path / "two.json"
    requests.write_text(json.dumps(json.loads(EDIT_SET.read_text(encoding="utf-8"))[:2]), encoding="utf-8")
    assert main(["edit-eval", "--model", "tiny", "--requests", str(requests), "--seq-length", "64",
                 "--output", str(tmp_path / "scores.json")]) == 0
    out = capsys.readouterr().out
    assert "reliability" in out and "knows" in out and "locality" not in out
    scores = json.loads((tmp_path / "scores.json").read_text())
    assert len(scores["requests"]) == 2 and set(scores["summary"]) == {"reliability", "generalization",
                                                                       "portability", "knows"}
