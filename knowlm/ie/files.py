"""Reading the user's files: every problem is one ``KnowLMError`` line naming the file (and line) at fault."""
import json
from pathlib import Path

from knowlm.errors import KnowLMError
from knowlm.files import atomic_write, read_text


def read_jsonl(path, what):
    """Yield ``(line_number, object)`` for each non-blank line of the JSONL file ``path`` (``what`` it holds)."""
    path = Path(path)
    if not path.is_file():
        raise KnowLMError(f"{path}: not found; expected a JSONL file of {what}")
    with path.open(encoding="utf-8") as lines:
        for number, line in _decoded(path, lines):
            if not line.strip():
                continue
            try:
                value = json.loads(line)
            except json.JSONDecodeError as err:
                raise KnowLMError(f"{path}:{number}: invalid JSON ({err.msg}, column {err.colno})") from None
            if not isinstance(value, dict):
                raise KnowLMError(f"{path}:{number}: expected a JSON object of {what}, got {type(value).__name__}")
            yield number, value


def _decoded(path, lines):
    number = 0
    try:
        for number, line in enumerate(lines, 1):
            yield number, line
    except UnicodeDecodeError as err:
        raise KnowLMError(f"{path}:{number + 1}: not UTF-8 text ({err.reason}); expected UTF-8 JSONL") from None


def record_key(record, where):
    """``(source, id)``: how IEPile matches predictions to gold, and regroups the prompts of one record."""
    iid = record.get("id")
    if not isinstance(iid, (str, int)) or isinstance(iid, bool):
        raise KnowLMError(f"{where}: expected an 'id' (string or integer), got {json.dumps(iid)}")
    return str(record.get("source", "")), str(iid)


def record_text(record, where):
    text = record.get("text")
    if not isinstance(text, str):
        raise KnowLMError(f"{where}: expected a 'text' string, got {json.dumps(text, ensure_ascii=False)[:60]}")
    return text


def load_schema(path, task):
    """A schema file: a JSON list of schema items, or ``{"zh": [...], "en": [...]}`` with one list per language.

    Items are names for ``re`` (relations) and ``ner`` (entity types), ``{"event_type", "arguments": [roles]}``
    objects for ``ee``.
    """
    path = Path(path)
    try:
        schema = json.loads(read_text(path, f"a schema file: a JSON list of {_ITEM[task]}"))
    except json.JSONDecodeError as err:
        raise KnowLMError(f"{path}:{err.lineno}: invalid JSON ({err.msg})") from None
    return check_schema(schema, task, path)


def check_schema(schema, task, where):
    """``schema`` (what a schema file holds, parsed), if it is one for ``task``; else ``KnowLMError`` naming
    ``where``."""
    lists = schema.values() if isinstance(schema, dict) and schema else [schema]
    for items in lists:
        if not isinstance(items, list) or not items or not all(_valid_item(task, item) for item in items):
            raise KnowLMError(f"{where}: expected a non-empty JSON list of {_ITEM[task]}, or an object of such "
                              "lists keyed by language (zh, en)")
    return schema


_ITEM = {"re": "relation names", "ner": "entity type names",
         "ee": 'events {"event_type": name, "arguments": [role names]}'}


def _valid_item(task, item):
    if task != "ee":
        return isinstance(item, str) and item != ""
    return (isinstance(item, dict) and isinstance(item.get("event_type"), str)
            and isinstance(item.get("arguments"), list) and all(isinstance(r, str) for r in item["arguments"]))


def schema_for(schema, language, where):
    """The schema list for ``language`` from what ``load_schema`` returned."""
    if isinstance(schema, list):
        return schema
    if language not in schema:
        raise KnowLMError(f"{where}: the schema has lists for {', '.join(schema)}, none for language {language!r}")
    return schema[language]


def write_jsonl(path, rows):
    """Write ``rows`` as JSONL, atomically (``knowlm.files.atomic_write``)."""
    def write(tmp):
        with tmp.open("w", encoding="utf-8") as out:
            for row in rows:
                out.write(json.dumps(row, ensure_ascii=False) + "\n")
    return atomic_write(path, write)
