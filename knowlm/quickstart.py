"""``knowlm quickstart``: the whole KnowLM workflow end to end on a built-in default, on CPU, in minutes.

Nothing is downloaded and no user file is needed. Every stage uses the real code path a 13B user runs:

1. tokenizer: a SentencePiece model trained on the shipped corpus and knowledge-graph data;
2. model: a small LLaMA-architecture model made with Hugging Face ``transformers`` and saved in its format;
3. convert: ``knowlm convert`` (Hugging Face -> knowlm model directory);
4. data: ``kg2instruct`` over the shipped knowledge graph's training triples, then ``prepare-data``;
5. extract + evaluate on the held-out split (entities never seen in training): triple F1 *before* training;
6. finetune: MindFormers' Trainer (``knowlm/configs/tiny/finetune_full.yaml``), then extract + evaluate *after*.

The model starts from random weights (no pretrained model can be downloaded here), so it is trained in full
rather than with LoRA, and it must learn to copy entity names out of the input, which a pretrained LLaMA can
already do. Three choices serve that: the shipped graph's ~100 training sentences are joined by sentences about
invented names (common Chinese characters, pinyin and made-up syllables) over the same relations and templates,
so that memorising names does not pay; the tokenizer never merges across a name's edge
(``train_tokenizer(whole_pieces=...)``), so a name is the same tokens in the sentence and in the answer; and the
embeddings are tied, so a copied token's output row is its input row. The tokenizer also keeps the prompts' fixed
wording (Alpaca wrapper, template, relation names) as whole pieces, so a sample is ~45 tokens instead of ~120 and
a step is half as expensive. The scores are whatever comes out.
"""
import json
import random
import shutil
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import mindspore as ms

from knowlm.checkpoints.convert import convert_checkpoint
from knowlm.checkpoints.hf import import_torch
from knowlm.errors import KnowLMError
from knowlm.files import CONFIG_DIR, CONFIG_NAME, TOKENIZER_NAME, read_json
from knowlm.generate import text_generator
from knowlm.ie.evaluate import evaluate
from knowlm.ie.extract import extract_file
from knowlm.ie.files import write_jsonl
from knowlm.ie.kg import GRAPH, SCHEMA, TEST, TRAIN_RECORDS
from knowlm.ie.kg2instruct import kg2instruct, read_instructie
from knowlm.ie.prompts import build_prompt
from knowlm.tokenizer.chat import ALPACA
from knowlm.tokenizer.spm import BUILTIN_CORPUS, KnowLMTokenizer, train_tokenizer
from knowlm.train.data import prepare_data
from knowlm.train.finetune import finetune

# 2500 steps of this model take about 4 minutes on 2 CPU cores (0.094 s/step at 64 tokens). Tied embeddings: a copied
# token's output row is its input row, which is how a model this small copies names it has seen only a few times.
MODEL = dict(hidden_size=128, num_hidden_layers=2, num_attention_heads=2, num_key_value_heads=2,
             intermediate_size=352, max_position_embeddings=256, rms_norm_eps=1e-6, rope_theta=10000.0,
             tie_word_embeddings=True)
VOCAB_SIZE = 5000
SEQ_LENGTH = 64        # ~1 in 500 training samples is longer (and truncated)
MAX_NEW_TOKENS = 64    # a three-triple English answer is ~45 tokens
LEARNING_RATE = 2.0e-3
TEMPLATE = 1            # the shortest KnowLM-IE template in both languages
FULL_FINETUNE = CONFIG_DIR / "tiny" / "finetune_full.yaml"

# Name material: the 3755 level-1 GB2312 characters (the common ones) and pinyin or made-up syllables, so that
# names of the held-out split are made of pieces the model has copied before.
_ZH_CHARS = [bytes([high, low]).decode("gb2312") for high in range(0xB0, 0xD8) for low in range(0xA1, 0xFF)
             if (high, low) < (0xD7, 0xFA)]
_ZH_SURNAMES = "王李张刘陈杨赵黄周吴徐孙胡朱高林何郭马罗梁宋郑谢韩唐冯于董萧程曹袁邓许傅沈曾彭吕"
_PINYIN = ("an bai bei bin chang chen cheng chun da dan dong fang fei feng gao guo hai han hao he hong hua huang "
           "hui jia jian jiang jin jing jun kai lan li lian liang lin ling long lu mei ming mu nan ning peng ping "
           "qi qian qiao qin qing qiu rong rui shan shi shu song tao tian ting tong wan wang wei wen wu xi xia "
           "xiang xiao xin xing xu ya yan yang yao yi yin ying yu yuan yue yun ze zhang zhao zhen zhi zhou zhu").split()
_VOWELS, _CONSONANTS = "aeiou", "bcdfghjklmnprstvwz"
# type -> (Chinese patterns, English patterns); {n} is a generated name.
_NAME_PATTERNS = {
    "person": (("{surname}{n}", "{n}·{n}"), ("{w} {w}",)),
    "city": (("{n}", "{n}湾", "{n}城"), ("{w}", "{w} Bay", "{w} City")),
    "country": (("{n}国", "{n}"), ("{w}",)),
    "university": (("{n}大学", "{n}师范大学"), ("{w} University", "{w} Normal University")),
    "organisation": (("{n}科技", "{n}数据", "{n}"), ("{w} Technology", "{w} Data", "{w}")),
    "book": (("《{n}》", "《{n}的{n}》"), ("The {w} Letters", "{w} and {w}")),
    "film": (("《{n}》", "《最后的{n}》"), ("The {w} Road", "The Last {w}")),
}


def invented_name(kind, language, rng):
    """A random name of entity type ``kind`` (one of the graph's types) in ``language``."""
    zh, en = _NAME_PATTERNS[kind]
    if language == "zh":
        return rng.choice(zh).replace("{surname}", rng.choice(_ZH_SURNAMES)).replace(
            "{n}", "{}").format(*("".join(rng.choices(_ZH_CHARS, k=rng.randint(1, 3))) for _ in range(2)))

    def word():
        if rng.random() < 0.5:
            return "".join(rng.choices(_PINYIN, k=rng.randint(1, 2))).capitalize()
        return "".join(rng.choice(_CONSONANTS) + rng.choice(_VOWELS) + rng.choice(("", "", rng.choice(_CONSONANTS)))
                       for _ in range(rng.randint(1, 3))).capitalize()
    return rng.choice(en).replace("{w}", "{}").format(word(), word())


def invented_records(graph, count, rng):
    """InstructIE records of ``count`` sentences stating one triple between invented names each."""
    entities, relations = graph["entities"], graph["relations"]
    signatures = sorted({(relation, entities[head]["type"], entities[tail]["type"])
                         for head, relation, tail in graph["triples"]})
    taken = {entity[language] for entity in entities.values() for language in ("zh", "en")}
    records = []
    for number in range(count):
        relation, head_type, tail_type = rng.choice(signatures)
        language = ("zh", "en")[number % 2]
        head, tail = invented_name(head_type, language, rng), invented_name(tail_type, language, rng)
        if head == tail or {head, tail} & taken:
            continue
        template = rng.choice(relations[relation]["sentences"][language])
        records.append({"id": f"invented-{language}-{number:04d}", "lang": language,
                        "text": template.format(head=head, tail=tail),
                        "relation": [{"head": head, "relation": relations[relation][language], "tail": tail}]})
    return records


def prompt_pieces(graph):
    """What the quickstart's tokenizer keeps whole: the fixed wording of its prompts and the relation names.

    The wording is the Alpaca wrapper and template ``TEMPLATE`` around the schema list and the input, in both
    languages; a training sample is then ~45 tokens instead of ~120, and a step takes 0.094 s instead of 0.19 s.
    """
    marker = "\x01"
    pieces = ["['", "', '", "']"]
    for language in ("zh", "en"):
        prompt = build_prompt("re", "", [marker], "knowlm", language, TEMPLATE)
        whole = ALPACA.render(prompt.instruction, marker)
        pieces += whole.replace(repr([marker]), marker).split(marker)
        pieces += [relation[language] for relation in graph["relations"].values()]
    return pieces


@dataclass
class QuickstartResult:
    before: dict          # evaluate() scores of the converted, untrained model
    after: dict           # ... and of the fine-tuned one
    examples: list        # (text, gold triples, predicted triples) of a few held-out records after training
    workdir: Path
    seconds: float


def _stage(number, text):
    print(f"[{number}/6] {text}", flush=True)


def quickstart(workdir=None, steps=2500, invented=15000, batch_size=16, seed=0, keep=False):
    """Run the six stages in ``workdir`` (a temporary folder unless given); returns a ``QuickstartResult``."""
    if steps < 1:
        raise KnowLMError(f"steps {steps}: expected a positive number of fine-tuning steps")
    torch = import_torch()      # before any work, and before transformers: one line if torch is missing
    import transformers         # pylint: disable=import-outside-toplevel
    started = time.perf_counter()
    temporary = workdir is None
    workdir = Path(tempfile.mkdtemp(prefix="knowlm-quickstart-") if temporary else workdir)
    if not temporary and any(workdir.glob("*")):
        raise KnowLMError(f"{workdir}: not empty; quickstart needs an empty or new folder")
    workdir.mkdir(parents=True, exist_ok=True)
    rng = random.Random(seed)
    graph = json.loads(GRAPH.read_text(encoding="utf-8"))
    records = read_instructie(TRAIN_RECORDS) + invented_records(graph, invented, rng)
    samples = kg2instruct(records, template=TEMPLATE, split_num=len(graph["relations"]), neg_ratio=0.5, seed=seed)
    write_jsonl(workdir / "train.jsonl", samples)

    _stage(1, f"tokenizer: SentencePiece, {VOCAB_SIZE} pieces, trained on the shipped corpus and training data")
    texts = BUILTIN_CORPUS.read_text(encoding="utf-8").splitlines() + _ZH_CHARS + \
        [text for sample in samples for text in (sample["input"], sample["output"])]
    tokenizer_file = train_tokenizer(texts, workdir / TOKENIZER_NAME, VOCAB_SIZE, whole_pieces=prompt_pieces(graph))

    _stage(2, "model: LLaMA architecture in Hugging Face format, random weights "
              f"(hidden {MODEL['hidden_size']}, {MODEL['num_hidden_layers']} layers)")
    torch.manual_seed(seed)
    hf_dir = workdir / "hf"
    transformers.LlamaForCausalLM(transformers.LlamaConfig(vocab_size=VOCAB_SIZE, **MODEL)).save_pretrained(hf_dir)
    shutil.copyfile(tokenizer_file, hf_dir / TOKENIZER_NAME)

    _stage(3, "convert: Hugging Face -> knowlm model directory")
    base = workdir / "model"
    convert_checkpoint(hf_dir, base)

    def score(model_dir, name):
        predictions = workdir / f"{name}.jsonl"
        generate = text_generator(str(model_dir), batch_size, max_new_tokens=MAX_NEW_TOKENS)
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
    trained = workdir / "trained"
    finetune(FULL_FINETUNE, data=workdir / "train.mindrecord", base=base, output_dir=workdir / "train",
             max_steps=steps, export_merged=trained, overrides={
                 "runner_config.epochs": 1000, "runner_config.batch_size": batch_size,
                 "train_dataset.batch_size": batch_size, "model.model_config.batch_size": batch_size,
                 "model.model_config.seq_length": SEQ_LENGTH, "lr_schedule.learning_rate": LEARNING_RATE,
                 "optimizer.betas": [0.9, 0.95], "lr_schedule.warmup_ratio": 0.05,
                 "knowlm.save_every": steps, "knowlm.log_every": 100, **_model_overrides(base)})

    _stage(6, "extract + evaluate the held-out split after training")
    after, predictions = score(trained, "after")
    gold = {record["id"]: record["relation"] for record in read_instructie(TEST)}
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
    config = read_json(Path(model_dir) / CONFIG_NAME)
    keys = ("hidden_size", "num_layers", "num_heads", "n_kv_heads", "intermediate_size", "vocab_size",
            "rms_norm_eps", "theta", "max_position_embedding", "tie_word_embeddings")
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
