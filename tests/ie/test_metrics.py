"""Scores computed by hand with IEPile's rules (ie2instruction/eval_func.py and its metric classes)."""
from knowlm.ie.metrics import prf, score

A, B, C = ("a", "r1", "b"), ("c", "r2", "d"), ("g", "r3", "h")


def _examples():
    return [
        # partial match, a repeated prediction and a wrong tail: gold 2, predicted 3, correct 1
        {"gold": [A, B], "predicted": [A, A, ("c", "r2", "x")], "group": "NYT11"},
        {"gold": [], "predicted": [("e", "r1", "f")], "group": "NYT11"},      # empty gold: 0, 1, 0
        {"gold": [C], "predicted": [], "unparsable": 1, "group": "GIDS"},   # empty predictions: 1, 0, 0
    ]


def test_normal_mode_counts_a_repeated_prediction_as_wrong():
    total = score(_examples(), "re")["total"]
    # gold 3, predicted 4, correct 1: P = 25.0, R = 33.33, F1 = round(2 * 25 * 33.33 / 58.33, 2)
    assert total["triple"] == {"gold": 3, "predicted": 4, "correct": 1, "precision": 25.0, "recall": 33.33,
                               "f1": 28.57}
    assert (total["records"], total["unparsable"], total["missing"]) == (3, 1, 0)


def test_set_mode_collapses_duplicates_first():
    total = score(_examples(), "re", match_mode="set")["total"]
    assert total["triple"] == {"gold": 3, "predicted": 3, "correct": 1, "precision": 33.33, "recall": 33.33,
                               "f1": 33.33}


def test_each_gold_tuple_is_matched_at_most_once():
    total = score([{"gold": [A, A], "predicted": [A, A, A]}], "re")["total"]["triple"]
    assert (total["gold"], total["predicted"], total["correct"]) == (2, 3, 2)


def test_per_source_breakdown_sorted_by_name_next_to_the_total():
    groups = score(_examples(), "re")["groups"]
    assert list(groups) == ["GIDS", "NYT11"]
    assert groups["GIDS"]["triple"] == {"gold": 1, "predicted": 0, "correct": 0, "precision": 0.0, "recall": 0.0,
                                        "f1": 0.0}
    assert groups["GIDS"]["unparsable"] == 1
    assert groups["NYT11"]["triple"] == {"gold": 2, "predicted": 4, "correct": 1, "precision": 25.0, "recall": 50.0,
                                         "f1": 33.33}
    assert groups["NYT11"]["records"] == 2


def test_f1_is_computed_from_rounded_precision_and_recall():
    # 1 correct of 1 predicted and 6 gold: exact F1 is 28.57, IEPile's rounded P = 100.0 and R = 16.67 give 28.58.
    assert prf(1, 1, 6) == {"precision": 100.0, "recall": 16.67, "f1": 28.58}


def test_nothing_predicted_or_nothing_to_find_scores_zero_not_an_error():
    assert prf(0, 0, 5) == prf(0, 3, 0) == prf(0, 0, 0) == {"precision": 0.0, "recall": 0.0, "f1": 0.0}


def test_entities_match_on_text_and_type_exactly():
    result = score([{"gold": [("林知远", "人物"), ("Yunzhou", "city")],
                     "predicted": [("林知远", "人物"), ("yunzhou", "city"), ("林知远", "地点")]}], "ner")["total"]
    assert result["entity"] == {"gold": 2, "predicted": 3, "correct": 1, "precision": 33.33, "recall": 50.0,
                                "f1": 40.0}


def test_events_score_triggers_and_arguments_separately():
    gold = [("出生事件", "出生", (("林知远", "人物"), ("白石城", "地点")))]
    predicted = [("出生事件", "出生", (("林知远", "人物"), ("云州", "地点"))), ("毕业事件", "毕业", ())]
    result = score([{"gold": gold, "predicted": predicted}], "ee")["total"]
    assert result["trigger"] == {"gold": 1, "predicted": 2, "correct": 1, "precision": 50.0, "recall": 100.0,
                                 "f1": 66.67}
    assert result["argument"] == {"gold": 2, "predicted": 2, "correct": 1, "precision": 50.0, "recall": 50.0,
                                  "f1": 50.0}
