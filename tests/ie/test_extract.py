"""``knowlm extract``: batched prompts, answers merged per record, written as it goes, resumable, checked input."""
import json

import pytest

from knowlm.cli import main
from knowlm.errors import KnowLMError
from knowlm.ie.extract import extract, extract_file

SCHEMA = {"zh": ["出生地", "国籍", "首都", "位于", "作者", "创始人"], "en": ["place of birth", "nationality"]}
RECORDS = [{"id": "a", "text": "林知远出生于白石城，是青岚国人。"},
           {"id": "b", "source": "web", "text": "Lin Zhiyuan was born in Baishi City."},
           {"id": "c", "text": "云州是青岚国的首都。"}]


class FakeModel:
    """Answers each prompt from the facts it names; records the batch sizes it was called with."""

    def __init__(self, fail_after=None):
        self.batches, self.fail_after = [], fail_after

    def __call__(self, prompts):
        if self.fail_after is not None and len(self.batches) == self.fail_after:
            raise RuntimeError("the machine went away")
        self.batches.append(len(prompts))
        return [self._answer(prompt) for prompt in prompts]

    @staticmethod
    def _answer(prompt):
        facts = [("出生地", "(林知远,出生地,白石城)"), ("国籍", "(林知远，国籍，青岚国)"), ("首都", "(青岚国,首都,云州)"),
                 ("place of birth", "(Lin Zhiyuan, place of birth, Baishi City)")]
        text = prompt.split("### Input:")[1]
        found = [answer for relation, answer in facts if f"'{relation}'" in prompt
                 and all(name.strip() in text for name in answer[1:-1].replace("，", ",").split(",")[::2])]
        # Models run on past their answer: what follows the next turn marker is not part of it.
        return (",".join(found) or "NAN") + "\n\n### Instruction:\n(x,出生地,y)"


def _write(path, rows):
    path.write_text("".join(json.dumps(row, ensure_ascii=False) + "\n" for row in rows), encoding="utf-8")
    return path


def _files(tmp_path, records=RECORDS):
    schema = tmp_path / "schema.json"
    schema.write_text(json.dumps(SCHEMA, ensure_ascii=False), encoding="utf-8")
    return _write(tmp_path / "texts.jsonl", records), schema, tmp_path / "preds.jsonl"


def _read(path):
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines()]


def test_split_schema_answers_are_merged_into_one_line_per_record_in_order():
    model = FakeModel()
    results = list(extract(RECORDS, "re", SCHEMA, model, batch_size=3))
    assert [r["id"] for r in results] == ["a", "b", "c"]
    # zh asks 6 relations as 4 + 2 (two prompts), en asks 2 (one prompt): 5 prompts in batches of 3
    assert model.batches == [3, 2]
    assert results[0]["relation"] == [{"head": "林知远", "relation": "出生地", "tail": "白石城"},
                                      {"head": "林知远", "relation": "国籍", "tail": "青岚国"}]
    assert len(results[0]["outputs"]) == 2 and results[0]["unparsable"] == 0
    assert results[1] == {"id": "b", "source": "web", "text": RECORDS[1]["text"], "relation": [
        {"head": "Lin Zhiyuan", "relation": "place of birth", "tail": "Baishi City"}], "unparsable": 0,
        "run_on": 0, "outputs": ["(Lin Zhiyuan, place of birth, Baishi City)"]}
    assert results[2]["relation"] == [{"head": "青岚国", "relation": "首都", "tail": "云州"}]


def test_oneke_family_asks_in_json_and_reads_json_answers():
    def model(prompts):
        assert all(p.startswith("[INST] <<SYS>>") and '"schema": [' in p for p in prompts)
        return ['{"place of birth": [{"subject": "Lin Zhiyuan", "object": "Baishi City"}], "nationality": []}']
    results = list(extract(RECORDS[1:2], "re", SCHEMA, model, family="oneke"))
    assert results[0]["relation"] == [{"head": "Lin Zhiyuan", "relation": "place of birth", "tail": "Baishi City"}]


def test_lines_written_before_a_crash_survive_and_resume_skips_them(tmp_path):
    texts, schema, preds = _files(tmp_path)
    with pytest.raises(RuntimeError, match="went away"):
        extract_file(FakeModel(fail_after=1), texts, preds, "re", schema, batch_size=2)
    assert [r["id"] for r in _read(preds)] == ["a"]  # a's two prompts were the first batch
    model = FakeModel()
    assert extract_file(model, texts, preds, "re", schema, resume=True, batch_size=2) == (2, 1)
    assert model.batches == [2, 1]  # only b and c were asked
    assert [r["id"] for r in _read(preds)] == ["a", "b", "c"]


def test_resume_drops_a_line_cut_off_mid_write(tmp_path):
    texts, schema, preds = _files(tmp_path)
    extract_file(FakeModel(), texts, preds, "re", schema)
    whole = preds.read_text(encoding="utf-8")
    preds.write_text(whole[:whole.index('{"id": "c"') + 12], encoding="utf-8")
    assert extract_file(FakeModel(), texts, preds, "re", schema, resume=True) == (1, 2)
    assert preds.read_text(encoding="utf-8") == whole


def test_resume_refuses_the_output_of_another_input(tmp_path):
    texts, schema, preds = _files(tmp_path)
    extract_file(FakeModel(), texts, preds, "re", schema)
    before = preds.read_bytes()
    other = _write(tmp_path / "other.jsonl", [{"id": "z", "text": "云州是青岚国的首都。"}])
    with pytest.raises(KnowLMError, match="holds results for ids not in .*other.jsonl .*'a'.*another run's output"):
        extract_file(FakeModel(), other, preds, "re", schema, resume=True)
    assert preds.read_bytes() == before


def test_output_that_is_the_input_is_refused(tmp_path):
    texts, schema, _ = _files(tmp_path)
    before = texts.read_bytes()
    with pytest.raises(KnowLMError, match="is the input file"):
        extract_file(FakeModel(), texts, texts, "re", schema, resume=True)
    assert texts.read_bytes() == before


def test_a_prompt_too_long_for_the_model_names_its_record_and_keeps_what_was_written(tmp_path):
    from knowlm.generate import PromptTooLong
    texts, schema, preds = _files(tmp_path)

    def model(prompts):
        for index, prompt in enumerate(prompts):
            if "云州" in prompt:
                raise PromptTooLong("prompt is 300 tokens", index)
        return FakeModel()(prompts)
    with pytest.raises(KnowLMError, match=r"texts.jsonl:3 \(id 'c'\): prompt is 300 tokens"):
        extract_file(model, texts, preds, "re", schema, batch_size=1)
    assert [r["id"] for r in _read(preds)] == ["a", "b"]


def test_existing_output_is_not_appended_to_without_resume(tmp_path):
    texts, schema, preds = _files(tmp_path)
    preds.write_text("", encoding="utf-8")
    with pytest.raises(KnowLMError, match="already exists; pass --resume"):
        extract_file(FakeModel(), texts, preds, "re", schema)


@pytest.mark.parametrize("argv, message", [
    (["--task", "qa"], "unknown task 'qa'; expected one of re, ner, ee"),
    (["--schema", "missing.json"], "missing.json: not found; expected a schema file"),
    (["--batch-size", "0"], "--batch-size 0: expected an integer >= 1"),
    (["--max-new-tokens", "0"], "--max-new-tokens 0: expected an integer >= 1"),
    (["--repetition-penalty", "0"], "--repetition-penalty 0.0: expected a number > 0"),
    (["--template", "9"], "template 9: the re zh templates are numbered 0 to 3"),
    (["--format", "square"], "answer format 'square'"),
    ([], "model 'no-such-model': not a model directory"),
])
def test_bad_settings_fail_before_the_model_loads_or_the_output_is_created(tmp_path, capsys, argv, message):
    texts, schema, preds = _files(tmp_path)
    assert main(["extract", "--model", "no-such-model", "--input", str(texts), "--output", str(preds),
                 "--schema", str(schema), *argv]) == 2
    assert message in capsys.readouterr().err
    assert not preds.exists()


@pytest.mark.parametrize("lines, message", [
    (['{"id": "a", "text": "x"}', '{"id": "b", "text": "y"'], "texts.jsonl:2: invalid JSON"),
    (['{"id": "a", "text": "x"}', '["b", "y"]'], "texts.jsonl:2: expected a JSON object"),
    (['{"id": "a", "text": "x"}', '{"text": "y"}'], "texts.jsonl:2: expected an 'id'"),
    (['{"id": "a", "text": "x"}', '{"id": "b", "text": 3}'], "texts.jsonl:2: expected a 'text' string"),
    (['{"id": "a", "text": "x"}', '{"id": "a", "text": "y"}'], "texts.jsonl:2: id 'a' repeats line 1"),
])
def test_bad_input_line_is_one_line_naming_file_and_line(tmp_path, lines, message):
    texts, schema, preds = _files(tmp_path)
    texts.write_text("\n".join(lines) + "\n", encoding="utf-8")
    with pytest.raises(KnowLMError, match=message):
        extract_file(FakeModel(), texts, preds, "re", schema)


def test_schema_without_the_language_of_a_record_names_it(tmp_path):
    texts, schema, preds = _files(tmp_path)
    schema.write_text('{"zh": ["出生地"]}', encoding="utf-8")
    with pytest.raises(KnowLMError, match=r"texts.jsonl:2\): the schema has lists for zh, none for language 'en'"):
        extract_file(FakeModel(), texts, preds, "re", schema)


def test_cli_runs_the_tiny_model_and_writes_a_line_per_record(tmp_path, capsys):
    texts, schema, preds = _files(tmp_path)
    # Template 1 keeps the prompt within the tiny preset's 256 positions; its random weights answer noise.
    assert main(["extract", "--model", "tiny", "--input", str(texts), "--schema", str(schema), "--output",
                 str(preds), "--batch-size", "2", "--max-new-tokens", "3", "--template", "1"]) == 0
    assert capsys.readouterr().out.strip() == f"extract: {preds}: 3 records written"
    lines = _read(preds)
    assert [line["id"] for line in lines] == ["a", "b", "c"]
    assert [len(line["outputs"]) for line in lines] == [2, 1, 2]


def test_cli_names_the_record_whose_prompt_does_not_fit_the_model(tmp_path, capsys):
    texts, schema, preds = _files(tmp_path, RECORDS + [{"id": "long", "text": "青岚国的首都是云州。" * 40}])
    assert main(["extract", "--model", "tiny", "--input", str(texts), "--schema", str(schema), "--output",
                 str(preds), "--batch-size", "2", "--max-new-tokens", "3", "--template", "1"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and f"{texts}:4 (id 'long'): prompt " in err and "seq_length 256" in err
    # What was done stays (c shared its batch with the long record's first prompt); --resume goes on from there.
    assert [line["id"] for line in _read(preds)] == ["a", "b"]
