"""Micro precision / recall / F1 over exact tuples, by the rules of IEPile's ``ie2instruction/eval_func.py``.

- Exact string match, no lower-casing. RE scores ``(head, relation, tail)``, NER ``(entity, type)``; EE scores
  triggers ``(event_type, trigger)`` and arguments ``(event_type, argument, role)`` separately (IEPile's EEMetric).
- ``normal`` match mode: multisets, each gold tuple matched at most once, so a repeated prediction is a wrong
  one. ``set``: duplicates collapse on both sides first (the KnowLM-era evaluator's default).
- Counts are summed over all records (micro average); P = correct / predicted and R = correct / gold, in percent
  rounded to 2 decimals, then F1 = round(2PR / (P + R), 2) from the rounded P and R; 0 where a divisor is 0.
"""
from collections import Counter

LEVELS = {"re": ("triple",), "ner": ("entity",), "ee": ("trigger", "argument")}
MATCH_MODES = ("normal", "set")


def units(task, records):
    """level -> the tuples scored at that level."""
    if task != "ee":
        return {LEVELS[task][0]: [tuple(r) for r in records]}
    return {"trigger": [(kind, trigger) for kind, trigger, _ in records],
            "argument": [(kind, argument, role) for kind, _, arguments in records for argument, role in arguments]}


def match(gold, predicted, match_mode="normal"):
    """``(gold, predicted, correct)`` counts for one record's tuples."""
    if match_mode == "set":
        gold, predicted = set(gold), set(predicted)
    return len(gold), len(predicted), sum((Counter(gold) & Counter(predicted)).values())


def prf(correct, predicted, gold):
    precision = round(correct / predicted * 100, 2) if predicted else 0.0
    recall = round(correct / gold * 100, 2) if gold else 0.0
    f1 = round(2 * precision * recall / (precision + recall), 2) if precision + recall else 0.0
    return {"precision": precision, "recall": recall, "f1": f1}


class Tally:
    """Counts over a group of records: all of them, or those of one source."""

    def __init__(self, task, match_mode="normal"):
        self.task, self.match_mode = task, match_mode
        self.records = self.unparsable = self.run_on = self.missing = 0
        self.counts = {level: [0, 0, 0] for level in LEVELS[task]}  # gold, predicted, correct

    def add(self, gold, predicted, unparsable=0, missing=False, run_on=0):
        """One record: its gold and predicted tuples, how many of its outputs were unparsable, whether the
        predictions lacked it altogether, how many of its outputs went on after their answer."""
        self.records += 1
        self.unparsable += unparsable
        self.run_on += run_on
        self.missing += missing
        predicted_units = units(self.task, predicted)
        for level, gold_units in units(self.task, gold).items():
            for i, n in enumerate(match(gold_units, predicted_units[level], self.match_mode)):
                self.counts[level][i] += n

    def result(self):
        out = {"records": self.records, "unparsable": self.unparsable, "run_on": self.run_on, "missing": self.missing}
        for level, (gold, predicted, correct) in self.counts.items():
            out[level] = {"gold": gold, "predicted": predicted, "correct": correct, **prf(correct, predicted, gold)}
        return out


def score(examples, task, match_mode="normal"):
    """Scores for ``examples``: dicts with ``gold`` and ``predicted`` tuples, and optionally ``unparsable``,
    ``run_on``, ``missing`` and ``group`` (a source name).

    Returns ``{"total": result, "groups": {group: result}}`` (groups sorted by name, empty when none is named);
    a result holds the record, unparsable, run-on and missing counts and, per level, gold / predicted / correct with
    precision / recall / f1.
    """
    total, groups = Tally(task, match_mode), {}
    for example in examples:
        tallies = [total]
        if example.get("group") is not None:
            tallies.append(groups.setdefault(example["group"], Tally(task, match_mode)))
        for tally in tallies:
            tally.add(example["gold"], example["predicted"], example.get("unparsable", 0),
                      example.get("missing", False), example.get("run_on", 0))
    return {"total": total.result(), "groups": {name: groups[name].result() for name in sorted(groups)}}
