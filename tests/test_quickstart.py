"""The quickstart's training data: invented names stated by the shipped graph's own sentence templates."""
import json
import random

from knowlm.ie.kg import GRAPH, TEST
from knowlm.ie.kg2instruct import kg2instruct, read_instructie
from knowlm.ie.parse import parse
from knowlm.quickstart import TEMPLATE, invented_records, prompt_pieces
from knowlm.tokenizer.chat import ALPACA
from knowlm.tokenizer.spm import KnowLMTokenizer, train_tokenizer

GRAPH_DATA = json.loads(GRAPH.read_text(encoding="utf-8"))


def test_invented_records_state_their_triple_in_both_languages():
    records = invented_records(GRAPH_DATA, 200, random.Random(0))
    relation_names = {lang: {r[lang] for r in GRAPH_DATA["relations"].values()} for lang in ("zh", "en")}
    assert {r["lang"] for r in records} == {"zh", "en"} and len(records) >= 190
    for record in records:
        (triple,) = record["relation"]
        assert triple["head"] in record["text"] and triple["tail"] in record["text"]
        assert triple["relation"] in relation_names[record["lang"]]


def test_invented_names_never_collide_with_held_out_entities():
    held_out = {t[key] for record in read_instructie(TEST) for t in record["relation"] for key in ("head", "tail")}
    names = {t[key] for record in invented_records(GRAPH_DATA, 2000, random.Random(1))
             for t in record["relation"] for key in ("head", "tail")}
    assert not names & held_out


def test_quickstart_samples_answer_their_own_triples():
    records = invented_records(GRAPH_DATA, 40, random.Random(2))
    for sample in kg2instruct(records, template=TEMPLATE, split_num=8, neg_ratio=0.5, seed=0):
        record = next(r for r in records if r["id"] == sample["id"])
        parsed = parse("re", sample["output"], "tuple", sample["schema"])
        expected = {(t["head"], t["relation"], t["tail"]) for t in record["relation"]
                    if t["relation"] in sample["schema"]}
        assert set(parsed.records) == expected and not parsed.errors


def test_quickstart_tokenizer_spends_one_token_per_fixed_part_of_a_prompt(tmp_path):
    records = invented_records(GRAPH_DATA, 200, random.Random(3))
    samples = kg2instruct(records, template=TEMPLATE, split_num=8, neg_ratio=0.5, seed=0)
    texts = [text for sample in samples for text in (sample["input"], sample["output"])]
    tokenizer = KnowLMTokenizer(vocab_file=str(train_tokenizer(texts, tmp_path / "t.model", 1200,
                                                               whole_pieces=prompt_pieces(GRAPH_DATA))))
    for sample in samples[:2]:        # one Chinese, one English
        prompt = ALPACA.render(sample["instruction"], sample["input"])
        ids = tokenizer.encode(prompt, add_special_tokens=False)
        schema = len(sample["schema"])
        alone = tokenizer.convert_ids_to_tokens(tokenizer.encode(sample["input"], add_special_tokens=False))
        in_prompt = len(alone) - (alone[0] == "\u2581")    # inside the prompt the input has no dummy prefix
        # dummy prefix, wrapper + template head, "['", schema items and their separators, "']", template tail +
        # input marker, the input, response marker
        assert len(ids) == 1 + 1 + 1 + (2 * schema - 1) + 1 + 1 + in_prompt + 1
        assert tokenizer.decode(ids) == prompt


def test_quickstart_refuses_a_non_positive_step_count_before_writing_anything(tmp_path):
    import pytest
    from knowlm.errors import KnowLMError
    from knowlm.quickstart import quickstart
    with pytest.raises(KnowLMError, match="steps 0: expected a positive number"):
        quickstart(workdir=tmp_path / "run", steps=0)
    assert not (tmp_path / "run").exists()
