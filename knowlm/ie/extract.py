"""``knowlm extract``: prompt a model for every record, in batches, and merge each record's answers.

A record's schema is split over several prompts (``knowlm.ie.prompts.split_schema``); prompts of consecutive
records share batches, and a record's result is produced as soon as all of its prompts are answered, so a file
written line by line loses nothing already written when the run stops, and ``resume`` skips those ids.
"""
import json
from collections import deque
from pathlib import Path

from knowlm.errors import KnowLMError
from knowlm.ie.files import load_schema, read_jsonl, record_key, record_text, schema_for
from knowlm.constrain.formats import answer_grammar
from knowlm.ie.parse import merge, parse, run_on
from knowlm.ie.prompts import FAMILY_DEFAULTS, build_prompts, check_family
from knowlm.ie.records import RECORD_KEYS, check_language, check_task, language_of, to_dicts
from knowlm.tokenizer.chat import chat_template


def extract(records, task, schema, generate, family="knowlm", language="auto", template=0, fmt=None,
            split_num=None, chat=None, batch_size=4, constrained=False):
    """A generator of one result per record of the list ``records`` (dicts with ``id`` and ``text``), in order.

    ``schema``: a list of items, or ``{language: list}``; ``generate``: a function from a list of prompt texts
    to the list of their continuations; ``language``: ``auto`` (the record's, see ``language_of``), zh or en.
    A result is ``{id, [source], text, <relation|entity|event>: [...], unparsable, run_on, outputs}``: the merged
    answers, how many of the record's outputs could not be read in full, how many went on after their answer, and
    the raw outputs. The settings are checked for every language the records need before anything is generated.

    ``constrained``: each answer is decoded under its grammar (``knowlm.constrain``): names from the prompt's
    schema items, entities from the record's text, in the answer format; ``generate`` then takes the prompts and
    their grammars.
    """
    check_family(family)
    check_language(language)
    fmt = fmt or FAMILY_DEFAULTS[family]["format"]
    chat = chat or FAMILY_DEFAULTS[family]["chat"]
    if batch_size < 1:
        raise KnowLMError(f"batch size {batch_size}: expected at least 1")
    languages = [language_of(record) if language == "auto" else language for record in records]
    for lang in set(languages):
        build_prompts(task, "", schema_for(schema, lang, "schema"), family, lang, template, fmt, split_num)
        if constrained:
            answer_grammar(task, fmt, lang, schema_for(schema, lang, "schema"), "")
    grammar = (lambda prompt, lang, text: answer_grammar(task, fmt, lang, prompt.schema, text)) if constrained \
        else None
    return _results(records, languages, task, schema, generate, family, template, fmt, split_num,
                    chat_template(chat), batch_size, grammar)


def _results(records, languages, task, schema, generate, family, template, fmt, split_num, chat, batch_size,
             grammar):
    pending = deque()  # (record, prompts, answers) in input order
    queue = []         # (record, its answers, prompt text, its grammar or None) waiting for the model

    def run(count):
        batch, queue[:count] = queue[:count], []
        prompts = [prompt for _, _, prompt, _ in batch]
        try:
            texts = generate(prompts, [g for *_, g in batch]) if grammar else generate(prompts)
        except KnowLMError as err:      # e.g. a prompt too long for the model (knowlm.generate.PromptTooLong)
            if getattr(err, "index", None) is None:
                raise
            raise RecordError(batch[err.index][0], str(err)) from None
        for (_, answers, _, _), text in zip(batch, texts):
            answers.append(chat.answer(text))

    def finished():
        while pending and len(pending[0][2]) == len(pending[0][1]):
            yield _result(task, fmt, *pending.popleft())

    for record, lang in zip(records, languages):
        prompts = build_prompts(task, record["text"], schema_for(schema, lang, "schema"), family, lang, template,
                                fmt, split_num)
        answers = []
        pending.append((record, prompts, answers))
        queue.extend((record, answers, chat.render(prompt.instruction, prompt.input),
                      grammar(prompt, lang, record["text"]) if grammar else None) for prompt in prompts)
        while len(queue) >= batch_size:
            run(batch_size)
            yield from finished()
    while queue:
        run(batch_size)
        yield from finished()


class RecordError(KnowLMError):
    """A failure that belongs to one input record."""

    def __init__(self, record, message):
        super().__init__(message)
        self.record = record


def _result(task, fmt, record, prompts, answers):
    parts = [parse(task, answer, fmt, prompt.schema) for prompt, answer in zip(prompts, answers)]
    return {"id": record["id"], **({"source": record["source"]} if "source" in record else {}),
            "text": record["text"], RECORD_KEYS[task]: to_dicts(task, merge(parts).records),
            "unparsable": sum(1 for part in parts if part.errors),
            "run_on": sum(run_on(task, answer, fmt) for answer in answers), "outputs": answers}


def extract_file(generate, input_path, output_path, task, schema_path, resume=False, language="auto", **options):
    """Run ``extract`` over the JSONL records of ``input_path``, appending one line per record to
    ``output_path`` (flushed as written). Returns ``(written, skipped)``.

    Everything about the input is checked before the first prompt. An existing output is continued only with
    ``resume``: ids already in it are skipped and a line cut off by a crash is dropped.
    """
    check_task(task)
    schema = load_schema(schema_path, task)
    records = _read_inputs(input_path)
    check_language(language)
    for where, record in records:
        schema_for(schema, language_of(record) if language == "auto" else language, f"{schema_path} ({where})")
    output = Path(output_path)
    if output.resolve() == Path(input_path).resolve():
        raise KnowLMError(f"{output}: is the input file; choose another output file")
    done = set()
    if output.exists():
        if not resume:
            raise KnowLMError(f"{output}: already exists; pass --resume to continue it, or remove it")
        done = _completed_keys(output)
        inputs = {record_key(record, where) for where, record in records}
        if done - inputs:
            source, iid = sorted(done - inputs)[0]
            raise KnowLMError(f"{output}: holds results for ids not in {input_path} (e.g. {iid!r}"
                              f"{f' of source {source!r}' if source else ''}): it is another run's output; "
                              "choose another output file")
    todo = [record for where, record in records if record_key(record, where) not in done]
    where_of = {id(record): where for where, record in records}
    written, out = 0, None
    try:
        for result in _located(extract(todo, task, schema, generate, language=language, **options), where_of):
            # Opened at the first result: a run that fails to start (e.g. its model does not load) leaves no file.
            out = out or output.open("a", encoding="utf-8")
            out.write(json.dumps(result, ensure_ascii=False) + "\n")
            out.flush()
            written += 1
    finally:
        if out:
            out.close()
    return written, len(records) - len(todo)


def _located(results, where_of):
    """``results``, with a failure of one record told by its input line and id."""
    try:
        yield from results
    except RecordError as err:
        raise KnowLMError(f"{where_of[id(err.record)]} (id {err.record['id']!r}): {err}") from None


def _read_inputs(path):
    records, seen = [], {}
    for number, record in read_jsonl(path, "records with 'id' and 'text'"):
        where = f"{path}:{number}"
        key = record_key(record, where)
        record_text(record, where)
        if key in seen:
            raise KnowLMError(f"{where}: id {key[1]!r} repeats line {seen[key]}; ids must be unique")
        seen[key] = number
        records.append((where, record))
    return records


def _completed_keys(output):
    data = output.read_bytes()
    complete = data.rfind(b"\n") + 1
    if complete < len(data):  # the run stopped mid-line: that record is done again
        with output.open("r+b") as handle:
            handle.truncate(complete)
    return {record_key(record, f"{output}:{number}") for number, record in read_jsonl(output, "extract results")}
