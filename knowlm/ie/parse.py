"""Model answers back into tuples (``knowlm.ie.records``), for every format of ``knowlm.ie.formats``.

Models wrap answers in prose, mix Chinese and English punctuation, stop mid-answer at the token limit, repeat
themselves and write ``NAN``. A parser never raises on model output: it returns the tuples it could read and
how many parts it could not (``Parsed.errors``); duplicates are kept, because scoring decides what they cost.
Readers do not depend on the language: each accepts both languages' punctuation and layouts.
"""
import ast
import json
import re
from typing import NamedTuple

from knowlm.ie.formats import FORMATS


class Parsed(NamedTuple):
    records: list  # tuples, in the order the answer gives them
    errors: int    # parts that could not be read; 0 when the whole answer was understood


def parse(task, text, fmt="tuple", schema=()):
    """Read the answer ``text`` to a ``task`` prompt in format ``fmt``.

    ``schema`` (the items asked about) lets a tuple whose names contain commas be split at the schema item.
    """
    spec = FORMATS[task][fmt]
    if spec.style == "oneke":
        return _read_oneke(task, text)
    records, errors = _READERS[spec.style](task, text, spec, schema)
    if not records and not errors and not _NAN_WORD.search(text):
        errors = 1  # neither an answer nor NAN: nothing in it was understood
    return Parsed(records, errors)


def run_on(task, text, fmt="tuple") -> bool:
    """Whether the answer goes on after its end: text after its last closed tuple (or its ``NAN``) in a tuple format,
    after its JSON object in OneKE's. An answer without an end to find (nothing read; other formats) is not."""
    spec = FORMATS[task][fmt]
    end = None
    if spec.style == "oneke":
        start = text.find("{")
        try:
            end = json.JSONDecoder().raw_decode(text, start)[1] if start >= 0 else None
        except json.JSONDecodeError:
            end = None
    elif spec.style == "tuple":
        for candidate in (text, text.translate(_FULL_WIDTH)):       # one character for one: same positions
            opening, closing = spec.brackets
            inside = re.escape(opening + closing)
            found = [m.end() for m in re.finditer(f"{re.escape(opening)}[^{inside}]*{re.escape(closing)}", candidate)]
            found = found or [m.end() for m in _NAN_WORD.finditer(candidate)]
            if found:
                end = found[-1]
                break
    return end is not None and bool(text[end:].strip())


def merge(parsed):
    """One ``Parsed`` for the answers to all prompts of a record."""
    return Parsed([record for part in parsed for record in part.records], sum(part.errors for part in parsed))


_FULL_WIDTH = str.maketrans({"（": "(", "）": ")", "［": "[", "］": "]", "｛": "{", "｝": "}"})
_QUOTES = "\"'“”‘’「」`"
_NAN_WORD = re.compile(r"(?<![A-Za-z])NAN(?![A-Za-z])", re.IGNORECASE)
_SEPARATOR = re.compile(r"([,，])")


def _clean(field):
    return field.strip().strip(_QUOTES).strip()


def _is_nan(value):
    # Exactly as KnowLM and IEPile write it: a name such as "Nan" is a name.
    return isinstance(value, str) and value.strip() == "NAN"


def _tuple_or_error(fields):
    """``fields`` as a tuple; ``None`` for one that says "none" (a NAN field); ``False`` for an empty field."""
    if any(_is_nan(f) for f in fields):
        return None
    return tuple(fields) if all(fields) else False


def _collect(records, errors, fields):
    value = _tuple_or_error(fields)
    if value is False:
        return errors + 1
    if value is not None:
        records.append(value)
    return errors


def _cut_off(text, end, opening):
    """Whether the text after the last complete tuple holds the start of another one (the answer was truncated)."""
    start = text.rfind(opening, end)
    return start >= 0 and bool(_SEPARATOR.search(text, start))


# ---- tuple: (head,relation,tail) / (entity,type), in () [] {} or <> -------------------------------------------

def _read_tuples(task, text, spec, schema):
    return _with_full_width(_read_ascii_tuples, task, text, spec, schema)


def _with_full_width(read, task, text, spec, schema):
    """``read`` the text; if that finds nothing, read it again with full-width brackets made ASCII.

    Not both at once: names such as "华为（深圳）" keep their full-width brackets inside ASCII tuples.
    """
    records, errors = read(task, text, spec, schema)
    if records or errors:
        return records, errors
    return read(task, text.translate(_FULL_WIDTH), spec, schema)


def _read_ascii_tuples(task, text, spec, schema):
    opening, closing = spec.brackets
    inside = re.escape(opening + closing)
    group = re.compile(f"{re.escape(opening)}([^{inside}]*){re.escape(closing)}")
    records, errors, end = [], 0, 0
    for match in group.finditer(text):
        end = match.end()
        fields = _split_fields(task, match.group(1), schema)
        if fields is None:
            # Something that looked like a tuple but was not one; a lone "(...)" without separators is prose.
            errors += bool(_SEPARATOR.search(match.group(1)))
            continue
        errors = _collect(records, errors, fields)
    return records, errors + _cut_off(text, end, opening)


def _split_fields(task, body, schema):
    pieces = _SEPARATOR.split(body)  # field, separator, field, ...
    fields = [_clean(p) for p in pieces[0::2]]
    arity = 3 if task == "re" else 2
    if len(fields) == arity:
        return fields
    if len(fields) < arity or not schema:
        return None
    # More separators than fields: a name holds a comma. The schema item says where to split.
    if task == "ner":
        return ["".join(pieces[:-2]).strip(), fields[-1]] if fields[-1] in schema else None
    hits = [i for i in range(1, len(fields) - 1) if fields[i] in schema]
    if len(hits) != 1:
        return None
    i = hits[0]
    return [_clean("".join(pieces[:2 * i - 1])), fields[i], _clean("".join(pieces[2 * i + 2:]))]


# ---- label_first: "relation：head,tail" / "type：entity" per line ---------------------------------------------

_LINE = re.compile(r"[\n；;]")
_COLON = re.compile(r"[：:]")
_ENTITY_SEPARATOR = re.compile(r"[,，、]")


def _read_label_first(task, text, spec, schema):
    records, errors = [], 0
    for line in _LINE.split(text):
        label, *rest = _COLON.split(line.strip().rstrip("。."), maxsplit=1)
        if not rest or not rest[0].strip():
            continue  # prose, or a heading such as "输入中包含的关系三元组是："
        label = _clean(label)
        if task == "ner":
            for entity in _ENTITY_SEPARATOR.split(rest[0]):
                errors = _collect(records, errors, [_clean(entity), label])
            continue
        head, *tail = _SEPARATOR.split(rest[0], maxsplit=1)
        if not tail:
            errors += 1
            continue
        errors = _collect(records, errors, [_clean(head), label, _clean(tail[-1])])
    return records, errors


# ---- json_list: [{'head': .., 'relation': .., 'tail': ..}, ...] in JSON or Python quoting --------------------

_OBJECT = re.compile(r"\{[^{}]*\}")
_PAIR = re.compile(r"""["'“‘]?(\w+)["'”’]?\s*[:：]\s*["'“‘]([^"'”’]*)["'”’]""")
_KEYS = {"re": (("head", "subject"), ("relation", "predicate"), ("tail", "object")),
         "ner": (("entity",), ("entity_type", "type"))}


def _read_json_list(task, text, spec, schema):
    records, errors, end = [], 0, 0
    for match in _OBJECT.finditer(text):
        end = match.end()
        item = _literal(match.group())
        if not isinstance(item, dict):
            item = dict(_PAIR.findall(match.group()))  # broken quoting: take the pairs that are readable
        fields = _fields_of(task, item)
        errors = errors + 1 if fields is None else _collect(records, errors, fields)
    return records, errors + ("{" in text[end:])


def _fields_of(task, item):
    lowered = {str(k).lower(): v for k, v in item.items()}
    fields = [next((lowered[n] for n in names if isinstance(lowered.get(n), str)), None) for names in _KEYS[task]]
    return None if None in fields else [f.strip() for f in fields]


def _literal(text):
    """``text`` as JSON, else as a Python literal (models often answer with single quotes); ``None`` if neither."""
    try:
        return json.loads(text)
    except (json.JSONDecodeError, RecursionError):
        pass
    try:
        return ast.literal_eval(text)
    except (ValueError, SyntaxError, TypeError, MemoryError, RecursionError):
        return None


# ---- event_tuple: zh (trigger,type,[(argument,role),...]); en (Type, Trigger, Role#Name; Role#Name) -----------

_ZH_EVENT = re.compile(r"\(([^()\[\]]*)\[(.*?)\]\s*\)")
_GROUP = re.compile(r"\(([^()]*)\)")


def _read_event_tuples(task, text, spec, schema):
    return _with_full_width(_read_ascii_event_tuples, task, text, spec, schema)


def _read_ascii_event_tuples(task, text, spec, schema):
    records, errors, end = [], 0, 0
    for match in _ZH_EVENT.finditer(text):
        end = max(end, match.end())
        head = [_clean(f) for f in _SEPARATOR.split(match.group(1).strip().rstrip(",，"))[0::2]]
        arguments, bad = [], 0
        for pair in _GROUP.findall(match.group(2)):
            parts = _SEPARATOR.split(pair)
            if len(parts) < 3:
                bad += 1
            elif not (_is_nan(parts[0]) or _is_nan(parts[-1])):
                arguments.append((_clean("".join(parts[:-2])), _clean(parts[-1])))
        errors += bad
        errors = _collect_event(records, errors, head[::-1], arguments)
    # What is left (zh events blanked out, positions kept) holds English-layout events.
    rest = _ZH_EVENT.sub(lambda m: " " * len(m.group()), text)
    for match in _GROUP.finditer(rest):
        end = max(end, match.end())
        parts = _SEPARATOR.split(match.group(1), maxsplit=2)
        if len(parts) < 5:
            errors += len(parts) > 1
            continue
        arguments, bad = [], 0
        for pair in re.split(r"[;；]", parts[4]):
            role, sharp, argument = pair.partition("#")
            if not sharp:
                bad += bool(pair.strip())
            elif not (_is_nan(role) or _is_nan(argument)):
                arguments.append((_clean(argument), _clean(role)))
        errors = _collect_event(records, errors + bad, [_clean(parts[0]), _clean(parts[2])], arguments)
    return records, errors + _cut_off(text, end, "(")


def _collect_event(records, errors, head, arguments):
    """``head`` is [type, trigger]."""
    if len(head) != 2:
        return errors + 1
    value = _tuple_or_error(head)
    if value is False:
        return errors + 1
    if value is not None:
        records.append((value[0], value[1], tuple(arguments)))
    return errors


_READERS = {"tuple": _read_tuples, "label_first": _read_label_first, "json_list": _read_json_list,
            "event_tuple": _read_event_tuples}


# ---- oneke: {"<schema item>": [...], ...} ----------------------------------------------------------------------

def _read_oneke(task, text):
    value, repaired = loads_lenient(text)
    if not isinstance(value, dict):
        return Parsed([], 1)
    records, errors = [], int(repaired)
    for key, values in value.items():
        if values in ("", None) or _is_nan(values):
            continue  # the item was asked about and is absent
        if isinstance(values, dict) or (isinstance(values, str) and task == "ner"):
            values = [values]  # one item given without its list
        if not isinstance(values, list):
            errors += 1
            continue
        for item in values:
            errors = _ONEKE_ITEMS[task](records, errors, key, item)
    return Parsed(records, errors)


def _oneke_relation(records, errors, relation, item):
    if not isinstance(item, dict):
        return errors + 1
    lowered = {str(k).lower(): v for k, v in item.items()}
    head = lowered.get("subject", lowered.get("head"))
    tail = lowered.get("object", lowered.get("tail"))
    if not isinstance(head, str) or not isinstance(tail, str):
        return errors + 1
    return _collect(records, errors, [head.strip(), relation, tail.strip()])


def _oneke_entity(records, errors, kind, item):
    if not isinstance(item, str):
        return errors + 1
    return _collect(records, errors, [item.strip(), kind])


def _oneke_event(records, errors, kind, item):
    if not isinstance(item, dict) or not isinstance(item.get("trigger", ""), str):
        return errors + 1
    found = item.get("arguments") or {}
    if _is_nan(found):
        found = {}
    if not isinstance(found, dict):
        return errors + 1
    arguments = []
    for role, values in found.items():
        for value in values if isinstance(values, list) else [values]:
            if not isinstance(value, str) or not value.strip():
                errors += 1
            elif not _is_nan(value):
                arguments.append((value.strip(), role))
    trigger = item.get("trigger", "").strip()
    if _is_nan(trigger) and not arguments:
        return errors
    records.append((kind, trigger, tuple(arguments)))
    return errors


_ONEKE_ITEMS = {"re": _oneke_relation, "ner": _oneke_entity, "ee": _oneke_event}


# ---- lenient JSON ---------------------------------------------------------------------------------------------

_OUTSIDE_STRINGS = {"，": ",", "：": ":", "“": '"', "”": '"'}


def loads_lenient(text):
    """``(value, repaired)``: the first JSON object in ``text``, ignoring prose around it.

    Chinese punctuation outside strings, curly quotes, trailing commas and Python quoting are accepted as they
    are; an object cut off by the token limit is closed after its last complete value and ``repaired`` is True.
    ``(None, True)`` when there is no object to be read.
    """
    start = text.find("{")
    if start < 0:
        return None, True
    decoder = json.JSONDecoder()
    normal = _normalize(text[start:])
    for candidate in (text[start:], normal):
        try:
            return decoder.raw_decode(candidate)[0], False
        except (json.JSONDecodeError, RecursionError):
            pass
    literal = _literal(text[start:text.rfind("}") + 1])
    if isinstance(literal, dict):
        return literal, False
    return _close_truncated(normal), True


def _normalize(text):
    out, in_string, escaped = [], False, False
    for char in text:
        if in_string:
            if escaped:
                escaped = False
            elif char == "\\":
                escaped = True
            elif char in '"“”':
                in_string, char = False, '"'
        elif char in '"“”':
            in_string, char = True, '"'
        else:
            char = _OUTSIDE_STRINGS.get(char, char)
            if char in "}]":
                _drop_trailing_comma(out)
        out.append(char)
    return "".join(out)


def _drop_trailing_comma(out):
    i = len(out) - 1
    while i >= 0 and out[i].isspace():
        i -= 1
    if i >= 0 and out[i] == ",":
        del out[i]


_CLOSERS = {"{": "}", "[": "]"}
_MAX_CUTS = 200  # tries from the end; enough for any answer that was cut off, bounded for garbage


def _close_truncated(text):
    """Cut ``text`` (starting at "{") after its last complete value and close what is open, or ``None``.

    Cuts fall after a closed object or list, after an opened list, or after a string inside a list: never inside
    an object, where the cut would leave half an item (a subject without its object).
    """
    cuts, stack, in_string, escaped = [(0, ("}",))], [], False, False
    for i, char in enumerate(text):
        if in_string:
            if escaped:
                escaped = False
            elif char == "\\":
                escaped = True
            elif char == '"':
                in_string = False
                if stack[-1:] == ["]"]:
                    cuts.append((i, tuple(stack)))
            continue
        if char == '"':
            in_string = True
        elif char in _CLOSERS:
            stack.append(_CLOSERS[char])
            if char == "[":
                cuts.append((i, tuple(stack)))
        elif char in "}]" and stack:
            stack.pop()
            cuts.append((i, tuple(stack)))
    for i, open_ in reversed(cuts[-_MAX_CUTS:]):
        try:
            value = json.loads(text[:i + 1] + "".join(reversed(open_)))
        except (json.JSONDecodeError, RecursionError):
            continue
        if isinstance(value, dict):
            return value
    return None
