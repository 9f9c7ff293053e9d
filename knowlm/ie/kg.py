"""The small knowledge graph shipped with knowlm, and the relation-extraction data made from it.

``graph.json`` was written for this project: invented people, places, organisations and works (so no fact in it
can be wrong, and no pretrained model knows them) with Chinese and English names, triples over eight relations,
and per relation sentence and clause templates in both languages. Entities marked ``held_out`` and the triples
between them form the test split; its entities appear in no training sentence.

``build`` (``python -m knowlm.ie.kg``) writes next to it:

=======================  =================================================================================
``train_records.jsonl``  InstructIE records of the training triples: ``kg2instruct``'s input
``train.jsonl``          instruction samples made by ``kg2instruct`` (knowlm family, template 0, tuple format)
``test.jsonl``           held-out InstructIE records: ``knowlm extract``'s input, ``knowlm evaluate``'s gold
``schema.json``          the relation names per language, for ``knowlm extract --schema``
=======================  =================================================================================
"""
import json
import random
import sys
from pathlib import Path

from knowlm.errors import KnowLMError
from knowlm.ie.files import write_jsonl
from knowlm.ie.kg2instruct import kg2instruct
from knowlm.ie.records import LANGUAGES

KG_DIR = Path(__file__).resolve().parent.parent / "assets" / "kg"
GRAPH = KG_DIR / "graph.json"
TRAIN_RECORDS, TRAIN, TEST, SCHEMA = (KG_DIR / name for name in
                                      ("train_records.jsonl", "train.jsonl", "test.jsonl", "schema.json"))
SEED = 0


def split_triples(graph):
    """``{"train": triples, "test": triples}``: a triple is held out when its entities are."""
    splits = {"train": [], "test": []}
    for head, relation, tail in graph["triples"]:
        held_out = {graph["entities"][name].get("held_out", False) for name in (head, tail)}
        if len(held_out) != 1:
            raise KnowLMError(f"{GRAPH}: triple ({head}, {relation}, {tail}) joins a held-out entity to a "
                              "training one; the test split must share no entity with training")
        splits["test" if held_out.pop() else "train"].append((head, relation, tail))
    return splits


def sentences(graph, triples, language, rng):
    """``(text, triples it states)``: each triple in a sentence of its own, then each head's triples together."""
    entities, relations = graph["entities"], graph["relations"]
    out = []
    for head, relation, tail in triples:
        template = rng.choice(relations[relation]["sentences"][language])
        out.append((template.format(head=entities[head][language], tail=entities[tail][language]),
                    [(head, relation, tail)]))
    by_head = {}
    for triple in triples:
        by_head.setdefault(triple[0], []).append(triple)
    for head, group in by_head.items():
        if len(group) < 2:
            continue
        clauses = [relations[r]["clauses"][language].format(tail=entities[t][language]) for _, r, t in group]
        if language == "zh":
            text = entities[head]["zh"] + "，".join(clauses) + "。"
        else:
            text = f"{entities[head]['en']} {', '.join(clauses[:-1])} and {clauses[-1]}."
        out.append((text, group))
    return out


def records(graph, seed=SEED):
    """``{"train": [...], "test": [...]}`` InstructIE records in both languages."""
    rng = random.Random(seed)
    entities, relations, types = graph["entities"], graph["relations"], graph["types"]
    out = {}
    for split, triples in split_triples(graph).items():
        out[split] = []
        for language in LANGUAGES:
            for text, stated in sentences(graph, triples, language, rng):
                items = [{"head": entities[h][language], "head_type": types[entities[h]["type"]][language],
                          "relation": relations[r][language],
                          "tail": entities[t][language], "tail_type": types[entities[t]["type"]][language]}
                         for h, r, t in stated]
                if not all(item["head"] in text and item["tail"] in text for item in items):
                    raise KnowLMError(f"{GRAPH}: sentence {text!r} does not name every entity of its triples")
                out[split].append({"id": f"{split}-{language}-{len(out[split]) + 1:03d}", "lang": language,
                                   "text": text, "relation": items})
    return out


def build(out_dir=KG_DIR, graph_path=GRAPH):
    """Write the files listed in the module docstring into ``out_dir``."""
    out_dir = Path(out_dir)
    graph = json.loads(Path(graph_path).read_text(encoding="utf-8"))
    data = records(graph)
    schema = {language: [relation[language] for relation in graph["relations"].values()] for language in LANGUAGES}
    write_jsonl(out_dir / TRAIN_RECORDS.name, data["train"])
    write_jsonl(out_dir / TEST.name, data["test"])
    write_jsonl(out_dir / TRAIN.name, kg2instruct(data["train"], family="knowlm", template=0, schema=schema,
                                                  seed=SEED))
    (out_dir / SCHEMA.name).write_text(json.dumps(schema, ensure_ascii=False, indent=2) + "\n", encoding="utf-8")


if __name__ == "__main__":
    build(*sys.argv[1:2])
