"""Benchmark (not a test): a real model on CPU, knowlm against transformers and llama.cpp, on the same weights.

    python bench/real.py [--quick] [--precisions fp32,bf16,int8] [--contexts 2048,8192] [--out DIR] [--layer13b]

The model is SmolLM2-135M-Instruct, knowlm's packaged ``smollm2`` (fp32, converted from the packaged GGUF). It is
exported to Hugging Face format (``knowlm export``) and every other engine's file is converted from that export:
llama.cpp's own ``convert_hf_to_gguf.py`` to f32 / bf16 / q8_0, ``knowlm convert --dtype bf16|int8`` for knowlm
(``bench/real_prepare.py``; cached in ``<knowlm cache>/bench/``). An (engine, precision) whose conversion fails is
skipped with the reason. Every engine gets the same token ids (Hugging Face tokenizer), runs greedy with 2 threads
and never stops at end-of-sequence.

Each context (knowlm's ``seq_length``, llama.cpp's ``n_ctx``; transformers has none) is one phase: one long-lived
process per (engine, precision) (``bench/engines.py``) loads its model and makes a first generation (the first
call: load + 64 tokens, knowlm's graphs compiled cold), makes every measure once untimed, then all of them answer
the same requests in interleaved rounds, the engines' order rotated each round (this virtual machine's memory speed
changes from minute to minute); the best of the rounds is kept. Measures: prefill of the 47-token chat prompt and
of 1000 tokens of real text (``knowlm/assets/corpus.txt``); a decode step (ms/token) after the chat prompt (~64
tokens in the cache) and after 1984 tokens (~2000); a 64-token greedy generation (tokens/s, prefill included);
the first call and each process's peak RSS (``ru_maxrss``). knowlm's prefill is ``generate(max_new_tokens=1)``,
its decode step the time between its first and last new token (a streamer's clock) / n; the others' are timed directly.

The hardware bound of a decode step is the bytes it reads (the weights of every matmul, lm_head included, at the
bytes per weight the engine holds, plus the KV cache up to that position) over the memory read bandwidth, probed
(``bench/run.py``'s huge-page read) before every round and after the last, best of the phase. A process above
``--max-rss-gb``, or any while the machine has under 1 GB available, is killed and reported.

Ratios are peer / knowlm (time, RSS): above 1 means knowlm is faster (smaller). Writes ``real.json`` to ``--out``
and ends with a one-line summary. ``--quick``: one round, the 47-token prompt only, context 2048.
``--layer13b``: instead, ``bench/layer13b.py`` (KnowLM-13B-shaped decoder layers, projected to 40 layers), written
to ``real_layer13b.json``.
"""
import argparse
import importlib.util
import json
import os
import queue
import resource
import signal
import subprocess
import sys
import tempfile
import threading
import time
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path

HERE = Path(__file__).resolve().parent
VERSIONS = ("mindspore", "mindformers", "torch", "transformers", "llama-cpp-python", "numpy")


def bench_module(name):
    """A sibling file of bench/ as a module (bench/ is not a package)."""
    spec = importlib.util.spec_from_file_location(f"bench_{name}", HERE / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


report = bench_module("real_report")
ENGINES, MEASURES, QUICK, FIRST_TOKENS = report.ENGINES, report.MEASURES, report.QUICK, report.FIRST_TOKENS


def meminfo(field):
    for line in Path("/proc/meminfo").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) * 1024
    return None


def process_rss(pid):
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 0


def cpu_seconds(pid):
    """User + system CPU seconds of process ``pid`` so far (0 once it is gone)."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
        return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")
    except (OSError, IndexError, ValueError):
        return 0.0


class Load:
    """CPU cores that processes outside this run keep busy between two samples: the machine's busy time
    (/proc/stat) less this process's and its engine processes' (``pids()``)."""

    def __init__(self, pids=lambda: ()):
        self.pids = pids

    def sample(self):
        ticks = [int(t) for t in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:9]]
        busy = (sum(ticks) - ticks[3] - ticks[4]) / os.sysconf("SC_CLK_TCK")
        own = sum(getattr(resource.getrusage(who), field) for who in (resource.RUSAGE_SELF, resource.RUSAGE_CHILDREN)
                  for field in ("ru_utime", "ru_stime"))
        return time.perf_counter(), busy, own + sum(cpu_seconds(pid) for pid in self.pids())

    @staticmethod
    def between(first, last):
        return max(0.0, (last[1] - first[1] - (last[2] - first[2])) / (last[0] - first[0]))

    def wait_idle(self, limit, log):
        """Wait, up to ``limit`` s, for two 2-second windows in a row with other processes under 0.1 cores (a
        2-thread engine on 2 cores slows down many times when a third thread takes a core)."""
        start, quiet, other = time.monotonic(), 0, 0.0
        while time.monotonic() - start < limit:
            first = self.sample()
            time.sleep(2)
            other = self.between(first, self.sample())
            quiet = quiet + 1 if other < 0.1 else 0
            if quiet == 2:
                return
        if limit > 0:
            log(f"other processes still kept {other:.2f} cores busy after {limit} s: measuring anyway")


def llama_extra_bufts(models, log):
    """Whether llama.cpp may use its extra buffer types (AMX on x86): not where its Q8_0 probe dies of SIGILL."""
    model = models.get(("llama.cpp", "int8"))
    if model is None:
        return True
    done = subprocess.run([sys.executable, str(HERE / "engines.py"), "--probe-llama", model], capture_output=True,
                          check=False)
    if done.returncode == -signal.SIGILL:
        log("llama.cpp: its AMX kernels die of SIGILL here (the CPU reports AMX, the VM does not run it): "
            "every llama.cpp process runs without extra buffer types (use_extra_bufts=False)")
        return False
    return True


class Child:
    """One engine process and its replies (read by a thread, so that waiting can watch memory)."""

    def __init__(self, engine, precision, ctx, model, workdir, spec):
        self.key, self.failed, self.results = f"{engine} {precision}", None, {"measures": {}}
        name = f"{engine}-{precision}-{ctx}"
        self.log = workdir / f"{name}.log"
        spec_path = workdir / f"{name}.json"
        spec_path.write_text(json.dumps({**spec, "engine": engine, "precision": precision, "ctx": ctx,
                                         "model": model}))
        threads = {v: "2" for v in ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS")}
        env = {**os.environ, **threads, "GLOG_v": "3", "TOKENIZERS_PARALLELISM": "false",
               "LOCAL_DEFAULT_PATH": str(workdir / "output"),
               "MS_COMPILER_CACHE_PATH": str(workdir / "graphs" / name)}      # knowlm's first call compiles, cold
        with open(self.log, "w") as log:
            self.proc = subprocess.Popen([sys.executable, str(HERE / "engines.py"), str(spec_path)], cwd=workdir,
                                         env=env, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=log,
                                         text=True, bufsize=1)
        self.replies = queue.Queue()
        threading.Thread(target=lambda: [self.replies.put(line) for line in self.proc.stdout], daemon=True).start()

    def fail(self, reason):
        self.failed = self.failed or reason
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()

    def log_tail(self):
        lines = [line for line in self.log.read_text(errors="replace").splitlines() if line.strip()]
        return " | ".join(lines[-2:])[-400:]


class Phase:
    """The processes of one context, and the memory watch while one of them works."""

    def __init__(self, children, max_rss, timeout, log):
        self.children, self.max_rss, self.timeout, self.log = children, max_rss, timeout, log
        self.load = Load(lambda: [c.proc.pid for c in children if c.proc.poll() is None])

    def watch(self):
        alive = [c for c in self.children if c.failed is None and c.proc.poll() is None]
        for child in alive:
            if process_rss(child.proc.pid) > self.max_rss:
                child.fail(f"killed: RSS above --max-rss-gb {self.max_rss / 2**30:.0f} GiB")
                self.log(f"{child.key}: {child.failed}")
        available = meminfo("MemAvailable")
        if alive and available is not None and available < 2**30:
            largest = max(alive, key=lambda c: process_rss(c.proc.pid))
            largest.fail(f"killed: the machine had {available / 2**30:.1f} GiB available")
            self.log(f"{largest.key}: {largest.failed}")

    def ask(self, child, request=None):
        """Send ``request`` (None: read the greeting) and wait for the reply, to which the cores other processes
        kept busy meanwhile are added (``other_cores``); None if the child fails."""
        if child.failed:
            return None
        first = self.load.sample()
        if request is not None:
            try:
                child.proc.stdin.write(json.dumps(request) + "\n")
                child.proc.stdin.flush()
            except OSError:
                pass
        deadline = time.monotonic() + self.timeout
        while True:
            try:
                reply = json.loads(child.replies.get(timeout=0.5))
                break
            except queue.Empty:
                self.watch()
                if child.failed:
                    return None
                if child.proc.poll() is not None and child.replies.empty():
                    child.fail(f"exited with status {child.proc.returncode}: {child.log_tail()}")
                    self.log(f"{child.key}: {child.failed}")
                    return None
                if time.monotonic() > deadline:
                    child.fail(f"killed: no reply in {self.timeout} s to {request}")
                    self.log(f"{child.key}: {child.failed}")
                    return None
        if not reply.pop("ok"):
            child.fail(f"{(request or {}).get('op')}: {reply['error']}")
            self.log(f"{child.key}: {child.failed}")
            return None
        reply["other_cores"] = self.load.between(first, self.load.sample())
        return reply


def run_phase(ctx, models, measures, rounds, args, workdir, spec, probe, log):
    """Every (engine, precision) at context ``ctx``: start, warm, interleaved rounds; their results by key."""
    children = [Child(engine, precision, ctx, models[engine, precision], workdir, spec)
                for precision in args.precisions for engine in ENGINES if (engine, precision) in models]
    phase = Phase(children, args.max_rss_gb * 2**30, args.timeout, log)
    start = phase.load.sample()
    for child in children:          # the greetings: imports done
        child.results.update(phase.ask(child) or {})
    phase.load.wait_idle(args.idle_wait, log)
    for child in children:          # one at a time: the first call is timed
        reply = phase.ask(child, {"op": "start", "prompt": "chat", "n": FIRST_TOKENS})
        if reply:
            child.results["start"] = reply
            log(f"ctx {ctx}: {child.key} first call {reply['first_call_s']:.1f} s (load {reply['load_s']:.1f} s)")
    for name in measures:           # warm: every measure once, untimed
        for child in children:
            phase.ask(child, MEASURES[name][0])
    probes = []
    for r in range(rounds):
        phase.load.wait_idle(args.idle_wait, log)
        probes.append(probe())
        for name in measures:
            for child in children[r % len(children):] + children[:r % len(children)]:
                reply = phase.ask(child, MEASURES[name][0])
                if reply:
                    child.results["measures"].setdefault(name, []).append(reply)
        log(f"ctx {ctx}: round {r + 1}/{rounds} done ({probes[-1] / 1e9:.1f} GB/s at its start)")
    probes.append(probe())
    for child in children:
        child.results.update(phase.ask(child, {"op": "rss"}) or {})
        if child.failed is None:
            child.proc.stdin.write(json.dumps({"op": "quit"}) + "\n")
            child.proc.stdin.close()
            try:
                child.proc.wait(timeout=60)
            except subprocess.TimeoutExpired:
                child.fail("did not quit")
        child.results["failed"] = child.failed
    return {"engines": {c.key: c.results for c in children}, "read_bytes_per_s": max(probes),
            "read_probes_bytes_per_s": probes, "other_cores": phase.load.between(start, phase.load.sample())}


def main(argv=None):
    parser = argparse.ArgumentParser(prog="bench/real.py", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="one round, the 47-token prompt only, context 2048")
    parser.add_argument("--precisions", default="fp32,bf16,int8")
    parser.add_argument("--contexts", default="2048,8192")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--out", default=str(HERE / "results"), help="where real.json goes")
    parser.add_argument("--max-rss-gb", type=float, default=16.0, help="kill an engine process above this RSS")
    parser.add_argument("--timeout", type=int, default=900, help="seconds one request may take")
    parser.add_argument("--llama-flash-attn", choices=("on", "off"), default="on",
                        help="llama.cpp's flash attention (llama-cli/llama-server: auto, on for CPU)")
    parser.add_argument("--idle-wait", type=int, default=300, help="seconds to wait, before each round and "
                        "first call, for other processes to leave the cores idle (0: do not wait)")
    parser.add_argument("--transformers-bf16", action="store_true", help="also transformers in bf16")
    parser.add_argument("--reconvert", action="store_true", help="convert the model files again")
    parser.add_argument("--layer13b", action="store_true", help="instead: the KnowLM-13B-shaped layer projection "
                        "(bench/layer13b.py), written to real_layer13b.json")
    args = parser.parse_args(argv)
    args.precisions = [p for p in args.precisions.split(",") if p]
    if any(p not in report.PRECISIONS for p in args.precisions):
        parser.error(f"--precisions: expected some of {','.join(report.PRECISIONS)}")
    started = time.perf_counter()

    def log(message):
        print(f"[{time.perf_counter() - started:5.0f} s] {message}", file=sys.stderr, flush=True)

    import torch  # pylint: disable=import-outside-toplevel
    torch.set_num_threads(2)
    run = bench_module("run")
    machine = Load()
    first = machine.sample()
    workdir = Path(tempfile.mkdtemp(prefix="knowlm-real-"))
    log(f"logs of the engine processes: {workdir}")

    def probe():
        return run.huge_page_read(torch)

    versions = {}
    for name in VERSIONS:
        try:
            versions[name] = version(name)
        except PackageNotFoundError:
            versions[name] = None
    results = {"mode": "quick" if args.quick else "full", "precisions": args.precisions,
               "machine": {"cpus": os.cpu_count(), "threads_per_engine": 2, "versions": versions}}
    if args.layer13b:
        layer13b = bench_module("layer13b")
        results.update(layer13b.run(args, workdir, probe, log))
        text, line, name = layer13b.table(results), layer13b.summary(results), "real_layer13b.json"
    else:
        results.update(smollm2(args, workdir, probe, log))
        text, line, name = report.table(results), report.summary(results), "real.json"
    results["machine"].update(other_cores=Load.between(first, machine.sample()), seconds=time.perf_counter() - started)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / name).write_text(json.dumps(results, indent=1))
    print(text)
    print(f"wrote {out / name} in {time.perf_counter() - started:.0f} s; engine logs in {workdir}")
    print(line)
    return 0


def smollm2(args, workdir, probe, log):
    """The SmolLM2 comparison: prepare the files, then each context's phase."""
    prepare = bench_module("real_prepare")
    models, skipped = prepare.prepare(args.precisions, log, args.reconvert, args.transformers_bf16)
    for key, reason in skipped.items():
        log(f"skipping {' '.join(key)}: {reason}")
    extra_bufts = llama_extra_bufts(models, log)
    prompts, chat_text = prepare.prompts(models["transformers", "fp32"], HERE.parent)
    (workdir / "prompts.json").write_text(json.dumps(prompts))
    spec = {"prompts": str(workdir / "prompts.json"), "chat_text": chat_text,
            "flash_attn": args.llama_flash_attn == "on", "extra_bufts": extra_bufts}
    contexts = [2048] if args.quick else [int(c) for c in args.contexts.split(",")]
    measures = QUICK if args.quick else tuple(MEASURES)
    rounds = 1 if args.quick else args.rounds
    phases = {ctx: run_phase(ctx, models, measures, rounds, args, workdir, spec, probe, log) for ctx in contexts}
    report.analyse(phases, prompts)
    return {"rounds": rounds, "prompt_tokens": {k: len(v) for k, v in prompts.items()},
            "models": {" ".join(k): v for k, v in models.items()},
            "skipped": {" ".join(k): v for k, v in skipped.items()}, "llama_flash_attn": spec["flash_attn"],
            "llama_extra_bufts": extra_bufts, "phases": phases}


if __name__ == "__main__":
    sys.exit(main())
