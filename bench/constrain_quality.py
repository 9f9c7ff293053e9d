"""Benchmark (not a test): extraction with and without constrained decoding, scored on the shipped held-out split.

    python bench/constrain_quality.py [--quickstart-dir DIR] [--out DIR]

Models: the ``tiny`` preset (random weights: a model that writes garbage; greedy, and sampled with seed 0, top-k
50), SmolLM2-135M-Instruct as it comes
(zero-shot), and with ``--quickstart-dir DIR`` (a folder ``knowlm quickstart --workdir DIR`` filled) the quickstart's
fine-tuned ``DIR/trained``. Each runs ``knowlm extract`` free and ``--constrained`` with the quickstart's settings
(KnowLM template 1 in the Alpaca wrapper, all 8 relations in one prompt, 8 prompts a batch, greedy, 64 new tokens,
384 positions) over ``knowlm/assets/kg/test.jsonl`` (38 sentences, 50 triples), then ``knowlm evaluate --by lang``.
Per run: triple P / R / F1 (overall, English, Chinese), triples predicted, unparsable answers, run-on answers (text
after the last complete tuple: prose, or a tuple cut off by the token limit), triples whose relation is not in the
schema or whose head or tail is not in the sentence ("outside"), and the wall time. The free runs of the quickstart's
models are checked against the quickstart's own ``before.jsonl`` / ``after.jsonl`` (same answers expected).

Writes ``constrain_quality.json`` and each run's predictions to ``--out``; prints a table and a one-line summary.
"""
import argparse
import gc
import json
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))


def run(model, name, constrained, out, **sampling):
    from knowlm.generate import text_generator
    from knowlm.ie.evaluate import evaluate
    from knowlm.ie.extract import extract_file
    from knowlm.ie.kg import SCHEMA, TEST
    from knowlm.quickstart import GENERATE_BATCH_SIZE, GENERATE_SEQ_LENGTH, MAX_NEW_TOKENS, TEMPLATE
    graph = json.loads((Path(TEST).parent / "graph.json").read_text(encoding="utf-8"))
    predictions = out / f"{name}-{'constrained' if constrained else 'free'}.jsonl"
    predictions.unlink(missing_ok=True)
    generate = text_generator(str(model), GENERATE_BATCH_SIZE, seq_length=GENERATE_SEQ_LENGTH,
                              max_new_tokens=MAX_NEW_TOKENS, **sampling)
    start = time.perf_counter()
    extract_file(generate, TEST, predictions, "re", SCHEMA, batch_size=GENERATE_BATCH_SIZE, template=TEMPLATE,
                 split_num=len(graph["relations"]), constrained=constrained)
    seconds = time.perf_counter() - start
    del generate
    gc.collect()
    scores = evaluate(predictions, TEST, by="lang")
    schema = json.loads(Path(SCHEMA).read_text(encoding="utf-8"))
    outside = 0
    for line in predictions.read_text(encoding="utf-8").splitlines():
        result = json.loads(line)
        names = schema["zh" if any("\u4e00" <= c <= "\u9fff" for c in result["text"]) else "en"]
        outside += sum(t["relation"] not in names or t["head"] not in result["text"] or t["tail"] not in result["text"]
                       for t in result["relation"])
    return {"scores": scores, "outside": outside, "seconds": seconds, "predictions": str(predictions)}


def same_answers(ours, theirs):
    """Records whose outputs equal the quickstart's own file's."""
    read = lambda path: {json.loads(l)["id"]: json.loads(l)["outputs"] for l in Path(path).read_text().splitlines()}
    mine, other = read(ours), read(theirs)
    return sum(mine[key] == other.get(key) for key in mine), len(mine)


def main(argv=None):
    parser = argparse.ArgumentParser(prog="bench/constrain_quality.py", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quickstart-dir", help="a folder `knowlm quickstart --workdir DIR` filled")
    parser.add_argument("--out", default=str(HERE / "results"))
    args = parser.parse_args(argv)
    started = time.perf_counter()
    from knowlm.frameworks import load_frameworks
    load_frameworks(False)
    from knowlm.models.packaged import packaged_model_dir
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    # Greedy, the random model says NAN to everything when constrained: sampled, it writes tuples too.
    sampled = dict(do_sample=True, seed=0)
    models = [("random weights (tiny)", "tiny", "tiny", {}), ("random weights (tiny), sampled", "tiny-sampled", "tiny",
                                                               sampled),
              ("SmolLM2 zero-shot", "smollm2", packaged_model_dir("smollm2"), {})]
    if args.quickstart_dir:
        trained = Path(args.quickstart_dir) / "trained"
        if not (trained / "config.json").is_file():
            raise SystemExit(f"{trained}: no model directory; run `knowlm quickstart --workdir DIR` first")
        models.append(("SmolLM2 after the quickstart's LoRA", "smollm2-lora", trained, {}))
    results = {}
    for name, short, model, sampling in models:
        for constrained in (False, True):
            key = f"{name}, {'constrained' if constrained else 'free'}"
            results[key] = run(model, short, constrained, out, **sampling)
            print(f"[{time.perf_counter() - started:5.0f} s] {key}: F1 "
                  f"{results[key]['scores']['total']['triple']['f1']:.2f}", file=sys.stderr, flush=True)
    if args.quickstart_dir:
        for name, own in (("SmolLM2 zero-shot, free", "before.jsonl"),
                          ("SmolLM2 after the quickstart's LoRA, free", "after.jsonl")):
            if (Path(args.quickstart_dir) / own).is_file():
                results[name]["same_as_quickstart"] = same_answers(results[name]["predictions"],
                                                                   Path(args.quickstart_dir) / own)
    (out / "constrain_quality.json").write_text(json.dumps(results, indent=1, ensure_ascii=False))
    print(table(results))
    best = max((k for k in results if "SmolLM2" in k), key=lambda k: results[k]["scores"]["total"]["triple"]["f1"])
    print(f"constrain_quality: {len(results)} runs in {time.perf_counter() - started:.0f} s; best SmolLM2 F1 "
          f"{results[best]['scores']['total']['triple']['f1']:.2f} ({best}); constrained unparsable "
          f"{sum(r['scores']['total']['unparsable'] for k, r in results.items() if k.endswith('constrained'))}")
    return 0


def table(results):
    lines = [f"{'run':52}{'P':>7}{'R':>7}{'F1':>7}{'en':>7}{'zh':>7}{'pred':>6}{'unparsable':>11}{'run-on':>8}"
             f"{'outside':>9}{'time':>7}"]
    for name, result in results.items():
        total, groups = result["scores"]["total"], result["scores"]["groups"]
        triple = total["triple"]
        lines.append(f"{name:52}{triple['precision']:7.2f}{triple['recall']:7.2f}{triple['f1']:7.2f}"
                     f"{groups['en']['triple']['f1']:7.2f}{groups['zh']['triple']['f1']:7.2f}{triple['predicted']:6}"
                     f"{total['unparsable']:11}{total['run_on']:8}{result['outside']:9}{result['seconds']:6.0f}s")
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(main())
