"""Benchmark (not a test): what constrained extraction costs a decode step, knowlm against llama.cpp's grammars, on
the same weights (SmolLM2-135M-Instruct: knowlm's packaged fp32 model, and llama.cpp's f32 GGUF converted from
knowlm's export by llama.cpp's own converter, as ``bench/real.py`` makes it).

    python bench/constrain.py [--model DIR] [--records 12] [--rounds 3] [--ctx 2048] [--out DIR]

``--model``: another knowlm model directory of the same family (e.g. the quickstart's fine-tuned ``DIR/trained``,
which keeps to the format): exported (``knowlm export``) and converted to llama.cpp's f32 file the same way, cached
under ``<knowlm cache>/bench/constrain/``.

Workload: the shipped held-out split's prompts as the quickstart asks them (KnowLM's template 1 in the Alpaca
wrapper, all 8 relations in one prompt), Chinese and English records alternating, one prompt at a time (batch 1: a
decode step's latency), greedy, up to 64 new tokens, stopping at end-of-sequence. The same token ids go to both
engines, 2 threads each, in one process, at ``--ctx`` positions. Modes:

- knowlm ``free``: ``generate`` as ``knowlm extract`` runs it: the decode-steps kernel, many steps per call;
- knowlm ``one-step``: the same loop with a ``pick`` that only takes the argmax: one kernel call per step, what any
  per-step mask pays before the mask itself;
- knowlm ``constrained``: ``knowlm extract --constrained``'s pick (schema names, spans of the input, the format);
  its grammar is built per prompt, and that time is counted (``grammar ms``);
- llama.cpp ``free`` / ``grammar``: llama-cpp-python's ``Llama.generate`` (greedy) without and with a GBNF grammar of
  the same format: names from the schema, entity strings any text without the format's delimiters (llama.cpp's
  grammars cannot tie them to the input text).

A decode step's time is measured inside each generation (a streamer's clock for knowlm; the time between the first
and the last token llama.cpp yields), per token, summed over the records; ``pick ms`` is the time knowlm spends in
the pick function per step (mask + choice + advance). Rounds interleave the modes, rotated each round (this machine's
memory speed changes from minute to minute); the best round of each mode is kept. The hardware bound of a step is
the weights and the KV cache it reads over the memory read bandwidth, probed before each round. Writes
``constrain.json`` to ``--out`` and ends with a one-line summary.
"""
import argparse
import json
import resource
import sys
import time
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))
THREADS = 2
NEW_TOKENS = 64


def bench_module(name):
    import importlib.util
    spec = importlib.util.spec_from_file_location(f"bench_{name}", HERE / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def gguf_of(model_dir, prepare, log):
    """llama.cpp's f32 file of a knowlm model directory: ``knowlm export``, then llama.cpp's converter (as
    ``bench/real_prepare.py`` does for the packaged model), cached by the directory's weights."""
    import hashlib
    from knowlm.files import cache_dir
    stamp = hashlib.sha1()
    for path in sorted(model_dir.iterdir()):
        if path.is_file():
            stamp.update(f"{path.name} {path.stat().st_size} {path.stat().st_mtime_ns}".encode())
    base = cache_dir() / "bench" / "constrain" / stamp.hexdigest()[:12]
    output = base / "llama-f32.gguf"
    if output.is_file():
        return output
    base.mkdir(parents=True, exist_ok=True)
    log(f"knowlm export {model_dir} {base / 'hf'}")
    failed = prepare.knowlm_cli("export", str(model_dir), str(base / "hf"), "--force")
    if failed:
        sys.exit(f"bench: knowlm export failed: {failed}")
    llama_dir = prepare.converter_dir(cache_dir() / "bench", log)
    failed = prepare.convert_gguf(llama_dir, prepare.gguf_input(base / "hf", base / "hf-for-gguf"), "f32", output)
    if failed:
        sys.exit(f"bench: convert_hf_to_gguf.py failed: {failed}")
    return output


ENGINES = bench_module("engines")        # the clock and llama.cpp's loading, as bench/real.py's engines use them


class Timed:
    """A pick function, timed."""

    def __init__(self, pick):
        self.pick, self.seconds, self.calls = pick, 0.0, 0

    def __call__(self, logits, remaining, finished):
        start = time.perf_counter()
        tokens = self.pick(logits, remaining, finished)
        self.seconds += time.perf_counter() - start
        self.calls += 1
        return tokens


def argmax_pick(logits, remaining, finished):
    return logits.argmax(-1).tolist()


def gbnf(names, language):
    """llama.cpp's grammar of KnowLM's tuple answers: what it can say without the input text."""
    separator = "," if language == "zh" else ", "
    quoted = " | ".join(json.dumps(name, ensure_ascii=False) for name in names)
    return "\n".join(['root ::= "NAN" | tuple ("," tuple)*',
                      f'tuple ::= "(" span {json.dumps(separator)} rel {json.dumps(separator)} span ")"',
                      f"rel ::= {quoted}",
                      'span ::= [^(),，"\\n]+'])


class Workload:
    def __init__(self, count):
        from knowlm.ie.files import read_jsonl
        from knowlm.ie.kg import SCHEMA, TEST
        from knowlm.ie.prompts import build_prompts
        from knowlm.tokenizer.chat import chat_template
        schema = json.loads(Path(SCHEMA).read_text(encoding="utf-8"))
        records = [record for _, record in read_jsonl(TEST, "records")]
        zh = [r for r in records if r["lang"] == "zh"]
        en = [r for r in records if r["lang"] == "en"]
        mixed = [r for pair in zip(zh, en) for r in pair][:count]
        self.items = []
        for record in mixed:
            lang = record["lang"]
            prompt = build_prompts("re", record["text"], schema[lang], "knowlm", lang, 1, split_num=-1)[0]
            self.items.append({"text": record["text"], "lang": lang, "names": schema[lang],
                               "prompt": chat_template("alpaca").render(prompt.instruction, prompt.input)})


class KnowLMSide:
    def __init__(self, model_dir, ctx):
        import logging
        import mindspore as ms
        ms.device_context.cpu.op_tuning.threads_num(THREADS)
        from mindformers.tools.logger import get_logger
        get_logger().setLevel(logging.WARNING)
        from knowlm import KnowLMForCausalLM
        from knowlm.tokenizer.load import load_tokenizer
        from knowlm.checkpoints.model_dir import load_config
        self.model = KnowLMForCausalLM.from_pretrained(model_dir, seq_length=ctx, use_past=True, batch_size=1)
        self.tokenizer = load_tokenizer(model_dir, load_config(model_dir))
        self.eos = self.model.config.eos_token_id
        self.weight_bytes = sum(p.nbytes for p in self.model.get_parameters() if "cache" not in p.name)
        config = self.model.config
        self.kv_bytes_per_token = 2 * config.num_layers * (config.n_kv_heads or config.num_heads) * \
            (config.hidden_size // config.num_heads) * 4

    def encode(self, prompt):
        return self.tokenizer(prompt)["input_ids"]

    def run(self, mode, ids, item):
        from knowlm.constrain.constraint import vocabulary_of
        from knowlm.constrain.decode import Picker
        from knowlm.constrain.formats import answer_grammar
        clock, pick, grammar_s = ENGINES.Clock(), None, 0.0
        if mode == "one-step":
            pick = Timed(argmax_pick)
        elif mode == "constrained":
            start = time.perf_counter()
            grammar = answer_grammar("re", "tuple", item["lang"], item["names"], item["text"])
            grammar.horizon()
            grammar_s = time.perf_counter() - start
            pick = Timed(Picker([grammar], vocabulary_of(self.tokenizer, [self.eos]), [ids]))
        out = self.model.generate([ids], max_new_tokens=NEW_TOKENS, streamer=clock, pick=pick) if pick else \
            self.model.generate([ids], max_new_tokens=NEW_TOKENS, do_sample=False, streamer=clock)
        tokens = [int(t) for t in out[0][len(ids):]]
        return {"tokens": len(tokens), "decode_s": clock.times[-1] - clock.times[1], "steps": len(tokens) - 1,
                "pick_s": pick.seconds if pick else 0.0, "grammar_s": grammar_s,
                "text": self.tokenizer.decode(tokens, skip_special_tokens=True)}


class LlamaSide:
    def __init__(self, gguf, ctx, extra_bufts):
        import llama_cpp
        if not extra_bufts:
            ENGINES.without_extra_bufts(llama_cpp)
        self.llama_cpp = llama_cpp
        self.llm = llama_cpp.Llama(model_path=gguf, n_ctx=ctx, n_batch=min(ctx, 2048), n_threads=THREADS,
                                   n_threads_batch=THREADS, verbose=False)
        self.grammars = {}

    def run(self, mode, ids, item):
        grammar = None
        grammar_s = 0.0
        if mode == "grammar":
            start = time.perf_counter()
            grammar = self.llama_cpp.LlamaGrammar.from_string(gbnf(item["names"], item["lang"]), verbose=False)
            grammar_s = time.perf_counter() - start
        times, tokens = [], []
        for token in self.llm.generate(ids, temp=0.0, top_k=1, reset=True, grammar=grammar):
            times.append(time.perf_counter())
            if token == self.llm.token_eos():
                break
            tokens.append(token)
            if len(times) >= NEW_TOKENS:
                break
        return {"tokens": len(times), "decode_s": times[-1] - times[0], "steps": len(times) - 1, "pick_s": 0.0,
                "grammar_s": grammar_s, "text": self.llm.detokenize(tokens).decode("utf-8", "replace")}


MODES = [("knowlm", "free"), ("knowlm", "one-step"), ("knowlm", "constrained"), ("llama.cpp", "free"),
         ("llama.cpp", "grammar")]


def main(argv=None):
    parser = argparse.ArgumentParser(prog="bench/constrain.py", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", help="a knowlm model directory (default: the packaged smollm2)")
    parser.add_argument("--records", type=int, default=12, help="held-out records (Chinese and English alternating)")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--ctx", type=int, default=2048, help="positions (knowlm's seq_length, llama.cpp's n_ctx)")
    parser.add_argument("--out", default=str(HERE / "results"))
    parser.add_argument("--idle-wait", type=int, default=120, help="seconds to wait for idle cores before a round")
    args = parser.parse_args(argv)
    started = time.perf_counter()

    def log(message):
        print(f"[{time.perf_counter() - started:5.0f} s] {message}", file=sys.stderr, flush=True)

    import torch
    torch.set_num_threads(THREADS)
    real, run = bench_module("real"), bench_module("run")
    prepare = bench_module("real_prepare")
    models, skipped = prepare.prepare(["fp32"], log)
    if ("llama.cpp", "fp32") not in models:
        sys.exit(f"bench: llama.cpp's f32 file: {skipped}")
    extra_bufts = real.llama_extra_bufts(models, log)
    if args.model:
        models = {("knowlm", "fp32"): args.model, ("llama.cpp", "fp32"): str(gguf_of(Path(args.model), prepare, log))}
    work = Workload(args.records)
    rss = {}
    knowlm = KnowLMSide(models["knowlm", "fp32"], args.ctx)
    rss["after knowlm load"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    llama = LlamaSide(models["llama.cpp", "fp32"], args.ctx, extra_bufts)
    rss["after llama.cpp load"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    engines = {"knowlm": knowlm, "llama.cpp": llama}
    ids = [knowlm.encode(item["prompt"]) for item in work.items]
    log(f"{len(ids)} prompts of {min(map(len, ids))}-{max(map(len, ids))} tokens; warming up every mode")
    for engine, mode in MODES:          # compiles knowlm's graphs, loads llama.cpp's, untimed
        engines[engine].run(mode, ids[0], work.items[0])
    machine = real.Load()
    rounds, bandwidths, other = [], [], []
    for number in range(args.rounds):
        machine.wait_idle(args.idle_wait, log)
        bandwidths.append(run.huge_page_read(torch))
        first = machine.sample()
        order = MODES[number % len(MODES):] + MODES[:number % len(MODES)]
        results = {f"{e} {m}": [] for e, m in MODES}
        for index, (prompt, item) in enumerate(zip(ids, work.items)):
            for engine, mode in order:
                results[f"{engine} {mode}"].append(engines[engine].run(mode, prompt, item))
        other.append(real.Load.between(first, machine.sample()))
        rounds.append(results)
        log(f"round {number + 1}: " + ", ".join(f"{k} {ms_per_step(v):.2f} ms" for k, v in results.items()))
    report = summarise(rounds, knowlm, ids, max(bandwidths), rss, other)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "constrain.json").write_text(json.dumps({"args": vars(args), **report}, indent=1, ensure_ascii=False))
    print(table(report))
    print(report["summary"])
    return 0


def ms_per_step(runs):
    steps = sum(r["steps"] for r in runs)
    return 1000 * sum(r["decode_s"] for r in runs) / max(steps, 1)


def summarise(rounds, knowlm, ids, bandwidth, rss, other):
    best = {}
    for name in rounds[0]:
        runs = min((r[name] for r in rounds), key=ms_per_step)
        steps = max(sum(r["steps"] for r in runs), 1)
        best[name] = {"ms_per_step": ms_per_step(runs), "steps": steps, "tokens": sum(r["tokens"] for r in runs),
                      "pick_ms_per_step": 1000 * sum(r["pick_s"] for r in runs) / steps,
                      "grammar_ms_per_prompt": 1000 * sum(r["grammar_s"] for r in runs) / len(runs),
                      "examples": [r["text"] for r in runs[:4]]}
    prompt = float(np.mean([len(i) for i in ids])) + NEW_TOKENS / 2
    bound_ms = 1000 * (knowlm.weight_bytes + prompt * knowlm.kv_bytes_per_token) / bandwidth
    free, one, constrained = (best[f"knowlm {m}"]["ms_per_step"] for m in ("free", "one-step", "constrained"))
    llama_free, llama_grammar = best["llama.cpp free"]["ms_per_step"], best["llama.cpp grammar"]["ms_per_step"]
    ratios = {"knowlm_constraint_over_one_step": constrained / one, "knowlm_constraint_over_free": constrained / free,
              "knowlm_one_step_over_free": one / free, "llama_grammar_over_free": llama_grammar / llama_free,
              "llama_grammar_over_knowlm_constrained": llama_grammar / constrained,
              "llama_free_over_knowlm_free": llama_free / free}
    summary = (f"constrain: knowlm's constraint adds {100 * (constrained / one - 1):+.1f}% to a one-step decode "
               f"({100 * (constrained / free - 1):+.1f}% against its many-steps kernel; pick "
               f"{best['knowlm constrained']['pick_ms_per_step']:.2f} ms of {constrained:.2f} ms); llama.cpp's grammar "
               f"adds {100 * (llama_grammar / llama_free - 1):+.1f}%; constrained step llama.cpp/knowlm "
               f"{llama_grammar / constrained:.2f}x; bound {bound_ms:.2f} ms")
    return {"modes": best, "ratios": ratios, "bound_ms_per_step": bound_ms, "bandwidth_gb_s": bandwidth / 1e9,
            "peak_rss_bytes": rss, "other_cores_busy": other, "summary": summary}


def table(report):
    lines = [f"{'mode':24}{'ms/step':>9}{'steps':>7}{'pick ms':>9}{'grammar ms':>12}  first answers"]
    for name, row in report["modes"].items():
        lines.append(f"{name:24}{row['ms_per_step']:9.2f}{row['steps']:7}{row['pick_ms_per_step']:9.3f}"
                     f"{row['grammar_ms_per_prompt']:12.2f}  {' | '.join(t[:40] for t in row['examples'][:2])!r}")
    lines.append(f"hardware bound {report['bound_ms_per_step']:.2f} ms/step (weights + KV cache at "
                 f"{report['bandwidth_gb_s']:.1f} GB/s); peak RSS " + ", ".join(
                     f"{k} {v / 2**30:.2f} GiB" for k, v in report["peak_rss_bytes"].items()))
    lines += [f"{k}: {v:.3f}" for k, v in report["ratios"].items()]
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(main())
