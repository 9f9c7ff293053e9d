"""The quickstart on the real model: refusals before any work, and its report. (The whole run takes minutes: the
README gives its measured result; the stages it chains are each tested in their own package.)"""
import pytest

from knowlm.errors import KnowLMError
from knowlm.quickstart import QuickstartResult, quickstart, report


@pytest.mark.parametrize("steps", [0, -3, 2.5, True])
def test_quickstart_refuses_a_bad_step_count_before_writing_anything(tmp_path, steps):
    with pytest.raises(KnowLMError, match="expected a positive number of fine-tuning steps"):
        quickstart(workdir=tmp_path / "run", steps=steps)
    assert not (tmp_path / "run").exists()


def test_quickstart_refuses_a_folder_that_is_not_empty(tmp_path):
    (tmp_path / "notes.txt").write_text("mine")
    with pytest.raises(KnowLMError, match="not empty"):
        quickstart(workdir=tmp_path)
    assert [p.name for p in tmp_path.iterdir()] == ["notes.txt"]


def _scores(f1, by_language):
    def result(value):
        return {"triple": {"precision": value, "recall": value, "f1": value, "gold": 4, "predicted": 4,
                           "correct": 2}, "unparsable": 1}
    return {"total": result(f1), "groups": {language: result(value) for language, value in by_language.items()}}


def test_report_shows_before_and_after_per_language_with_the_loss_and_examples(tmp_path):
    result = QuickstartResult(_scores(0.0, {"en": 0.0, "zh": 0.0}), _scores(50.0, {"en": 70.0, "zh": 30.0}),
                              [("石桥是南溪国的首都。", [{"head": "南溪国", "relation": "首都", "tail": "石桥"}], [])],
                              [1.5, 0.1], tmp_path / "gone", 412.0)
    text = report(result)
    assert "before          0.00" in text and "after          50.00" in text
    assert "  en           70.00" in text and "  zh           30.00" in text
    assert "fine-tuning loss: 1.500 (step 1) -> 0.100 (step 2)" in text
    assert "gold:      (南溪国, 首都, 石桥)" in text and "predicted: -" in text
    assert text.endswith("quickstart: smollm2 triple F1 0.00 (zero-shot) -> 50.00 (LoRA) in 412s")
