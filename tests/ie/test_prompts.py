"""Prompts: the families' texts, IEPile's schema split and the defaults per model."""
import json

import pytest

from knowlm.errors import KnowLMError
from knowlm.ie.prompts import FAMILY_DEFAULTS, TEMPLATES, build_prompt, build_prompts, default_family, split_schema

RELATIONS = ["出生地", "国籍", "首都", "位于", "作者", "创始人", "毕业院校", "导演", "配偶"]


@pytest.mark.parametrize("count, size, groups", [
    (9, 4, [4, 5]),        # a remainder of 1 (< half a group) joins the last group
    (10, 4, [4, 4, 2]),    # a remainder of 2 is a group of its own
    (3, 4, [3]),
    (13, 6, [6, 7]),
    (15, 6, [6, 6, 3]),
    (9, -1, [9]),
])
def test_schema_is_split_as_iepile_splits_it(count, size, groups):
    items = list(range(count))
    split = split_schema(items, size)
    assert [len(group) for group in split] == groups
    assert [item for group in split for item in group] == items


def test_split_size_zero_is_an_error():
    with pytest.raises(KnowLMError, match="split size 0"):
        split_schema(RELATIONS, 0)


def test_knowlm_prompt_names_the_relations_and_format_and_takes_the_text_as_input():
    prompts = build_prompts("re", "林知远出生于白石城。", RELATIONS, "knowlm", "zh")
    assert [p.schema for p in prompts] == [RELATIONS[:4], RELATIONS[4:]]
    assert prompts[0].instruction == ("已知候选的关系列表：['出生地', '国籍', '首都', '位于']，请你根据关系列表，从以下输入中抽取出可能存在的"
                                      "头实体与尾实体，并给出对应的关系三元组。请按照\"(头实体,关系,尾实体)\"的格式回答。")
    assert prompts[0].input == "林知远出生于白石城。"


def test_english_template_and_format_are_chosen_by_number_and_name():
    prompt = build_prompt("re", "Lin Zhiyuan was born in Baishi City.", ["place of birth"], "knowlm", "en",
                          template=10, fmt="angle")
    assert prompt.instruction == ("Given relation list ['place of birth'], extract the possible subjects and objects "
                                  "from the text and give the corresponding relation triples in the format of "
                                  "<head, relation, tail>.")


def test_event_prompt_lists_event_types_and_their_roles():
    schema = [{"event_type": "出生事件", "arguments": ["人物", "地点"]}, {"event_type": "毕业事件", "arguments": ["人物", "学校"]}]
    prompt = build_prompt("ee", "林知远出生于白石城。", schema, "knowlm", "zh")
    assert "事件类型列表：['出生事件', '毕业事件']，论元角色列表：['人物', '地点', '学校']" in prompt.instruction


def test_oneke_instruction_is_iepile_json_with_the_schema_group():
    prompts = build_prompts("ner", "林知远出生于白石城。", ["人物", "地点", "组织机构", "作品", "学校", "时间", "事件"], "oneke", "zh")
    assert len(prompts) == 1  # NER asks 6 at a time; a remainder of 1 joins the group
    instruction = json.loads(prompts[0].instruction)
    assert list(instruction) == ["instruction", "schema", "input"]
    assert instruction["instruction"].startswith("你是专门进行实体抽取的专家。")
    assert instruction["input"] == "林知远出生于白石城。" and prompts[0].input == ""


def test_oneke_event_schema_items_carry_iepile_trigger_flag():
    prompt = build_prompt("ee", "text", [{"arguments": ["人物"], "event_type": "出生事件"}], "oneke", "zh")
    assert json.loads(prompt.instruction)["schema"] == [{"event_type": "出生事件", "trigger": True, "arguments": ["人物"]}]


def test_defaults_follow_the_model_name():
    assert default_family("knowlm_13b_ie") == default_family("/models/knowlm-13b-zhixi") == "knowlm"
    assert default_family("/models/OneKE") == "oneke"
    assert FAMILY_DEFAULTS["knowlm"] == {"format": "tuple", "chat": "alpaca"}
    assert FAMILY_DEFAULTS["oneke"] == {"format": "oneke", "chat": "llama2"}


@pytest.mark.parametrize("kwargs, message", [
    (dict(family="knowlm", language="zh", template=4), "template 4: the re zh templates are numbered 0 to 3"),
    (dict(family="knowlm", language="zh", fmt="angle"), "answer format 'angle'"),
    (dict(family="knowlm", language="zh", fmt="oneke"), "answer format 'oneke'"),
    (dict(family="oneke", language="en", fmt="tuple"), "answer format 'tuple'"),
    (dict(family="chatglm", language="en"), "unknown prompt family 'chatglm'"),
])
def test_unknown_template_format_or_family_is_an_error(kwargs, message):
    with pytest.raises(KnowLMError, match=message):
        build_prompt("re", "text", ["r"], **kwargs)


def test_every_template_has_its_placeholders():
    for task, languages in TEMPLATES.items():
        for templates in languages.values():
            for template in templates:
                names = ("{s_schema1}", "{s_schema2}") if task == "ee" else ("{s_schema}",)
                assert all(name in template for name in (*names, "{s_format}")), template
