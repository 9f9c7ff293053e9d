"""``knowlm kg2instruct``: relation-extraction instruction data from knowledge-graph triples and their sentences.

Input: InstructIE records ``{id, text, relation: [{head, relation, tail, ...}], [lang], [source]}``. For each
record, the relations asked about are its own plus negatives drawn as IEPile draws them (``ie2instruction``
processer: each other relation of the record's language with probability ``neg_ratio``, at least one when the
record has none of its own), shuffled and split into prompts of ``split_num``. A prompt's answer lists the
record's triples of the relations it asks about, in text order: ``NAN`` (knowlm) or empty lists (oneke) where
there are none, which is how a model learns to say so.

Output lines are Alpaca-style ``{instruction, input, output}`` for ``knowlm prepare-data``, with ``id``,
``source``, ``lang``, ``task`` and the ``schema`` asked about kept for tracing a sample to its record.
"""
import random

from knowlm.errors import KnowLMError
from knowlm.files import refuse_output
from knowlm.ie.files import load_schema, read_jsonl, record_key, record_text, schema_for, write_jsonl
from knowlm.ie.formats import render
from knowlm.ie.prompts import FAMILY_DEFAULTS, SPLIT_NUM, build_prompt, check_family, split_schema, template_count
from knowlm.ie.records import check_language, language_of, to_tuples

TASK = "re"


def kg2instruct(records, family="knowlm", language="auto", template=0, fmt=None, split_num=None, neg_ratio=1.0,
                schema=None, seed=42):
    """Instruction samples for ``records`` (dicts with ``id``, ``text`` and ``relation`` items).

    ``template``: a template number, or ``"random"`` for one drawn per sample; ``schema``: the relations (a
    list, or ``{language: list}``) to ask about, by default every relation the records of that language use.
    The same arguments and seed give the same samples.
    """
    check_family(family)
    check_language(language)
    if not 0 <= neg_ratio <= 1:
        raise KnowLMError(f"negative ratio {neg_ratio}: expected a probability between 0 and 1")
    fmt = fmt or FAMILY_DEFAULTS[family]["format"]
    size = SPLIT_NUM[TASK] if split_num is None else split_num
    rng = random.Random(seed)
    languages = [language_of(record) if language == "auto" else language for record in records]
    if schema is None:
        schema = {lang: sorted({item["relation"] for record, record_lang in zip(records, languages)
                                if record_lang == lang for item in record["relation"]})
                  for lang in set(languages)}
    samples = []
    for record, lang in zip(records, languages):
        relations = schema_for(schema, lang, "schema")
        text = record["text"]
        # IEPile drops repeated triples of a record; answers list them in the order the text states them.
        triples = sorted(dict.fromkeys(to_tuples(TASK, record["relation"], f"record {record['id']}")),
                         key=lambda t: (text.find(t[0]), text.find(t[2])))
        positives = sorted({relation for _, relation, _ in triples if relation in relations})
        negatives = [relation for relation in relations if relation not in positives]
        count = sum(rng.random() < neg_ratio for _ in relations)
        if not positives:
            count = max(count, 1)
        asked = positives + rng.sample(negatives, min(count, len(negatives)))
        rng.shuffle(asked)
        for group in split_schema(asked, size):
            number = rng.randrange(template_count(TASK, lang)) if template == "random" else template
            prompt = build_prompt(TASK, text, group, family, lang, number, fmt)
            answer = render(TASK, [t for t in triples if t[1] in group], fmt, lang, group)
            samples.append({"id": record["id"], **({"source": record["source"]} if "source" in record else {}),
                            "lang": lang, "task": TASK, "schema": group, "instruction": prompt.instruction,
                            "input": prompt.input, "output": answer})
    return samples


def read_instructie(path):
    """The InstructIE records of a JSONL file, each checked for ``id``, ``text`` and well-formed ``relation``."""
    records = []
    for number, record in read_jsonl(path, "InstructIE records with 'id', 'text' and 'relation'"):
        where = f"{path}:{number}"
        record_key(record, where)
        record_text(record, where)
        to_tuples(TASK, record.get("relation"), where)
        records.append(record)
    return records


def kg2instruct_file(input_path, output_path, schema_path=None, force=False, **options):
    """``kg2instruct`` from and to JSONL files; returns the number of samples written. An existing output is
    replaced only with ``force``, and never when it is the input."""
    refuse_output(output_path, force, input_path)
    schema = load_schema(schema_path, TASK) if schema_path else None
    samples = kg2instruct(read_instructie(input_path), schema=schema, **options)
    write_jsonl(output_path, samples)
    return len(samples)
