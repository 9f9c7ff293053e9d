"""Extraction answers as JSON (InstructIE / IEPile records) and as the tuples that are parsed, merged and scored.

=====  ===============================================================  ======================================
task   record key and item                                              tuple (IEPile's eval_func.convert_kg)
=====  ===============================================================  ======================================
re     ``relation``: ``{head, relation, tail}`` (or subject / object)   ``(head, relation, tail)``
ner    ``entity``: ``{entity, entity_type}``                            ``(entity, entity_type)``
ee     ``event``: ``{event_type, event_trigger, arguments:              ``(event_type, trigger,
       [{argument, role}]}``                                            ((argument, role), ...))``
=====  ===============================================================  ======================================
"""
import json
import re

from knowlm.errors import KnowLMError

RECORD_KEYS = {"re": "relation", "ner": "entity", "ee": "event"}
LANGUAGES = ("zh", "en")

_EXPECTED = {"re": "string 'head' (or 'subject'), 'relation' and 'tail' (or 'object')",
             "ner": "string 'entity' and 'entity_type'",
             "ee": "string 'event_type' and 'event_trigger', and 'arguments' [{'argument', 'role'}]"}
_CJK = re.compile(r"[\u4e00-\u9fff]")


def check_task(task):
    if task not in RECORD_KEYS:
        raise KnowLMError(f"unknown task {task!r}; expected one of {', '.join(RECORD_KEYS)}")
    return task


def check_language(language):
    """``language`` is zh, en or auto (each record's own, see ``language_of``)."""
    if language not in ("auto", *LANGUAGES):
        raise KnowLMError(f"unknown language {language!r}; expected auto, {', '.join(LANGUAGES)}")
    return language


def language_of(record):
    """The record's ``lang`` when it names one, else ``zh`` for text with Chinese characters, else ``en``."""
    if record.get("lang") in LANGUAGES:
        return record["lang"]
    return "zh" if _CJK.search(record.get("text") or "") else "en"


def to_tuples(task, items, where):
    """The tuples of a record's answer list; ``where`` ("file:line") starts the error for a malformed item."""
    if not isinstance(items, list):
        raise KnowLMError(f"{where}: '{RECORD_KEYS[task]}' must be a list, got {type(items).__name__}")
    tuples = []
    for item in items:
        value = _tuple(task, item) if isinstance(item, dict) else None
        if value is None:
            raise KnowLMError(f"{where}: {RECORD_KEYS[task]} item {json.dumps(item, ensure_ascii=False)[:80]} "
                              f"lacks {_EXPECTED[task]}")
        tuples.append(value)
    return tuples


def _string(item, *names):
    return next((item[name] for name in names if isinstance(item.get(name), str)), None)


def _tuple(task, item):
    if task == "re":
        fields = (_string(item, "head", "subject"), _string(item, "relation"), _string(item, "tail", "object"))
    elif task == "ner":
        fields = (_string(item, "entity"), _string(item, "entity_type"))
    else:
        arguments = item.get("arguments", [])
        if not isinstance(arguments, list) or not all(isinstance(a, dict) for a in arguments):
            return None
        pairs = tuple((_string(a, "argument"), _string(a, "role")) for a in arguments)
        if any(None in pair for pair in pairs):
            return None
        fields = (_string(item, "event_type"), _string(item, "event_trigger", "trigger"), pairs)
    return None if None in fields else fields


def to_dicts(task, tuples):
    """The inverse of ``to_tuples``, with the key names this project writes."""
    if task == "re":
        return [{"head": h, "relation": r, "tail": t} for h, r, t in tuples]
    if task == "ner":
        return [{"entity": e, "entity_type": t} for e, t in tuples]
    return [{"event_type": kind, "event_trigger": trigger,
             "arguments": [{"argument": argument, "role": role} for argument, role in arguments]}
            for kind, trigger, arguments in tuples]
