"""Extraction prompts in the two families KnowLM-era models were trained on.

``knowlm``  KnowLM-IE / ZhiXi free-text templates: a sentence naming the schema list and an answer format; the
            text to read is the Alpaca ``input``. Relation templates from zjunlp/KnowLM ``examples/ie_prompt.py``,
            entity and event templates from zjunlp/DeepKE ``example/llm/InstructKGC/kg2instruction`` (the same
            InstructIE generation); the wording, typos included, is what the models saw.
``oneke``   OneKE / IEPile: the instruction is a JSON string ``{"instruction", "schema", "input"}`` and the answer
            a JSON object keyed by schema item (zjunlp/IEPile ``ie2instruction/convert/utils/instruction.py``).

Both families ask for a few schema items at a time (IEPile: 4 for RE and EE, 6 for NER), so one record becomes
several prompts whose answers are merged.
"""
import json
from dataclasses import dataclass

from knowlm.errors import KnowLMError
from knowlm.ie.formats import format_spec

FAMILIES = ("knowlm", "oneke")

# IEPile's recommended schema items per prompt (convert_func.py --split_num).
SPLIT_NUM = {"re": 4, "ner": 6, "ee": 4}

# task -> language -> templates; {s_schema} (RE, NER) or {s_schema1}/{s_schema2} (EE event types / roles) are
# Python list reprs, {s_format} the answer format's description (knowlm.ie.formats).
TEMPLATES = {
    "re": {
        "zh": (
            "已知候选的关系列表：{s_schema}，请你根据关系列表，从以下输入中抽取出可能存在的头实体与尾实体，并给出对应的关系三元组。"
            "请按照{s_format}的格式回答。",
            "我将给你个输入，请根据关系列表：{s_schema}，从输入中抽取出可能包含的关系三元组，并以{s_format}的形式回答。",
            "我希望你根据关系列表从给定的输入中抽取可能的关系三元组，并以{s_format}的格式回答，关系列表={s_schema}。",
            "给定的关系列表是：{s_schema}\n根据关系列表抽取关系三元组，在这个句子中可能包含哪些关系三元组？请以{s_format}的格式回答。",
        ),
        "en": (
            "Identify the head entities (subjects) and tail entities (objects) in the following text and provide the "
            "corresponding relation triples from relation list {s_schema}. Please provide your answer as a list of "
            "relation triples in the form of {s_format}.",
            "Identify the subjects and objects in the text that are related, and provide the corresponding relation "
            "triples from relation {s_schema} in the format of {s_format}.",
            "From the given text, extract the possible head entities (subjects) and tail entities (objects) and give "
            "the corresponding relation triples. The relations are {s_schema}. Please format your answer as a list "
            "of relation triples in the form of {s_format}.",
            "Your task is to identify the head entities (subjects) and tail entities (objects) in the following text "
            "and extract the corresponding relation triples, the possible relation list is {s_schema}. Your answer "
            "should include relation triples, with each triple formatted as {s_format}.",
            "Given the text, extract the possible head entities (subjects) and tail entities (objects) and provide "
            "the corresponding relation triples, the possible relation list is {s_schema}. Format your answer as a "
            "list of relation triples in the form of {s_format}.",
            "Your goal is to identify the head entities (subjects) and tail entities (objects) in the text and give "
            "the corresponding relation triples. The given relation list is {s_schema}. Please answer with a list "
            "of relation triples in the form of {s_format}.",
            "Please extract the possible head entities (subjects) and tail entities (objects) from the text and "
            "provide the corresponding relation triples from candidate relation list {s_schema}. Your answer should "
            "be in the form of a list of relation triples: {s_format}.",
            "Your task is to extract the possible head entities (subjects) and tail entities (objects) in the given "
            "text and give the corresponding relation triples. The relations are {s_schema}. Please answer using "
            "the format of a list of relation triples: {s_format}.",
            "Given the {s_schema}, identify the head entities (subjects) and tail entities (objects) and provide the "
            "corresponding relation triples. Your answer should consist of relation triples, with each triple "
            "formatted as {s_format}",
            "Please find the possible head entities (subjects) and tail entities (objects) in the text based on the "
            "relation list {s_schema} and give the corresponding relation triples. Please format your answer as a "
            "list of relation triples in the form of {s_format}.",
            "Given relation list {s_schema}, extract the possible subjects and objects from the text and give the "
            "corresponding relation triples in the format of {s_format}.",
            "Extract the entities involved in the relationship described in the text and provide the corresponding "
            "triples in the format of {s_format}, the possible relation list is {s_schema}.",
            "Given relation list {s_schema}, provide relation triples for the entities and their relationship in "
            "the text, using the format of {s_format}.",
            "Extract the entities and their corresponding relationships from the given relationships are "
            "{s_schema} and provide the relation triples in the format of {s_format}.",
        ),
    },
    "ner": {
        "zh": (
            "已知候选的实体类型列表：{s_schema}，请你根据实体类型列表，从以下输入中抽取出可能存在的实体。请按照{s_format}的格式回答。",
            "我将给你个输入，请根据实体类型列表：{s_schema}，从输入中抽取出可能包含的实体，并以{s_format}的形式回答。",
            "我希望你根据实体类型列表从给定的输入中抽取可能的实体，并以{s_format}的格式回答，实体类型列表={s_schema}。",
            "给定的实体类型列表是{s_schema}\n根据实体类型列表抽取，在这个句子中可能包含哪些实体？你可以先别出实体, 再判断实体类型。"
            "请以{s_format}的格式回答。",
        ),
        "en": (
            "Identify the entities and types in the following text and where entity type list {s_schema}. Please "
            "provide your answerin the form of {s_format}.",
            "From the given text, extract the possible entities and types . The types are {s_schema}. Please format "
            "your answerin the form of {s_format}.",
        ),
    },
    "ee": {
        "zh": (
            "已知候选的事件类型列表：{s_schema1}，论元角色列表：{s_schema2}，请你根据事件类型列表和论元角色列表，从以下输入中抽取出可能存在的事件。"
            "请按照{s_format}的格式回答。",
            "我将给你个输入，请根据事件类型列表：{s_schema1}，论元角色列表：{s_schema2}，从输入中抽取出可能包含的事件，并以{s_format}的形式回答。",
            "我希望你根据事件类型列表和论元角色列表从给定的输入中抽取可能的事件，并以{s_format}的格式回答，事件类型列表={s_schema1}，"
            "论元角色列表={s_schema2}。",
            "给定的事件类型列表是{s_schema1}，论元角色列表是{s_schema2}\n根据事件类型列表和论元角色列表抽取，在这个句子中可能包含哪些事件？"
            "请以{s_format}的格式回答。",
        ),
        "en": (
            "Identify the event information in the following text and provide the corresponding triples from event "
            "type list {s_schema1} and role list {s_schema2}. Please provide your answer as a list of triples in the "
            "form of {s_format}.",
            "From the given text, extract the possible event information and give the corresponding triples. The "
            "event types are {s_schema1} and the role list are {s_schema2}. Please format your answer as a list of "
            "triples in the form of {s_format}.",
        ),
    },
}

ONEKE_INSTRUCTIONS = {
    "re": {
        "zh": "你是专门进行关系抽取的专家。请从input中抽取出符合schema定义的关系三元组，不存在的关系返回空列表。请按照JSON字符串的格式回答。",
        "en": "You are an expert in relationship extraction. Please extract relationship triples that match the schema "
              "definition from the input. Return an empty list for relationships that do not exist. Please respond "
              "in the format of a JSON string.",
    },
    "ner": {
        "zh": "你是专门进行实体抽取的专家。请从input中抽取出符合schema定义的实体，不存在的实体类型返回空列表。请按照JSON字符串的格式回答。",
        "en": "You are an expert in named entity recognition. Please extract entities that match the schema "
              "definition from the input. Return an empty list if the entity type does not exist. Please respond in "
              "the format of a JSON string.",
    },
    "ee": {
        "zh": "你是专门进行事件提取的专家。请从input中抽取出符合schema定义的事件，不存在的事件返回空列表，不存在的论元返回NAN，"
              "如果论元存在多值请返回列表。请按照JSON字符串的格式回答。",
        "en": "You are an expert in event extraction. Please extract events from the input that conform to the "
              "schema definition. Return an empty list for events that do not exist, and return NAN for arguments "
              "that do not exist. If an argument has multiple values, please return a list. Respond in the format "
              "of a JSON string.",
    },
}

# How the model sees an instruction: name -> (with input, without input, the marker of a next turn, after which
# a continuation is cut off). KnowLM's LoRA and ZhiXi use Alpaca (the template prepare-data trains with); OneKE
# wraps LLaMA-2 chat around its JSON instruction (IEPile OneKE.md).
# What each family's models were trained with.
FAMILY_DEFAULTS = {"knowlm": {"format": "tuple", "chat": "alpaca"}, "oneke": {"format": "oneke", "chat": "llama2"}}


@dataclass(frozen=True)
class Prompt:
    instruction: str
    input: str
    schema: list  # the schema items this prompt asks about


def default_family(model):
    """The family a model was trained on, by its name: OneKE's JSON for ``*oneke*``, else KnowLM-IE's templates."""
    return "oneke" if "oneke" in str(model).lower() else "knowlm"


def check_family(family):
    if family not in FAMILIES:
        raise KnowLMError(f"unknown prompt family {family!r}; expected one of {', '.join(FAMILIES)}")
    return family


def template_count(task, language):
    return len(TEMPLATES[task][language])


def split_schema(schema, size):
    """Schema items in groups of ``size`` (-1: one group); a short remainder joins the last group.

    IEPile's rule (convert_func.py): the remainder is a group of its own when it holds at least half a group.
    """
    if size == 0 or size < -1:
        raise KnowLMError(f"split size {size}: expected a positive number of schema items per prompt, or -1")
    if size == -1 or len(schema) < size:
        return [list(schema)]
    whole = len(schema) // size * size
    groups = [list(schema[i:i + size]) for i in range(0, whole, size)]
    if len(schema) - whole >= max(1, size // 2):
        groups.append(list(schema[whole:]))
    else:
        groups[-1].extend(schema[whole:])
    return groups


def build_prompt(task, text, schema, family="knowlm", language="zh", template=0, fmt=None):
    """The prompt asking for ``schema`` (a list of items) in ``text``."""
    check_family(family)
    if family == "oneke":
        format_spec(task, fmt or "oneke", language, family)
        if task == "ee":  # IEPile's event schema items, keys in its order
            schema = [{"event_type": e["event_type"], "trigger": True, "arguments": e["arguments"]} for e in schema]
        instruction = {"instruction": ONEKE_INSTRUCTIONS[task][language], "schema": schema, "input": text}
        return Prompt(json.dumps(instruction, ensure_ascii=False), "", schema)
    spec = format_spec(task, fmt or FAMILY_DEFAULTS[family]["format"], language, family)
    templates = TEMPLATES[task][language]
    if not 0 <= template < len(templates):
        raise KnowLMError(f"template {template}: the {task} {language} templates are numbered 0 to "
                          f"{len(templates) - 1}")
    if task == "ee":
        roles = list(dict.fromkeys(role for event in schema for role in event["arguments"]))
        instruction = templates[template].format(s_schema1=str([event["event_type"] for event in schema]),
                                                 s_schema2=str(roles), s_format=spec.descriptions[language])
    else:
        instruction = templates[template].format(s_schema=str(list(schema)), s_format=spec.descriptions[language])
    return Prompt(instruction, text, schema)


def build_prompts(task, text, schema, family="knowlm", language="zh", template=0, fmt=None, split_num=None):
    """One prompt per group of schema items (``split_num`` per group; default IEPile's for the task)."""
    size = SPLIT_NUM[task] if split_num is None else split_num
    return [build_prompt(task, text, group, family, language, template, fmt) for group in split_schema(schema, size)]
