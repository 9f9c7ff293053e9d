"""``knowlm evaluate``: score a predictions file against a gold file, IEPile-style (``knowlm.ie.metrics``).

Gold lines are records ``{id, [source], relation|entity|event: [...]}`` (InstructIE) or IEPile test lines whose
``label`` holds that list as a JSON string; a record repeated once per split prompt is read once. Prediction
lines carry the same ``id`` (and ``source``) and either parsed answers under the task's key (what
``knowlm extract`` writes, with its ``unparsable`` count) or a raw model ``output``, parsed here. Several lines
with one id are the answers to one record's split prompts and are merged, as IEPile regroups by source + id.
A gold record without predictions scores as predicting nothing and is counted as missing.
"""
import json

from knowlm.errors import KnowLMError
from knowlm.ie.files import read_jsonl, record_key
from knowlm.ie.formats import FORMATS
from knowlm.ie.metrics import LEVELS, MATCH_MODES, score
from knowlm.ie.parse import parse, run_on
from knowlm.ie.records import RECORD_KEYS, check_task, to_tuples


def evaluate(pred_path, gold_path, task="re", by=None, match_mode="normal", fmt="oneke"):
    """Scores of ``pred_path`` against ``gold_path``; ``by`` names a gold field (``source``) to score per value
    of, ``fmt`` the answer format of raw ``output`` predictions."""
    check_task(task)
    if match_mode not in MATCH_MODES:
        raise KnowLMError(f"unknown match mode {match_mode!r}; expected one of {', '.join(MATCH_MODES)}")
    if fmt not in FORMATS[task]:
        raise KnowLMError(f"unknown {task} answer format {fmt!r}; expected one of {', '.join(FORMATS[task])}")
    gold = read_gold(gold_path, task, by)
    predictions = read_predictions(pred_path, task, gold, gold_path, fmt)
    examples = []
    for key, (tuples, group) in gold.items():
        predicted, unparsable, run_on_count = predictions.get(key, ([], 0, 0))
        examples.append({"gold": tuples, "predicted": predicted, "unparsable": unparsable, "run_on": run_on_count,
                         "missing": key not in predictions, "group": group})
    return {"task": task, "match_mode": match_mode, "by": by, **score(examples, task, match_mode)}


def read_gold(path, task, by=None):
    """``(source, id) -> (tuples, group)``; group is the record's ``by`` field (IEPile: "None" when absent)."""
    gold = {}
    for number, record in read_jsonl(path, "gold records"):
        where = f"{path}:{number}"
        key = record_key(record, where)
        if key not in gold:
            group = str(record.get(by, "None")) if by else None
            gold[key] = (to_tuples(task, _gold_answers(task, record, where), where), group)
    if by and gold and all(group == "None" for _, group in gold.values()):
        raise KnowLMError(f"--by {by}: no record of {path} has a {by!r} field; expected a field of the gold records")
    return gold


def _gold_answers(task, record, where):
    name = RECORD_KEYS[task]
    if name in record:
        return record[name]
    label = record.get("label")
    if isinstance(label, str):
        try:
            return json.loads(label)
        except json.JSONDecodeError as err:
            raise KnowLMError(f"{where}: 'label' is not a JSON list ({err.msg})") from None
    if label is not None:
        return label
    raise KnowLMError(f"{where}: expected a '{name}' list (or IEPile's 'label') in the gold record")


def read_predictions(path, task, gold, gold_path, fmt):
    """``(source, id) -> (tuples, unparsable outputs, run-on outputs)``, merged over the lines of each id."""
    predictions = {}
    name = RECORD_KEYS[task]
    for number, record in read_jsonl(path, "predictions"):
        where = f"{path}:{number}"
        key = record_key(record, where)
        if key not in gold:
            source = f" (source {key[0]!r})" if key[0] else ""
            raise KnowLMError(f"{where}: id {key[1]!r}{source} is not in the gold file {gold_path}")
        if name in record:
            tuples = to_tuples(task, record[name], where)
            unparsable, going_on = record.get("unparsable", 0), record.get("run_on", 0)
            for field, value in (("unparsable", unparsable), ("run_on", going_on)):
                if isinstance(value, bool) or not isinstance(value, int):
                    raise KnowLMError(f"{where}: {field!r} must be a count, got {json.dumps(value)}")
        elif isinstance(record.get("output"), str):
            parsed = parse(task, record["output"], fmt)
            tuples, unparsable = parsed.records, int(parsed.errors > 0)
            going_on = int(run_on(task, record["output"], fmt))
        else:
            raise KnowLMError(f"{where}: expected a '{name}' list or a model 'output' string")
        merged, count, runs = predictions.get(key, ([], 0, 0))
        predictions[key] = (merged + tuples, count + unparsable, runs + going_on)
    return predictions


def format_table(scores):
    """The scores as an aligned text table: one row per group (total first) and scored level."""
    header = ("group", "level", "records", "unparsable", "run-on", "missing", "gold", "predicted", "correct", "P", "R",
              "F1")
    rows = [header]
    for group, result in [("total", scores["total"]), *scores["groups"].items()]:
        for level in LEVELS[scores["task"]]:
            counts = result[level]
            rows.append((group, level, result["records"], result["unparsable"], result["run_on"], result["missing"],
                         counts["gold"], counts["predicted"], counts["correct"], f"{counts['precision']:.2f}",
                         f"{counts['recall']:.2f}", f"{counts['f1']:.2f}"))
    widths = [max(len(str(row[i])) for row in rows) for i in range(len(header))]
    return "\n".join("  ".join(str(cell).ljust(w) if i < 2 else str(cell).rjust(w)
                               for i, (cell, w) in enumerate(zip(row, widths))) for row in rows)
