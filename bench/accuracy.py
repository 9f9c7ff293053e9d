"""Benchmark (not a test): accuracy of knowlm's bf16 and int8 (Q8_0) weights against fp32 on the real model.

    python bench/accuracy.py [--out DIR] [--quickstart-dir DIR] [--parts ppl,greedy,quickstart]

The model is SmolLM2-135M-Instruct (``knowlm.models.packaged``): fp32 is ``packaged_model_dir("smollm2")`` (converted
from the packaged Q4_1 GGUF); bf16 and int8 are ``convert_checkpoint`` of that model's Hugging Face export, so the
three hold the same values up to their own rounding. They are cached under ``<cache>/bench/accuracy/``.

1. greedy agreement: 16 chat prompts (English and Chinese, the model's chat template), 64 new tokens each, greedy,
   one prompt at a time, models with a KV cache (``use_past=True``: bf16/int8 weights stay narrow and knowlm's CPU
   kernels compute with them). Per precision: prompts whose whole output equals fp32's ("same"), and token
   agreement = sum of the common prefix with fp32's output / sum of fp32's output lengths. One early flip changes
   the rest of an output, so two less chaotic readings come with part 2: "forced", the fraction of fp32's generated
   tokens that are also the precision's argmax when fed prompt + fp32's tokens before them (fp32's own row: the
   graph without a cache against the kernels' greedy output), and fp32's log-prob gap between its token and the
   other precision's at the first differing step (small: a near tie that the weights' rounding tipped).
2. perplexity: ``knowlm/assets/corpus.txt`` (1.9k tokens: too short alone) and the texts of
   ``knowlm/assets/kg/train.jsonl`` (instruction, input and output of each sample, joined by blank lines; the
   instructions repeat, so its perplexity is low), each tokenized as one document with the model's tokenizer (no
   special tokens added) and cut into non-overlapping windows of 512 tokens (the last one shorter); the NLL of every
   next token inside a window (511 per full window: a window's first token has no context) from the model without a
   KV cache (``use_past=False``, ``seq_length=512``, ``batch_size=1``; bf16/int8 weights are widened to float32 for
   MindFormers' graph, same values), log-softmax in float64. Reported per source and over both, with the relative
   difference to fp32 (targets: bf16 <= 1%, int8 <= 2%). The teacher-forced check of part 1 runs on these models.
3. with ``--quickstart-dir DIR`` (a folder ``knowlm quickstart --workdir DIR`` filled): the fine-tuned model
   ``DIR/trained`` exported and converted to bf16/int8 likewise, then the quickstart's stage 5 on each precision
   (same prompts, template, batch, seq_length and ``max_new_tokens`` as ``knowlm.quickstart``): triple F1 (overall,
   en, zh), unparsable answers, difference to fp32 (target: within 1 F1 point). fp32's predictions are also
   compared with the quickstart's own ``DIR/after.jsonl``.

Everything runs in this process, one model at a time. Prints a table and a one-line summary; writes
``accuracy.json`` and the predictions of part 3 to ``--out`` (default ``bench/results``).
"""
import argparse
import gc
import hashlib
import json
import resource
import shutil
import sys
import time
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent
ASSETS = HERE.parent / "knowlm" / "assets"
PRECISIONS = ("fp32", "bf16", "int8")
WINDOW = 512
NEW_TOKENS, GREEDY_SEQ_LENGTH = 64, 256
TARGETS = {"ppl_percent": {"bf16": 1.0, "int8": 2.0}, "f1_points": 1.0}
PROMPTS = [
    "What is the capital of France?", "Explain photosynthesis in two sentences.",
    "Write a haiku about the sea.", "List three uses of a paperclip.",
    "How do I reverse a list in Python?", "What causes the seasons on Earth?",
    "Give me a tip for learning a new language.", "Summarize the plot of Romeo and Juliet.",
    "What is 17 times 23?", "Describe a knowledge graph in one paragraph.",
    "中国的首都是哪里？", "请用一句话介绍长城。", "如何保持健康的生活习惯？",
    "请解释什么是机器学习。", "写一首关于春天的短诗。", "从句子中抽取三元组：李白出生于碎叶城。",
]


def log(message):
    print(message, flush=True)


def peak_rss_gb():
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20


def precision_dirs(fp32_dir, key):
    """{precision: model dir}: fp32 as given, bf16/int8 converted (once, cached) from its Hugging Face export."""
    from knowlm.checkpoints.convert import convert_checkpoint, export_checkpoint
    from knowlm.files import cache_dir
    root = cache_dir() / "bench" / "accuracy" / key
    dirs = {"fp32": Path(fp32_dir), "bf16": root / "bf16", "int8": root / "int8"}
    missing = [p for p in ("bf16", "int8") if not (dirs[p] / "config.json").is_file()]
    if missing:
        started, hf = time.perf_counter(), root / "hf-export"
        export_checkpoint(fp32_dir, hf, force=True, echo=log)
        for precision in missing:
            convert_checkpoint(hf, dirs[precision], dtype=precision, force=True, echo=log)
        shutil.rmtree(hf, ignore_errors=True)
        log(f"converted {fp32_dir} -> {', '.join(missing)} in {time.perf_counter() - started:.0f}s ({root})")
    return dirs


def load(model_dir, **overrides):
    from knowlm import KnowLMForCausalLM
    from knowlm.models.llama import weight_dtypes
    started = time.perf_counter()
    model = KnowLMForCausalLM.from_pretrained(model_dir, **overrides)
    dtypes = weight_dtypes(model)
    log(f"  loaded {model_dir.name} {overrides} in {time.perf_counter() - started:.1f}s, weights {'/'.join(dtypes)}")
    return model, dtypes


def documents(tokenizer):
    kg = [json.loads(line) for line in (ASSETS / "kg" / "train.jsonl").read_text(encoding="utf-8").splitlines()]
    texts = {"corpus.txt": (ASSETS / "corpus.txt").read_text(encoding="utf-8"),
             "kg/train.jsonl": "\n\n".join(f"{r['instruction']}\n{r['input']}\n{r['output']}" for r in kg)}
    return {name: np.asarray(tokenizer.encode(text, add_special_tokens=False), np.int32)
            for name, text in texts.items()}


def logits_of(model, ids):
    """float64 logits (len(ids), vocab) of the model without a KV cache over ``ids`` (<= WINDOW tokens, padded)."""
    import mindspore as ms
    padded = np.zeros((1, WINDOW), np.int32)
    padded[0, :len(ids)] = ids
    out = model(ms.Tensor(padded, ms.int32))[0].asnumpy()
    assert out.size % WINDOW == 0, out.shape            # logits of every position: (WINDOW, vocab) after reshape
    return out.reshape(WINDOW, -1)[:len(ids)].astype(np.float64)


def log_softmax(logits):
    top = logits.max(axis=1, keepdims=True)
    return logits - top - np.log(np.exp(logits - top).sum(axis=1, keepdims=True))


def window_nll(model, ids):
    """Sum of -log p(ids[i + 1] | ids[:i + 1]) over the window, and the number of predictions."""
    logp = log_softmax(logits_of(model, ids)[:-1])
    return float(-logp[np.arange(len(ids) - 1), ids[1:]].sum()), len(ids) - 1


def forced(model, precision, greedy_result, reference_logp):
    """Teacher-forced check over fp32's greedy outputs: this model's argmax at each of fp32's generated tokens
    (given the prompt and fp32's tokens before it); with fp32's model, also fp32's log-prob gap between its own token
    and another precision's at the step where that one's greedy output first differs (a near tie when small)."""
    prompts, outputs = greedy_result["prompt_ids"], greedy_result["outputs"]
    agree = total = 0
    for i, (ids, out) in enumerate(zip(prompts, outputs["fp32"])):
        logits = logits_of(model, np.asarray(ids + out, np.int32))[len(ids) - 1:-1]
        agree, total = agree + int((logits.argmax(axis=1) == out).sum()), total + len(out)
        if precision == "fp32":
            reference_logp.append(log_softmax(logits))
    row = {"forced_agreement": agree / total, "forced_tokens": total}
    if precision == "fp32":
        for other, outs in outputs.items():
            greedy_result[other]["divergence_gaps"] = [
                float(logp[d, ref[d]] - logp[d, o[d]]) for logp, o, ref, d in
                zip(reference_logp, outs, outputs["fp32"], greedy_result[other]["prefixes"])
                if d < min(len(o), len(ref))]
    return row


def perplexity(dirs, docs, greedy_result=None):
    results, reference_logp = {}, []
    log("  tokens: " + ", ".join(f"{name} {len(ids)}" for name, ids in docs.items()))
    for precision, model_dir in dirs.items():
        started = time.perf_counter()
        model, dtypes = load(model_dir, use_past=False, seq_length=WINDOW, batch_size=1)
        row, total = {"weights": dtypes}, [0.0, 0]
        for name, ids in docs.items():
            nll = count = 0
            for start in range(0, len(ids) - 1, WINDOW):
                window = window_nll(model, ids[start:start + WINDOW])
                nll, count = nll + window[0], count + window[1]
            row[name] = {"tokens": count, "nll": nll, "ppl": float(np.exp(nll / count))}
            total = [total[0] + nll, total[1] + count]
        row["all"] = {"tokens": total[1], "nll": total[0], "ppl": float(np.exp(total[0] / total[1]))}
        if greedy_result:
            row.update(forced(model, precision, greedy_result, reference_logp))
        row["seconds"] = time.perf_counter() - started
        results[precision] = row
        log(f"  {precision}: perplexity {row['all']['ppl']:.4f} over {total[1]} tokens ({row['seconds']:.0f}s)")
        del model
        gc.collect()       # before the next precision's model is built
    for precision, row in results.items():
        for name in (*docs, "all"):
            row[name]["rel_diff_percent"] = 100 * (row[name]["ppl"] / results["fp32"][name]["ppl"] - 1)
    return results


def greedy(dirs, tokenizer):
    from knowlm.tokenizer.chat import apply_chat_template
    prompts = [tokenizer.encode(apply_chat_template(tokenizer, [{"role": "user", "content": p}]),
                                add_special_tokens=False) for p in PROMPTS]
    outputs, results = {}, {}
    for precision, model_dir in dirs.items():
        started = time.perf_counter()
        model, dtypes = load(model_dir, use_past=True, seq_length=GREEDY_SEQ_LENGTH, batch_size=1)
        outputs[precision] = [[int(t) for t in model.generate(ids, max_new_tokens=NEW_TOKENS, do_sample=False)[0]
                               [len(ids):]] for ids in prompts]
        results[precision] = {"weights": dtypes, "seconds": time.perf_counter() - started}
        log(f"  {precision}: {sum(map(len, outputs[precision]))} tokens ({results[precision]['seconds']:.0f}s)")
        del model
        gc.collect()       # before the next precision's model is built
    reference = outputs["fp32"]
    for precision, outs in outputs.items():
        prefixes = [next((i for i, (a, b) in enumerate(zip(o, r)) if a != b), min(len(o), len(r)))
                    for o, r in zip(outs, reference)]
        results[precision].update(
            identical=sum(o == r for o, r in zip(outs, reference)), prompts=len(prompts),
            mean_prefix=float(np.mean(prefixes)), mean_length=float(np.mean([len(r) for r in reference])),
            token_agreement=sum(prefixes) / sum(len(r) for r in reference), prefixes=prefixes,
            texts=[tokenizer.decode(o, skip_special_tokens=True) for o in outs])
    results.update(prompt_ids=prompts, outputs=outputs)         # for the teacher-forced check (part 2)
    return results


def quickstart_f1(workdir, out):
    from knowlm.generate import generate
    from knowlm.ie.evaluate import evaluate
    from knowlm.ie.extract import extract_file
    from knowlm.ie.kg import GRAPH, SCHEMA, TEST
    from knowlm.quickstart import GENERATE_BATCH_SIZE, GENERATE_SEQ_LENGTH, MAX_NEW_TOKENS, TEMPLATE
    from knowlm.tokenizer.load import load_tokenizer
    trained = Path(workdir) / "trained"
    if not (trained / "config.json").is_file():
        raise SystemExit(f"{trained}: no model directory; run `knowlm quickstart --workdir {workdir}` first")
    stamp = f"{trained.resolve()}:{(trained / 'config.json').stat().st_mtime_ns}"
    dirs = precision_dirs(trained, "quickstart-" + hashlib.sha1(stamp.encode()).hexdigest()[:12])
    split = len(json.loads(GRAPH.read_text(encoding="utf-8"))["relations"])
    results = {}
    for precision, model_dir in dirs.items():
        # The quickstart's score(): text_generator(model_dir, ...) is load_model + generate; loaded here to see the
        # weights' dtypes.
        started, predictions = time.perf_counter(), out / f"quickstart-{precision}.jsonl"
        predictions.unlink(missing_ok=True)
        tokenizer = load_tokenizer(model_dir)
        model, dtypes = load(model_dir, use_past=True, batch_size=GENERATE_BATCH_SIZE, seq_length=GENERATE_SEQ_LENGTH)
        extract_file(lambda prompts, model=model: generate(model, tokenizer, prompts, max_new_tokens=MAX_NEW_TOKENS), TEST,
                     predictions, "re", SCHEMA, batch_size=GENERATE_BATCH_SIZE, template=TEMPLATE, split_num=split)
        scores = evaluate(predictions, TEST, by="lang")
        groups = {"all": scores["total"], **scores["groups"]}
        results[precision] = {"weights": dtypes, "seconds": time.perf_counter() - started,
                              **{name: {"f1": g["triple"]["f1"], "unparsable": g["unparsable"]}
                                 for name, g in groups.items()}}
        log(f"  {precision}: F1 {groups['all']['triple']['f1']:.2f} ({results[precision]['seconds']:.0f}s)")
        del model
        gc.collect()       # before the next precision's model is built
    for row in results.values():
        row["f1_diff"] = row["all"]["f1"] - results["fp32"]["all"]["f1"]
    after = Path(workdir) / "after.jsonl"
    if after.is_file():
        results["fp32"]["equals_quickstart_after"] = \
            after.read_text(encoding="utf-8") == (out / "quickstart-fp32.jsonl").read_text(encoding="utf-8")
    return results


def table(result):
    ppl, gr, qs = result.get("perplexity"), result.get("greedy"), result.get("quickstart")
    head = f"{'':6}{'ppl':>9}{'Δppl%':>8}{'corpus':>9}{'kg':>8}{'same':>7}{'tok.agree':>10}{'forced':>8}" \
           f"{'F1':>7}{'ΔF1':>7}{'en':>7}{'zh':>7}{'unpars':>7}"
    lines = [head]
    for p in PRECISIONS:
        cells = [f"{p:6}"]
        cells += [f"{ppl[p]['all']['ppl']:9.4f}{ppl[p]['all']['rel_diff_percent']:+8.3f}"
                  f"{ppl[p]['corpus.txt']['ppl']:9.3f}{ppl[p]['kg/train.jsonl']['ppl']:8.4f}"] if ppl else [" " * 34]
        cells += [f"{gr[p]['identical']:>4}/{gr[p]['prompts']:<2}{gr[p]['token_agreement']:10.3f}"] if gr else \
            [" " * 17]
        cells += [f"{ppl[p]['forced_agreement']:8.3f}" if ppl and "forced_agreement" in ppl[p] else " " * 8]
        cells += [f"{qs[p]['all']['f1']:7.2f}{qs[p]['f1_diff']:+7.2f}{qs[p].get('en', {}).get('f1', 0):7.2f}"
                  f"{qs[p].get('zh', {}).get('f1', 0):7.2f}{qs[p]['all']['unparsable']:7}"] if qs else []
        lines.append("".join(cells))
    for name, part in (("ppl (use_past=False)", ppl), ("greedy (use_past=True)", gr), ("quickstart", qs)):
        if part:
            lines.append(f"{name}: weights " + ", ".join(f"{p} {'/'.join(part[p]['weights'])}" for p in PRECISIONS))
    if gr:
        lines.append("fp32 log-prob gap at the first differing greedy token (median/max, nats): " + ", ".join(
            f"{p} {np.median(g):.3f}/{max(g):.3f} (n={len(g)})" for p in ("bf16", "int8")
            if (g := gr[p].get("divergence_gaps"))))
    return "\n".join(lines)


def summary(result):
    parts, ok = [], True
    if "perplexity" in result:
        for p in ("bf16", "int8"):
            diff = result["perplexity"][p]["all"]["rel_diff_percent"]
            ok &= abs(diff) <= TARGETS["ppl_percent"][p]
            parts.append(f"{p} ppl {diff:+.2f}% (target {TARGETS['ppl_percent'][p]:g}%)")
    if "greedy" in result:
        parts.append("greedy same as fp32 " + ", ".join(
            f"{p} {result['greedy'][p]['identical']}/{len(PROMPTS)} ({result['greedy'][p]['token_agreement']:.0%} "
            "tokens" + (f", {result['perplexity'][p]['forced_agreement']:.1%} teacher-forced" if
                        "forced_agreement" in result.get("perplexity", {}).get(p, {}) else "") + ")"
            for p in ("bf16", "int8")))
    if "quickstart" in result:
        diffs = {p: result["quickstart"][p]["f1_diff"] for p in ("bf16", "int8")}
        ok &= all(abs(d) <= TARGETS["f1_points"] for d in diffs.values())
        parts.append("quickstart F1 " + ", ".join(f"{p} {d:+.2f}" for p, d in diffs.items()) + " pt (target 1)")
    return "accuracy vs fp32: " + "; ".join(parts) + ("; all within targets" if ok else "; OUTSIDE a target")


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    parser.add_argument("--out", default=str(HERE / "results"), help="where accuracy.json goes")
    parser.add_argument("--quickstart-dir", help="a folder that `knowlm quickstart --workdir` filled (part 3)")
    parser.add_argument("--parts", default="ppl,greedy,quickstart", help="which parts to run (comma-separated)")
    args = parser.parse_args()
    parts = set(args.parts.split(","))
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    from knowlm.frameworks import load_frameworks
    load_frameworks()
    from knowlm.models.packaged import packaged_model_dir
    from knowlm.tokenizer.load import load_tokenizer
    fp32 = packaged_model_dir("smollm2", echo=log)
    result, seconds = {"model": "SmolLM2-135M-Instruct", "fp32_dir": str(fp32), "window": WINDOW,
                       "new_tokens": NEW_TOKENS, "prompts": PROMPTS, "targets": TARGETS}, {}
    started = time.perf_counter()
    dirs = precision_dirs(fp32, fp32.name)
    seconds["convert"] = time.perf_counter() - started
    tokenizer = load_tokenizer(fp32)
    runs = [("greedy", f"agreement with fp32, {len(PROMPTS)} chat prompts x {NEW_TOKENS} tokens, KV cache + kernels",
             lambda: greedy(dirs, tokenizer)),
            ("ppl", "no KV cache, windows of 512 (+ the teacher-forced greedy check)",
             lambda: perplexity(dirs, documents(tokenizer), result.get("greedy"))),
            ("quickstart", f"F1 of {args.quickstart_dir}/trained", lambda: quickstart_f1(args.quickstart_dir, out))]
    for name, text, run in runs:
        if name in parts and (name != "quickstart" or args.quickstart_dir):
            log(f"[{name}] {text}")
            started = time.perf_counter()
            result["perplexity" if name == "ppl" else name] = run()
            seconds[name] = time.perf_counter() - started
    result["seconds"], result["peak_rss_gb"] = seconds, peak_rss_gb()
    result["summary"] = summary(result)
    for key in ("prompt_ids", "outputs"):       # token ids: the texts stay
        result.get("greedy", {}).pop(key, None)
    (out / "accuracy.json").write_text(json.dumps(result, indent=1, ensure_ascii=False) + "\n", encoding="utf-8")
    log("\n" + table(result))
    log("times: " + ", ".join(f"{k} {v:.0f}s" for k, v in seconds.items()) + f"; peak RSS {peak_rss_gb():.1f} GB")
    log(result["summary"])
    log(f"wrote {out / 'accuracy.json'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
