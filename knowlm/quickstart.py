"""``knowlm quickstart``: the whole KnowLM workflow end to end on a built-in default, on CPU, in minutes.

Nothing is downloaded and no user file is needed. Every stage uses the real code path a 13B user runs:

1. tokenizer: a SentencePiece model trained on the shipped corpus and knowledge-graph data;
2. model: a small LLaMA-architecture model made with Hugging Face ``transformers`` and saved in its format;
3. convert: ``knowlm convert`` (Hugging Face -> knowlm model directory);
4. data: ``kg2instruct`` over the shipped knowledge graph's training triples, then ``prepare-data``;
5. extract + evaluate on the held-out split (entities never seen in training): triple F1 *before* training;
6. finetune: MindFormers' Trainer (``configs/tiny/finetune_full.yaml``), then extract + evaluate *after*.

The model starts from random weights (no pretrained model can be downloaded here), so it is trained in full
rather than with LoRA, and the shipped graph's ~100 training sentences are joined by sentences about invented
names (random syllables) over the same relations and templates: with only the graph's few dozen entities a
model memorises them, while with many names it has to learn to copy the entities out of the input, which is
what the held-out split measures. The scores are whatever comes out of the run.
"""
import json
import random
import shutil
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

from knowlm.configs import CONFIG_DIR
from knowlm.errors import KnowLMError

# Small enough to train in about two minutes on 2 CPU cores, large enough to learn to copy entity names.
MODEL = dict(hidden_size=128, num_hidden_layers=4, num_attention_heads=4, num_key_value_heads=4,
             intermediate_size=352, max_position_embeddings=256, rms_norm_eps=1e-6, rope_theta=10000.0)
VOCAB_SIZE = 3000
SEQ_LENGTH = 256
TEMPLATE = 1            # the shortest KnowLM-IE template in both languages
FULL_FINETUNE = CONFIG_DIR / "tiny" / "finetune_full.yaml"

_ZH_CHARS = "安白北碧长辰川春丹东方风峰枫光海寒禾和华怀嘉江金锦景静兰岚澜蓝黎林灵柳龙鹿绿明木南宁平青清秋泉荣瑞山" \
            "石书松苏桃天桐望文溪霞晓星秀雪言阳瑶叶宜逸银英雨玉远云泽哲振之竹紫"
_ZH_SURNAMES = "王李张刘陈杨赵黄周吴徐孙胡朱高林何郭马罗梁宋郑谢韩唐冯于董萧程曹袁邓许傅沈曾彭吕"
_EN_SYLLABLES = ["al", "an", "bar", "bel", "cor", "dan", "del", "dor", "el", "fen", "gar", "hal", "is", "jor", "kel",
                 "lan", "lor", "mar", "mel", "mor", "nor", "or", "pel", "quin", "ran", "ros", "sal", "sel", "tor",
                 "val", "ven", "wen", "wil", "yor", "zan"]
# type -> (Chinese pattern, English pattern); {n} is a generated name.
_NAME_PATTERNS = {
    "person": ("{surname}{n}", "{first} {last}"),
    "city": ("{n}", "{n}"),
    "country": ("{n}国", "{n}"),
    "university": ("{n}大学", "{n} University"),
    "organisation": ("{n}科技", "{n} Technology"),
    "book": ("《{n}》", "The {n} Letters"),
    "film": ("《{n}》", "The {n} Road"),
}


def invented_name(kind, language, rng):
    """A random name of entity type ``kind`` (one of the graph's types) in ``language``."""
    zh, en = _NAME_PATTERNS[kind]
    if language == "zh":
        return zh.format(surname=rng.choice(_ZH_SURNAMES), n="".join(rng.choices(_ZH_CHARS, k=rng.randint(2, 3))))

    def word():
        return "".join(rng.choices(_EN_SYLLABLES, k=rng.randint(2, 3))).capitalize()
    return en.format(first=word(), last=word(), n=word())


def invented_records(graph, count, rng):
    """InstructIE records of ``count`` sentences stating one triple between invented names each."""
    entities, relations = graph["entities"], graph["relations"]
    signatures = sorted({(relation, entities[head]["type"], entities[tail]["type"])
                         for head, relation, tail in graph["triples"]})
    records = []
    for number in range(count):
        relation, head_type, tail_type = rng.choice(signatures)
        language = ("zh", "en")[number % 2]
        head, tail = invented_name(head_type, language, rng), invented_name(tail_type, language, rng)
        if head == tail:
            continue
        template = rng.choice(relations[relation]["sentences"][language])
        records.append({"id": f"invented-{language}-{number:04d}", "lang": language,
                        "text": template.format(head=head, tail=tail),
                        "relation": [{"head": head, "relation": relations[relation][language], "tail": tail}]})
    return records


@dataclass
class QuickstartResult:
    before: dict          # evaluate() scores of the converted, untrained model
    after: dict           # ... and of the fine-tuned one
    examples: list        # (text, gold triples, predicted triples) of a few held-out records after training
    workdir: Path
    seconds: float


def _stage(number, text):
    print(f"[{number}/6] {text}", flush=True)


def quickstart(workdir=None, steps=600, invented=1200, batch_size=8, seed=0, keep=False):
    """Run the six stages in ``workdir`` (a temporary folder unless given); returns a ``QuickstartResult``."""
    # Heavy imports here: `knowlm --help` stays fast.
    import mindspore as ms  # pylint: disable=import-outside-toplevel
    import torch  # pylint: disable=import-outside-toplevel
    import transformers  # pylint: disable=import-outside-toplevel
    from knowlm.convert import convert_checkpoint  # pylint: disable=import-outside-toplevel
    from knowlm.data import prepare_data  # pylint: disable=import-outside-toplevel
    from knowlm.ie.evaluate import evaluate  # pylint: disable=import-outside-toplevel
    from knowlm.ie.extract import extract_file, model_generator  # pylint: disable=import-outside-toplevel
    from knowlm.ie.files import write_jsonl  # pylint: disable=import-outside-toplevel
    from knowlm.ie.kg import GRAPH, SCHEMA, TEST, TRAIN_RECORDS  # pylint: disable=import-outside-toplevel
    from knowlm.ie.kg2instruct import kg2instruct, read_records  # pylint: disable=import-outside-toplevel
    from knowlm.pretrained import save_pretrained  # pylint: disable=import-outside-toplevel
    from knowlm.tokenizer import BUILTIN_CORPUS, KnowLMTokenizer, train_tokenizer  # pylint: disable=import-outside-toplevel
    from knowlm.train import finetune  # pylint: disable=import-outside-toplevel

    started = time.perf_counter()
    temporary = workdir is None
    workdir = Path(tempfile.mkdtemp(prefix="knowlm-quickstart-") if temporary else workdir)
    if not temporary and any(workdir.glob("*")):
        raise KnowLMError(f"{workdir}: not empty; quickstart needs an empty or new folder")
    workdir.mkdir(parents=True, exist_ok=True)
    rng = random.Random(seed)
    graph = json.loads(GRAPH.read_text(encoding="utf-8"))
    records = read_records(TRAIN_RECORDS) + invented_records(graph, invented, rng)
    samples = kg2instruct(records, template=TEMPLATE, split_num=len(graph["relations"]), neg_ratio=0.5, seed=seed)
    write_jsonl(workdir / "train.jsonl", samples)

    _stage(1, f"tokenizer: SentencePiece, {VOCAB_SIZE} pieces, trained on the shipped corpus and training data")
    texts = BUILTIN_CORPUS.read_text(encoding="utf-8").splitlines() + \
        [text for sample in samples for text in (sample["instruction"], sample["input"], sample["output"])]
    tokenizer_file = train_tokenizer(texts, workdir / "tokenizer.model", VOCAB_SIZE)

    _stage(2, "model: LLaMA architecture in Hugging Face format, random weights "
              f"(hidden {MODEL['hidden_size']}, {MODEL['num_hidden_layers']} layers)")
    torch.manual_seed(seed)
    hf_dir = workdir / "hf"
    transformers.LlamaForCausalLM(transformers.LlamaConfig(vocab_size=VOCAB_SIZE, **MODEL)).save_pretrained(hf_dir)
    shutil.copyfile(tokenizer_file, hf_dir / "tokenizer.model")

    _stage(3, "convert: Hugging Face -> knowlm model directory")
    base = workdir / "model"
    convert_checkpoint(hf_dir, base)

    def score(model_dir, name):
        predictions = workdir / f"{name}.jsonl"
        generate = model_generator(str(model_dir), batch_size, max_new_tokens=40)
        extract_file(generate, TEST, predictions, "re", SCHEMA, batch_size=batch_size, template=TEMPLATE,
                     split_num=len(graph["relations"]))
        return evaluate(predictions, TEST), predictions

    _stage(4, "extract + evaluate the held-out split before training")
    before, _ = score(base, "before")

    _stage(5, f"finetune: {steps} steps of full fine-tuning on {len(samples)} samples "
              f"({len(records)} sentences)")
    tokenizer = KnowLMTokenizer(vocab_file=str(base))
    data = prepare_data(workdir / "train.jsonl", tokenizer, workdir / "train.mindrecord", SEQ_LENGTH)
    ms.set_seed(seed)
    result = finetune(FULL_FINETUNE, data=workdir / "train.mindrecord", base=base, output_dir=workdir / "train",
                      max_steps=steps, overrides={
                          "runner_config.epochs": 1000, "runner_config.batch_size": batch_size,
                          "train_dataset.batch_size": batch_size, "model.model_config.batch_size": batch_size,
                          "model.model_config.seq_length": SEQ_LENGTH, "lr_schedule.learning_rate": 5.0e-3,
                          "lr_schedule.warmup_ratio": 0.05, "knowlm.save_every": steps, "knowlm.log_every": 100,
                          **_model_overrides(base)})
    trained = save_pretrained(result.model, workdir / "trained", tokenizer_file)

    _stage(6, "extract + evaluate the held-out split after training")
    after, predictions = score(trained, "after")
    gold = {record["id"]: record["relation"] for record in read_records(TEST)}
    examples = [(line["text"], gold[line["id"]], line["relation"]) for line in
                map(json.loads, predictions.read_text(encoding="utf-8").splitlines()[::7])]
    outcome = QuickstartResult(before, after, examples, workdir, time.perf_counter() - started)
    if data.truncated:
        print(f"note: {data.truncated} training samples were truncated to {SEQ_LENGTH} tokens")
    if temporary and not keep:
        shutil.rmtree(workdir, ignore_errors=True)
    return outcome


def _model_overrides(model_dir):
    # The finetune yaml describes the tiny preset; the quickstart model's shape comes from its converted config.
    config = json.loads((Path(model_dir) / "config.json").read_text(encoding="utf-8"))
    keys = ("hidden_size", "num_layers", "num_heads", "n_kv_heads", "intermediate_size", "vocab_size",
            "rms_norm_eps", "theta", "max_position_embedding")
    return {f"model.model_config.{key}": config[key] for key in keys if config.get(key) is not None}


def _triples(items):
    return "; ".join(f"({t['head']}, {t['relation']}, {t['tail']})" for t in items) or "-"


def report(result: QuickstartResult) -> str:
    """The table and examples ``knowlm quickstart`` prints."""
    lines = ["", "held-out relation extraction (entities unseen in training), triple-level micro scores:",
             f"{'':8}{'P':>8}{'R':>8}{'F1':>8}{'gold':>7}{'pred':>7}{'correct':>9}{'unparsable':>12}"]
    for name, scores in (("before", result.before), ("after", result.after)):
        total, triple = scores["total"], scores["total"]["triple"]
        lines.append(f"{name:8}{triple['precision']:8.2f}{triple['recall']:8.2f}{triple['f1']:8.2f}"
                     f"{triple['gold']:7}{triple['predicted']:7}{triple['correct']:9}{total['unparsable']:12}")
    lines.append("")
    lines.append("examples after training:")
    for text, gold, predicted in result.examples:
        lines += [f"  text: {text}", f"    gold:      {_triples(gold)}", f"    predicted: {_triples(predicted)}"]
    lines.append("")
    lines.append(f"quickstart: F1 {result.before['total']['triple']['f1']:.2f} -> "
                 f"{result.after['total']['triple']['f1']:.2f} in {result.seconds:.0f}s"
                 + (f"; files in {result.workdir}" if result.workdir.exists() else ""))
    return "\n".join(lines)
