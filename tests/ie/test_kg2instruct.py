"""kg2instruct: every gold answer parses back to its triples; negatives teach NAN; the shipped data is fresh."""
import json

import pytest

from knowlm.cli import main
from knowlm.train.data import read_instructions as read_training_records
from knowlm.errors import KnowLMError
from knowlm.ie import kg
from knowlm.ie.formats import FORMATS
from knowlm.ie.kg2instruct import kg2instruct, read_instructie
from knowlm.ie.parse import parse
from knowlm.ie.records import to_tuples

RECORDS = read_instructie(kg.TRAIN_RECORDS)


def _expected(sample):
    record = next(r for r in RECORDS if r["id"] == sample["id"])
    return sorted(set(t for t in to_tuples("re", record["relation"], "") if t[1] in sample["schema"]))


@pytest.mark.parametrize("family, fmt", [("knowlm", name) for name in FORMATS["re"] if name != "oneke"]
                         + [("oneke", "oneke")])
def test_every_gold_answer_parses_back_to_its_triples(family, fmt):
    zh_only, en_only = {"relation_first"}, {"square", "brace", "angle"}
    records = [r for r in RECORDS if not (r["lang"] == "en" and fmt in zh_only or r["lang"] == "zh" and fmt in en_only)]
    samples = kg2instruct(records, family=family, fmt=fmt, template="random")
    assert samples
    for sample in samples:
        parsed = parse("re", sample["output"], fmt, sample["schema"])
        assert parsed.errors == 0 and sorted(parsed.records) == _expected(sample), sample


def test_negative_relations_are_asked_and_answered_nan_or_empty():
    knowlm = kg2instruct(RECORDS, family="knowlm")
    oneke = kg2instruct(RECORDS, family="oneke")
    assert sum(s["output"] == "NAN" for s in knowlm) > len(RECORDS) // 2
    assert any(json.loads(s["output"]) and not any(json.loads(s["output"]).values()) for s in oneke)
    # neg_ratio 1 (IEPile's default) asks about every relation of the language, 4 per prompt
    for sample in knowlm:
        assert len(sample["schema"]) == 4


def test_neg_ratio_zero_asks_only_a_records_own_relations():
    for sample in kg2instruct(RECORDS, neg_ratio=0.0):
        assert set(sample["schema"]) == {t[1] for t in _expected(sample)}


def test_same_seed_same_samples_other_seed_other_order():
    assert kg2instruct(RECORDS, seed=3) == kg2instruct(RECORDS, seed=3)
    assert kg2instruct(RECORDS, seed=3) != kg2instruct(RECORDS, seed=4)


def test_language_follows_each_record():
    samples = kg2instruct(RECORDS)
    for sample in samples:
        assert sample["instruction"].startswith("已知候选" if sample["lang"] == "zh" else "Identify the head")


def test_samples_are_what_prepare_data_reads(tmp_path):
    out = tmp_path / "train.jsonl"
    assert main(["kg2instruct", "--input", str(kg.TRAIN_RECORDS), "--output", str(out), "--family", "oneke"]) == 0
    assert len(list(read_training_records(out))) == len(kg2instruct(RECORDS, family="oneke"))


def test_shipped_data_is_what_the_generator_makes(tmp_path):
    kg.build(tmp_path)
    for path in (kg.TRAIN_RECORDS, kg.TRAIN, kg.TEST, kg.SCHEMA):
        assert (tmp_path / path.name).read_bytes() == path.read_bytes(), f"{path.name}: run python -m knowlm.ie.kg"


def test_test_split_entities_appear_nowhere_in_training():
    test = read_instructie(kg.TEST)
    train_text = " ".join(r["text"] for r in RECORDS) + kg.TRAIN.read_text(encoding="utf-8")
    names = {name for record in test for item in record["relation"] for name in (item["head"], item["tail"])}
    assert names and not [name for name in names if name in train_text]
    schema = json.loads(kg.SCHEMA.read_text(encoding="utf-8"))
    for language in ("zh", "en"):
        used = {item["relation"] for r in test if r["lang"] == language for item in r["relation"]}
        assert used == set(schema[language])  # every relation is tested in both languages


def test_mixing_a_held_out_entity_into_a_training_triple_is_refused():
    graph = json.loads(kg.GRAPH.read_text(encoding="utf-8"))
    graph["triples"].append(["lin", "place_of_birth", "shiqiao"])
    with pytest.raises(KnowLMError, match="joins a held-out entity to a training one"):
        kg.split_triples(graph)


@pytest.mark.parametrize("line, message", [
    ('{"id": 1, "text": "x", "relation": [{"head": "a", "relation": "r"}]}', "records.jsonl:2: relation item"),
    ('{"id": 1, "relation": []}', "records.jsonl:2: expected a 'text' string"),
    ('{"id": 1, "text": "x", "relation": []', "records.jsonl:2: invalid JSON"),
])
def test_bad_input_record_is_one_line_naming_file_and_line(tmp_path, capsys, line, message):
    records = tmp_path / "records.jsonl"
    records.write_text('{"id": 0, "text": "a b", "relation": [{"head": "a", "relation": "r", "tail": "b"}]}\n'
                       + line + "\n", encoding="utf-8")
    assert main(["kg2instruct", "--input", str(records), "--output", str(tmp_path / "out.jsonl")]) == 2
    assert message in capsys.readouterr().err


def test_cli_rejects_a_bad_ratio_and_a_missing_schema(tmp_path, capsys):
    out = str(tmp_path / "out.jsonl")
    assert main(["kg2instruct", "--input", str(kg.TRAIN_RECORDS), "--output", out, "--neg-ratio", "2"]) == 2
    assert "negative ratio 2.0" in capsys.readouterr().err
    assert main(["kg2instruct", "--input", str(kg.TRAIN_RECORDS), "--output", out, "--schema", "none.json"]) == 2
    assert "none.json: not found; expected a schema file" in capsys.readouterr().err



def test_existing_output_is_kept_without_force_and_the_input_is_never_the_output(tmp_path, capsys):
    out = tmp_path / "out.jsonl"
    out.write_text("keep me\n", encoding="utf-8")
    records = tmp_path / "records.jsonl"
    records.write_bytes(kg.TRAIN_RECORDS.read_bytes())
    for target in (out, records):
        before = target.read_bytes()
        assert main(["kg2instruct", "--input", str(records), "--output", str(target), "--force"
                     if target == records else "--family=knowlm"]) == 2
        err = capsys.readouterr().err
        assert err.count("\n") == 1 and str(target) in err and target.read_bytes() == before
    assert main(["kg2instruct", "--input", str(records), "--output", str(out), "--force"]) == 0
    assert out.read_text(encoding="utf-8") != "keep me\n"
