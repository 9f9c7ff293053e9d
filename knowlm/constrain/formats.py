"""The grammar of a valid answer, per task and answer format, for one prompt: its schema items and its input text.

- KnowLM tuples (``knowlm.ie.formats``' ``tuple`` style): ``NAN``, or tuples joined by ``,``:
  ``(head, relation, tail)`` (RE) / ``(entity, type)`` (NER), the separator ``", "`` in English and ``","`` in
  Chinese, as ``render`` writes them; an empty schema group allows only ``NAN``; spans hold no bracket of the
  format and no comma (ASCII or full-width), so every answer splits into its fields one way.
- OneKE (``oneke``): the JSON object IEPile's converter writes, every schema item a key in schema order, RE
  ``{"rel": [{"subject": "...", "object": "..."}, ...], ...}``, NER ``{"type": ["...", ...], ...}``; ``json.dumps``'
  separators; spans hold no ``"``, ``\\`` or control character (they would need escapes).

Names (relations, entity types) come only from the schema; heads, tails and entities only from the input text.
"""
from knowlm.constrain.automaton import Grammar, Literal, OneOf, span_of
from knowlm.errors import KnowLMError
from knowlm.ie.formats import FORMATS, NAN

TASKS = ("re", "ner")
_JSON_UNSAFE = frozenset('"\\') | frozenset(map(chr, range(0x20)))
_SEPARATORS = frozenset(",，")             # knowlm.ie.parse splits tuple fields at either


def answer_grammar(task, fmt, language, schema, text) -> Grammar:
    if task not in TASKS:
        raise KnowLMError(f"--constrained: task {task!r} is not supported; expected {' or '.join(TASKS)}")
    spec = FORMATS[task].get(fmt)
    if spec is None or spec.style not in ("tuple", "oneke"):
        raise KnowLMError(f"--constrained: answer format {fmt!r} is not supported; expected a tuple format or oneke")
    # Stripped: a span may not end on a blank, so one that reached trailing blanks could neither end nor go on.
    text = text.strip()
    names = [str(item) for item in schema]
    if spec.style == "oneke":
        return _oneke(task, names, span_of(text, _JSON_UNSAFE))
    span = span_of(text, frozenset(spec.brackets) | _SEPARATORS)
    return _tuples(task, names, span, spec.brackets,
                   "," if language == "zh" else ", ")


def _chain(grammar, source, elements, target=None):
    """``elements`` one after another from ``source``; returns the last node (``target`` if given)."""
    node = source
    for i, element in enumerate(elements):
        following = target if target is not None and i == len(elements) - 1 else grammar.node()
        grammar.add(node, _element(element), following)
        node = following
    return node


def _element(element):
    return Literal(element.encode("utf-8")) if isinstance(element, str) else element


def _tuples(task, names, span, brackets, separator):
    grammar = Grammar()
    done = grammar.node()
    grammar.add(0, Literal(NAN.encode()), done)
    grammar.accept.add(done)
    if not names:
        return grammar
    label = OneOf(tuple(name.encode("utf-8") for name in names))
    fields = [span, separator, label, separator, span] if task == "re" else [span, separator, label]
    opening = grammar.node()
    grammar.add(0, Literal(brackets[0].encode()), opening)
    closed = _chain(grammar, opening, fields + [brackets[1]])
    grammar.accept.add(closed)
    grammar.add(closed, Literal(("," + brackets[0]).encode()), opening)
    return grammar


def _oneke(task, names, span):
    grammar = Grammar()
    node = _chain(grammar, 0, ["{"])
    for number, name in enumerate(names):
        key = ("" if number == 0 else ", ") + f'"{_json_key(name)}": ['
        node = _chain(grammar, node, [key])
        item = ['{"subject": "', span, '", "object": "', span, '"}'] if task == "re" else ['"', span, '"']
        closed = grammar.node()
        grammar.add(node, Literal(b"]"), closed)                 # no item of this kind
        last = _chain(grammar, node, item)                      # the first item
        more = grammar.node()
        grammar.add(last, Literal(b", "), more)
        _chain(grammar, more, item, target=last)                # each further one
        grammar.add(last, Literal(b"]"), closed)
        node = closed
    grammar.accept.add(_chain(grammar, node, ["}"]))
    return grammar


def _json_key(name):
    import json
    return json.dumps(name, ensure_ascii=False)[1:-1]
