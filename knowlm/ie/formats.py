"""Answer formats: how each is described to the model and how a gold answer is written in it.

The descriptions are KnowLM's ``{s_format}`` texts (zjunlp/KnowLM ``examples/ie_prompt.py``, DeepKE
kg2instruction); the written answers follow the converters that made the training data: KnowLM-IE answers
``NAN`` when nothing is found, OneKE answers ``{"<schema item>": [...]}`` for every item asked about, in schema
order (IEPile ``ie2instruction/convert/converter``). ``knowlm.ie.parse`` reads every format back.
"""
import json
from dataclasses import dataclass, field

from knowlm.errors import KnowLMError

NAN = "NAN"


@dataclass(frozen=True)
class Format:
    style: str          # tuple | label_first | json_list | event_tuple | oneke: how answers are written and read
    descriptions: dict  # language -> the text a knowlm template shows as {s_format}
    brackets: str = "()"                        # tuple style
    keys: dict = field(default_factory=dict)    # json_list style: language -> the key of each tuple field


_ONEKE = Format("oneke", {"zh": "", "en": ""})

FORMATS = {
    "re": {
        "tuple": Format("tuple", {"zh": '"(头实体,关系,尾实体)"', "en": "(Subject, Relation, Object)"}),
        "square": Format("tuple", {"en": "[Subject, Relation, Object]"}, brackets="[]"),
        "brace": Format("tuple", {"en": "{head, relation, tail}"}, brackets="{}"),
        "angle": Format("tuple", {"en": "<head, relation, tail>"}, brackets="<>"),
        "relation_first": Format("label_first", {"zh": '"关系：头实体,尾实体\n"'}),
        "json_list": Format("json_list", {"zh": "JSON字符串[{'head':'', 'relation':'', 'tail':''}, ]",
                                          "en": "{'head':'', 'relation':'', 'tail':''}"},
                            keys={"zh": ("head", "relation", "tail"), "en": ("head", "relation", "tail")}),
        "oneke": _ONEKE,
    },
    "ner": {
        "tuple": Format("tuple", {"zh": '"(实体,实体类型)"', "en": "(Entity, Type)"}),
        "type_first": Format("label_first", {"zh": '"实体类型：实体\n"'}),
        "json_list": Format("json_list", {"zh": "JSON字符串[{'entity':'', 'entity_type':''}, ]",
                                          "en": "{'Entity':'', 'Type':''}"},
                            keys={"zh": ("entity", "entity_type"), "en": ("Entity", "Type")}),
        "oneke": _ONEKE,
    },
    "ee": {
        "tuple": Format("event_tuple", {"zh": '"(事件触发词,事件类型,[(事件论元,论元角色)])"',
                                        "en": "(Type, Trigger, Role1#Name; Role2#Name)"}),
        "oneke": _ONEKE,
    },
}


def format_spec(task, name, language, family):
    """The ``Format`` called ``name`` for ``task``, checked to exist in ``language`` and to belong to ``family``."""
    formats = FORMATS[task]
    usable = [n for n, spec in formats.items() if language in spec.descriptions and (spec is _ONEKE) == (
        family == "oneke")]
    if name not in usable:
        raise KnowLMError(f"answer format {name!r}: the {family} family's {task} formats in {language} are "
                          f"{', '.join(usable)}")
    return formats[name]


def render(task, records, name, language, schema=()):
    """The answer text for ``records`` (tuples, see ``knowlm.ie.records``) in format ``name``.

    ``schema`` (the items the prompt asked about) is needed by ``oneke``, whose answer lists every item.
    """
    spec = FORMATS[task][name]
    if spec.style == "oneke":
        return json.dumps(_oneke_answer(task, records, schema), ensure_ascii=False)
    if not records:
        return NAN
    if spec.style == "json_list":
        return str([dict(zip(spec.keys[language], fields)) for fields in records])
    if spec.style == "label_first":
        # relation：head,tail / type：entity, one per line
        return "".join(f"{fields[1]}：{fields[0]},{fields[2]}\n" if task == "re" else f"{fields[1]}：{fields[0]}\n"
                       for fields in records)
    if spec.style == "event_tuple":
        return ",".join(_event_tuple(event, language) for event in records)
    separator = "," if language == "zh" else ", "
    return ",".join(spec.brackets[0] + separator.join(fields) + spec.brackets[1] for fields in records)


def _event_tuple(event, language):
    kind, trigger, arguments = event
    if language == "zh":  # (trigger,type,[(argument,role),...])
        pairs = ",".join(f"({argument},{role})" for argument, role in arguments) or f"({NAN},{NAN})"
        return f"({trigger},{kind},[{pairs}])"
    pairs = "; ".join(f"{role}#{argument}" for argument, role in arguments) or f"{NAN}#{NAN}"
    return f"({kind}, {trigger}, {pairs})"


def _oneke_answer(task, records, schema):
    if task == "re":
        return {relation: [{"subject": h, "object": t} for h, r, t in records if r == relation] for relation in schema}
    if task == "ner":
        return {kind: [e for e, t in records if t == kind] for kind in schema}
    answer = {}
    for item in schema:
        events = []
        for kind, trigger, arguments in records:
            if kind != item["event_type"]:
                continue
            values = {role: [a for a, r in arguments if r == role] for role in item["arguments"]}
            # IEPile: one value as a string, several as a list, none as NAN; no role filled gives {}.
            filled = {role: (found[0] if len(found) == 1 else found) if found else NAN
                      for role, found in values.items()}
            events.append({"trigger": trigger, "arguments": filled if any(values.values()) else {}})
        answer[item["event_type"]] = events
    return answer
