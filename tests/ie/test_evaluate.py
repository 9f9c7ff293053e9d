"""``knowlm evaluate``: files in either convention, split prompts regrouped, one-line errors with file and line."""
import json
import re

import pytest

from knowlm.cli import main
from knowlm.errors import KnowLMError
from knowlm.ie.evaluate import evaluate


def _write(path, rows):
    path.write_text("".join(json.dumps(row, ensure_ascii=False) + "\n" for row in rows), encoding="utf-8")
    return path


def _gold(tmp_path):
    return _write(tmp_path / "gold.jsonl", [
        {"id": "1", "source": "NYT11", "text": "…", "relation": [
            {"head": "林知远", "relation": "出生地", "tail": "白石城"}, {"head": "林知远", "relation": "国籍", "tail": "青岚国"}]},
        {"id": "2", "source": "GIDS", "text": "…", "relation": [
            {"subject": "Lin Zhiyuan", "relation": "place of birth", "object": "Baishi City"}]},
        {"id": "3", "source": "GIDS", "text": "…", "relation": []},
    ])


def test_split_prompt_outputs_of_one_record_are_merged_by_source_and_id(tmp_path):
    # Record 1 was asked in two prompts (IEPile's split schema): each answered part of its triples.
    pred = _write(tmp_path / "pred.jsonl", [
        {"id": "1", "source": "NYT11", "output": '{"出生地": [{"subject": "林知远", "object": "白石城"}], "位于": []}'},
        {"id": "1", "source": "NYT11", "output": '{"国籍": [{"subject": "林知远", "object": "青岚国"}]}'},
        {"id": "2", "source": "GIDS",
         "output": '{"place of birth": [{"subject": "Lin Zhiyuan", "object": "Yunzhou"}]}'},
        {"id": "3", "source": "GIDS", "output": "not json"},
    ])
    scores = evaluate(pred, _gold(tmp_path), by="source")
    assert scores["total"]["triple"] == {"gold": 3, "predicted": 3, "correct": 2, "precision": 66.67,
                                         "recall": 66.67, "f1": 66.67}
    assert scores["total"]["unparsable"] == 1
    assert scores["groups"]["NYT11"]["triple"]["f1"] == 100.0
    assert scores["groups"]["GIDS"]["triple"] == {"gold": 1, "predicted": 1, "correct": 0, "precision": 0.0,
                                                  "recall": 0.0, "f1": 0.0}
    assert scores["groups"]["GIDS"]["unparsable"] == 1


def test_extract_output_is_scored_from_its_parsed_answers(tmp_path):
    pred = _write(tmp_path / "pred.jsonl", [
        {"id": "1", "source": "NYT11", "relation": [{"head": "林知远", "relation": "出生地", "tail": "白石城"}],
         "unparsable": 1},
        {"id": "2", "source": "GIDS", "relation": [{"head": "Lin Zhiyuan", "relation": "place of birth",
                                                    "tail": "Baishi City"}], "unparsable": 0},
    ])
    total = evaluate(pred, _gold(tmp_path))["total"]
    assert total["triple"] == {"gold": 3, "predicted": 2, "correct": 2, "precision": 100.0, "recall": 66.67,
                               "f1": 80.0}
    assert (total["records"], total["unparsable"], total["missing"]) == (3, 1, 1)  # record 3 has no prediction


def test_iepile_test_file_scores_like_its_eval_func(tmp_path):
    # IEPile's eval_func.py reads one file: a line per split prompt, the gold list as a JSON string in 'label'.
    label = json.dumps([{"head": "A", "relation": "r1", "tail": "B"}, {"head": "C", "relation": "r2", "tail": "D"}])
    lines = _write(tmp_path / "iepile.jsonl", [
        {"id": "x", "source": "kbp37", "instruction": "{}", "label": label,
         "output": '{"r1": [{"subject": "A", "object": "B"}, {"subject": "A", "object": "B"}]}'},
        {"id": "x", "source": "kbp37", "instruction": "{}", "label": label, "output": '{"r2": []}'},
    ])
    # gold 2, predicted 2 (the repeat counts), correct 1 in normal mode; the repeat collapses in set mode
    assert evaluate(lines, lines)["total"]["triple"] == {"gold": 2, "predicted": 2, "correct": 1,
                                                         "precision": 50.0, "recall": 50.0, "f1": 50.0}
    assert evaluate(lines, lines, match_mode="set")["total"]["triple"]["precision"] == 100.0


def test_raw_knowlm_outputs_are_read_in_the_named_format(tmp_path):
    pred = _write(tmp_path / "pred.jsonl", [{"id": "1", "source": "NYT11", "output": "(林知远,出生地,白石城)"}])
    assert evaluate(pred, _gold(tmp_path), fmt="tuple")["total"]["triple"]["correct"] == 1


def test_cli_prints_a_table_and_writes_json(tmp_path, capsys):
    pred = _write(tmp_path / "pred.jsonl", [{"id": "3", "source": "GIDS", "relation": []}])
    out = tmp_path / "scores.json"
    assert main(["evaluate", "--pred", str(pred), "--gold", str(_gold(tmp_path)), "--by", "source",
                 "--output", str(out)]) == 0
    table = capsys.readouterr().out.splitlines()
    assert table[0].split() == ["group", "level", "records", "unparsable", "run-on", "missing", "gold", "predicted",
                                "correct", "P", "R", "F1"]
    assert [row.split()[0] for row in table[1:]] == ["total", "GIDS", "NYT11"]
    assert json.loads(out.read_text(encoding="utf-8"))["total"]["missing"] == 2


def test_existing_scores_are_kept_without_force_and_no_input_is_overwritten(tmp_path, capsys):
    pred, gold = _write(tmp_path / "pred.jsonl", [{"id": "3", "source": "GIDS", "relation": []}]), _gold(tmp_path)
    out = tmp_path / "scores.json"
    out.write_text("{}", encoding="utf-8")
    for target in (out, pred, gold):
        before = target.read_bytes()
        assert main(["evaluate", "--pred", str(pred), "--gold", str(gold), "--output", str(target)]) == 2
        err = capsys.readouterr().err
        assert err.count("\n") == 1 and str(target) in err and target.read_bytes() == before
    assert main(["evaluate", "--pred", str(pred), "--gold", str(gold), "--output", str(out), "--force"]) == 0
    assert json.loads(out.read_text(encoding="utf-8"))["total"]["records"] == 3


def test_by_a_field_no_gold_record_has_is_refused(tmp_path, capsys):
    pred = _write(tmp_path / "pred.jsonl", [{"id": "3", "source": "GIDS", "relation": []}])
    assert main(["evaluate", "--pred", str(pred), "--gold", str(_gold(tmp_path)), "--by", "domain"]) == 2
    assert capsys.readouterr().err == f"knowlm: error: --by domain: no record of {tmp_path / 'gold.jsonl'} has a " \
                                      "'domain' field; expected a field of the gold records\n"


@pytest.mark.parametrize("pred_lines, message", [
    (['{"id": "1", "source": "NYT11", "relation": []}', '{"id": "9", "source": "NYT11", "relation": []}'],
     "pred.jsonl:2: id '9' (source 'NYT11') is not in the gold file"),
    (['{"id": "1", "source": "NYT11", "relation": []}', '{"id": "2", "source": "GIDS", "relation": [}'],
     "pred.jsonl:2: invalid JSON"),
    (['{"source": "NYT11", "relation": []}'], "pred.jsonl:1: expected an 'id'"),
    (['{"id": "1", "source": "NYT11", "relation": [{"head": "A"}]}'], "pred.jsonl:1: relation item"),
    (['{"id": "1", "source": "NYT11"}'], "pred.jsonl:1: expected a 'relation' list or a model 'output'"),
])
def test_bad_prediction_line_is_a_one_line_error_naming_file_and_line(tmp_path, pred_lines, message):
    pred = tmp_path / "pred.jsonl"
    pred.write_text("\n".join(pred_lines) + "\n", encoding="utf-8")
    with pytest.raises(KnowLMError, match=re.escape(message)):
        evaluate(pred, _gold(tmp_path))


def test_bad_input_through_the_cli_is_one_line_and_exit_status_2(tmp_path, capsys):
    assert main(["evaluate", "--pred", str(tmp_path / "none.jsonl"), "--gold", str(_gold(tmp_path))]) == 2
    assert capsys.readouterr().err.strip().splitlines()[-1].startswith("knowlm: error: ")
    assert main(["evaluate", "--pred", str(_gold(tmp_path)), "--gold", str(_gold(tmp_path)), "--task", "qa"]) == 2
    assert "unknown task 'qa'; expected one of re, ner, ee" in capsys.readouterr().err


def test_gold_without_answers_names_its_line(tmp_path):
    gold = _write(tmp_path / "gold.jsonl", [{"id": "1", "text": "…", "relation": []}, {"id": "2", "text": "…"}])
    with pytest.raises(KnowLMError, match=r"gold.jsonl:2: expected a 'relation' list"):
        evaluate(gold, gold)
