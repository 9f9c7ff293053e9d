"""Parsers read what models really write, in every format and language, and never raise on it."""
import random

import pytest

from knowlm.ie.formats import FORMATS, render
from knowlm.ie.parse import Parsed, loads_lenient, merge, parse, run_on

BIRTH_ZH = ("林知远", "出生地", "白石城")
NATION_ZH = ("林知远", "国籍", "青岚国")
BIRTH_EN = ("Lin Zhiyuan", "place of birth", "Baishi City")
NATION_EN = ("Lin Zhiyuan", "nationality", "Qinglan")


# (task, format, what a model wrote, what must be read from it, how many parts are unreadable)
MESSY_ANSWERS = [
    pytest.param("re", "tuple", "输入中包含的关系三元组是：\n(林知远,出生地,白石城),(林知远，国籍，青岚国),(林知远,出生地,白石城),"
                 "(林知远,毕业院校", [BIRTH_ZH, NATION_ZH, BIRTH_ZH], 1,
                 id="zh-tuples-with-prefix-fullwidth-commas-duplicate-and-cut-off-tail"),
    pytest.param("re", "tuple", "（林知远，出生地，白石城）（林知远，国籍，青岚国）", [BIRTH_ZH, NATION_ZH], 0,
                 id="zh-tuples-in-fullwidth-brackets"),
    pytest.param("re", "tuple", "(华为（深圳）,位于,深圳)", [("华为（深圳）", "位于", "深圳")], 0,
                 id="fullwidth-brackets-inside-a-name-are-kept"),
    pytest.param("re", "tuple", 'Sure! Here are the relation triples: ("Lin Zhiyuan", "place of birth", '
                 '"Baishi City"), '
                 "(Lin Zhiyuan, nationality, Qinglan). Let me know if you need anything else (happy to help).",
                 [BIRTH_EN, NATION_EN], 0, id="en-tuples-inside-prose-with-quotes"),
    pytest.param("re", "square", "[[Lin Zhiyuan, place of birth, Baishi City], [Lin Zhiyuan, nationality, Qinglan]]",
                 [BIRTH_EN, NATION_EN], 0, id="en-square-brackets-in-an-outer-list"),
    pytest.param("re", "brace", "{Lin Zhiyuan, place of birth, Baishi City}, {Lin Zhiyuan, nationality, Qinglan}",
                 [BIRTH_EN, NATION_EN], 0, id="en-braces"),
    pytest.param("re", "angle", "<Lin Zhiyuan, place of birth, Baishi City>\n<Lin Zhiyuan, nationality, Qinglan>",
                 [BIRTH_EN, NATION_EN], 0, id="en-angle-brackets-one-per-line"),
    pytest.param("re", "relation_first", "输入中包含的关系三元组是：\n出生地：林知远,白石城\n国籍：林知远，青岚国；毕业院校：林知远\n",
                 [BIRTH_ZH, NATION_ZH], 1, id="zh-relation-first-lines-and-semicolons-with-a-tail-missing"),
    pytest.param("re", "json_list", "[{'head': '林知远', 'relation': '出生地', 'tail': '白石城'}, "
                 "{'head': '林知远', 'relation': '国籍', 'tail': '青岚国'}, {'head': '林知远', 'rel",
                 [BIRTH_ZH, NATION_ZH], 1, id="zh-json-list-in-python-quoting-cut-off"),
    pytest.param("re", "json_list", 'Answer: [{"subject": "Lin Zhiyuan", "relation": "place of birth", '
                 '"object": "Baishi City"}, {"head": "Lin Zhiyuan", "relation": "nationality", "tail": "Qinglan"},]',
                 [BIRTH_EN, NATION_EN], 0, id="en-json-list-trailing-comma-and-subject-object-keys"),
    pytest.param("re", "json_list", "[{'head': '林知远', 'relation': '出生地', 'tail': '白石城', 'note': 'it's so'}]",
                 [BIRTH_ZH], 0, id="json-list-item-with-broken-quoting-keeps-its-readable-pairs"),
    pytest.param("ner", "tuple", "(林知远,人物),(云州，城市),(NAN,NAN)", [("林知远", "人物"), ("云州", "城市")], 0,
                 id="zh-entity-tuples-and-a-nan-pair"),
    pytest.param("ner", "type_first", "输入中包含的实体是：\n人物：林知远、苏明月\n城市：云州\n",
                 [("林知远", "人物"), ("苏明月", "人物"), ("云州", "城市")], 0, id="zh-type-first-several-entities-a-line"),
    pytest.param("ner", "json_list",
                 "[{'Entity': 'Lin Zhiyuan', 'Type': 'person'}, {'Entity': 'Yunzhou', 'Type': 'city'}]",
                 [("Lin Zhiyuan", "person"), ("Yunzhou", "city")], 0, id="en-entity-json-list-capitalised-keys"),
    pytest.param("ee", "tuple", "(出生,出生事件,[(林知远,人物),(白石城,地点)]),(毕业,毕业事件,[(NAN,NAN)])",
                 [("出生事件", "出生", (("林知远", "人物"), ("白石城", "地点"))), ("毕业事件", "毕业", ())], 0,
                 id="zh-event-tuples-with-nan-arguments"),
    pytest.param("ee", "tuple", "(Birth, born, Person#Lin Zhiyuan; Place#Baishi City), "
                 "(Graduation, graduated, NAN#NAN), (Travel, we",
                 [("Birth", "born", (("Lin Zhiyuan", "Person"), ("Baishi City", "Place"))),
                  ("Graduation", "graduated", ())],
                 1, id="en-event-tuples-role-hash-arguments-cut-off"),
    pytest.param("re", "oneke", '好的，结果如下：{"出生地": [{"subject": "林知远", "object": "白石城"},], "国籍"：'
                 '[{"head": "林知远", "tail": "青岚国"}], "位于": []} 以上。', [BIRTH_ZH, NATION_ZH], 0,
                 id="oneke-zh-prose-trailing-comma-chinese-colon-head-tail-keys"),
    pytest.param("re", "oneke", '{"place of birth": [{"subject": "Lin Zhiyuan", "object": "Baishi City"}], '
                 '"nationality": [{"subject": "Lin Zhiyuan", "object": "Qinglan"}, {"subject": "Lin Zhiyuan", "obj',
                 [BIRTH_EN, NATION_EN], 1, id="oneke-en-cut-off-keeps-complete-items-one-error"),
    pytest.param("ner", "oneke", '{"人物": ["林知远", "苏明月", "林知远"], "地点": "NAN", "城市": "云州", "组织机构": []}',
                 [("林知远", "人物"), ("苏明月", "人物"), ("林知远", "人物"), ("云州", "城市")], 0,
                 id="oneke-entities-duplicate-nan-and-a-lone-string"),
    pytest.param("ee", "oneke", '{"出生事件": [{"trigger": "出生", "arguments": {"人物": "林知远", "地点": ["白石城", "云州"], '
                 '"时间": "NAN"}}], "毕业事件": []}',
                 [("出生事件", "出生", (("林知远", "人物"), ("白石城", "地点"), ("云州", "地点")))], 0,
                 id="oneke-events-list-valued-and-nan-arguments"),
    pytest.param("re", "oneke", '{"出生地": [{"subject": "林知远", "object": "白石城"}, "林知远", {"subject": 3}], "国籍": 5}',
                 [BIRTH_ZH], 3, id="oneke-wrongly-shaped-items-are-counted-and-skipped"),
]


@pytest.mark.parametrize("task, fmt, answer, records, errors", MESSY_ANSWERS)
def test_messy_answer_is_read(task, fmt, answer, records, errors):
    assert parse(task, answer, fmt) == Parsed(records, errors)


def test_name_with_a_comma_is_split_at_the_schema_relation():
    answer = "(Washington, D.C., capital of, United States)"
    assert parse("re", answer, "tuple", ["capital of"]) == Parsed([("Washington, D.C.", "capital of",
                                                                    "United States")], 0)
    assert parse("re", answer, "tuple") == Parsed([], 1)  # without the schema the split is unknowable


@pytest.mark.parametrize("answer", ["NAN", "  nan\n", "输入中包含的关系三元组是：\nNAN", "(NAN,出生地,NAN)"])
def test_nan_means_nothing_found_and_is_no_error(answer):
    assert parse("re", answer, "tuple") == Parsed([], 0)


@pytest.mark.parametrize("answer", ["", "I cannot find any relation in this text.", "(林知远,出生地)"])
def test_answer_with_no_tuple_and_no_nan_is_one_error(answer):
    assert parse("re", answer, "tuple") == Parsed([], 1)


@pytest.mark.parametrize("answer", ["", "NAN", "I don't know.", '["出生地"]', "{{{{"])
def test_oneke_answer_that_is_not_an_object_is_one_error(answer):
    assert parse("re", answer, "oneke") == Parsed([], 1)


def test_loads_lenient_accepts_python_quoting_and_curly_quotes():
    assert loads_lenient("{'a': ['b']}") == ({"a": ["b"]}, False)
    assert loads_lenient("{“a”： [“b”]，}") == ({"a": ["b"]}, False)
    assert loads_lenient('{"a": ["b", "c') == ({"a": ["b"]}, True)


def test_merge_adds_records_and_errors():
    assert merge([Parsed([BIRTH_ZH], 1), Parsed([NATION_ZH], 0)]) == Parsed([BIRTH_ZH, NATION_ZH], 1)


# ---- never raises ---------------------------------------------------------------------------------------------

_EVENT = ("出生事件", "出生", (("林知远", "人物"), ("白石城", "地点")))
_SAMPLES = {"re": [BIRTH_ZH, NATION_ZH], "ner": [("林知远", "人物"), ("白石城", "城市")], "ee": [_EVENT, _EVENT]}
_SCHEMAS = {"re": ["出生地", "国籍"], "ner": ["人物", "城市"],
            "ee": [{"event_type": "出生事件", "arguments": ["人物", "地点"]}]}


@pytest.mark.parametrize("task, fmt, language", [(task, fmt, language) for task, formats in FORMATS.items()
                                                 for fmt, spec in formats.items() for language in spec.descriptions])
def test_every_prefix_of_every_format_parses_without_raising(task, fmt, language):
    answer = render(task, _SAMPLES[task], fmt, language, _SCHEMAS[task])
    assert parse(task, answer, fmt, _SCHEMAS[task]) == Parsed(_SAMPLES[task], 0)
    for end in range(len(answer)):
        parsed = parse(task, answer[:end], fmt, _SCHEMAS[task])
        assert len(parsed.records) <= len(_SAMPLES[task]) and parsed.errors >= 0


def test_random_garbage_parses_without_raising():
    rng = random.Random(0)
    alphabet = "()[]{}<>,，:：;；#'\"“”\\ \nNAN林知远出生地abc0"
    for _ in range(300):
        garbage = "".join(rng.choice(alphabet) for _ in range(rng.randrange(60)))
        for task, formats in FORMATS.items():
            for fmt in formats:
                assert isinstance(parse(task, garbage, fmt, _SCHEMAS[task]), Parsed)
    assert isinstance(parse("re", "[" * 5000 + "{" * 5000, "oneke"), Parsed)


def test_run_on_is_text_after_the_last_closed_tuple_or_json_object():
    assert not run_on("re", "(a, r, b),(c, r, d)") and not run_on("re", "  NAN ")
    assert run_on("re", "(a, r, b)\nThese are the triples I found.")
    assert run_on("re", "(a, r, b),(c, r")                      # cut off by the token limit
    assert run_on("re", "NAN. There is no relation.")
    assert run_on("ner", "（华为，公司）还有", "tuple")              # full-width brackets
    assert not run_on("re", '{"r": [{"subject": "a", "object": "b"}]}', "oneke")
    assert run_on("re", '{"r": []} and more', "oneke")
    assert not run_on("re", "nothing an answer could be read from")   # unparsable, not run-on
