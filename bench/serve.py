"""Benchmark (not a test): ``knowlm serve`` against llama.cpp's server (``llama-cpp-python[server]``) on the same
model, precision and context, with 1, 4 and 16 concurrent clients.

    python bench/serve.py [--precision fp32|bf16|int8] [--ctx 8192] [--clients 1,4,16] [--requests 2]
                          [--max-tokens 64] [--rounds 2] [--llama-server PATH] [--out DIR] [--quick]

The model is SmolLM2-135M-Instruct as ``bench/real.py`` prepares it (``bench/real_prepare.py``): knowlm's packaged
directory (or ``knowlm convert --dtype``) and llama.cpp's own conversion of the same weights. Both servers run at once
(each idle while the other is measured) with the same context (knowlm ``--ctx-size``, llama.cpp ``--n_ctx``), 2
threads each. Every client sends ``--requests`` streamed chat completions one after another (greedy, ``max_tokens``
each; the questions differ, so answers and prompt lengths differ); the engines take turns per (round, concurrency),
their order rotated each round (this VM's memory speed changes from minute to minute), and the better round is kept.

Reported per engine and concurrency: aggregate generated tokens/s (all clients' tokens over the wall time), p50/p99
time to first token and per-token latency (a request's time from its first to its last token / its tokens - 1),
and at the end each server's peak RSS. The hardware bound is one sequence's decode at the memory read bandwidth (its
weights read once per token): tokens/s a single client cannot pass. llama.cpp's Python server answers one request at
a time (no batching). ``--llama-server PATH`` adds llama.cpp's C++ server, which batches (continuous batching over
``--parallel`` slots, one per client at most; not in the pip package: build it from the llama.cpp source the
llama-cpp-python sdist vendors, ``cmake --build BUILD --target llama-server``), as a third engine.
Writes ``serve.json`` to ``--out`` and ends with a one-line summary.
"""
import argparse
import http.client
import importlib.util
import json
import os
import socket
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from urllib.parse import urlparse

HERE = Path(__file__).resolve().parent
QUESTIONS = ["Write a short story about a lighthouse keeper.", "Explain how a rainbow forms.",
             "Describe the city of Kyoto for a traveller.", "What are the benefits of regular exercise? Give details.",
             "Tell me about the history of the bicycle.", "Explain photosynthesis to a ten-year-old.",
             "Write a letter to a friend about a summer holiday.", "Describe how a computer stores numbers.",
             "What should I pack for a week of hiking?", "Explain why the sea is salty.",
             "Write a poem about autumn leaves.", "How do vaccines train the immune system?",
             "Describe a busy market in the morning.", "What is the water cycle? Explain each stage.",
             "Give advice to someone learning to cook.", "Explain how bees make honey."]
THREADS = "2"


def bench_module(name):
    spec = importlib.util.spec_from_file_location(f"bench_{name}", HERE / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def log(message):
    print(f"[{time.strftime('%H:%M:%S')}] {message}", file=sys.stderr, flush=True)


def free_port():
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


class Server:
    """A server process; ``base`` (http://host:port) once ``/v1/models`` answers."""

    def __init__(self, name, argv, logfile, env=None):
        self.name, self.log = name, open(logfile, "w")
        self.process = subprocess.Popen(argv, stdout=self.log, stderr=subprocess.STDOUT,
                                        env={**os.environ, "OMP_NUM_THREADS": THREADS, **(env or {})})

    def wait(self, base, timeout=600):
        self.base, deadline = base, time.time() + timeout
        while time.time() < deadline:
            if self.process.poll() is not None:
                sys.exit(f"bench: {self.name} server exited ({self.process.returncode}); see {self.log.name}")
            try:
                connection = http.client.HTTPConnection(urlparse(base).netloc, timeout=5)
                connection.request("GET", "/v1/models")
                if connection.getresponse().status == 200:
                    return self
            except OSError:
                pass
            time.sleep(0.5)
        sys.exit(f"bench: {self.name} server did not answer in {timeout} s; see {self.log.name}")

    def peak_rss(self):
        for line in Path(f"/proc/{self.process.pid}/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
        return 0

    def stop(self):
        if self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(60)
            except subprocess.TimeoutExpired:
                self.process.kill()


def start_knowlm(model_dir, ctx, max_batch, workdir):
    port = free_port()
    server = Server("knowlm", [sys.executable, "-m", "knowlm.cli", "serve", "--model", model_dir, "--port", str(port),
                               "--ctx-size", str(ctx), "--max-batch", str(max_batch), "--max-queue", "256",
                               "--model-name", "smollm2"],
                    workdir / "knowlm.log")
    return server.wait(f"http://127.0.0.1:{port}")


LLAMA_LAUNCHER = f"""
import sys
sys.path.insert(0, {str(HERE)!r})
if sys.argv.pop(1) == "no-extra-bufts":      # AMX reported by the CPU but not runnable in this VM (bench/real.py)
    import llama_cpp
    from engines import without_extra_bufts
    without_extra_bufts(llama_cpp)
from llama_cpp.server.__main__ import main
main()
"""


def start_llama(gguf, ctx, extra_bufts, workdir):
    port = free_port()
    argv = [sys.executable, "-c", LLAMA_LAUNCHER, "extra-bufts" if extra_bufts else "no-extra-bufts",
            "--model", gguf, "--port", str(port), "--host", "127.0.0.1", "--n_ctx", str(ctx),
            "--n_threads", THREADS, "--n_threads_batch", THREADS, "--n_batch", "2048", "--n_ubatch", "512",
            "--interrupt_requests", "False"]
    return Server("llama.cpp", argv, workdir / "llama.log").wait(f"http://127.0.0.1:{port}")


def start_llama_server(binary, gguf, ctx, slots, extra_bufts, workdir):
    """llama.cpp's C++ server: ``slots`` sequences decoded together, sharing one ``ctx``-token KV cache
    (``--no-repack``: no extra buffer types, as for llama-cpp-python where AMX faults)."""
    port = free_port()
    argv = [binary, "-m", gguf, "--host", "127.0.0.1", "--port", str(port), "-c", str(ctx), "-np", str(slots),
            "--kv-unified", "-t", THREADS, "-tb", THREADS, "-b", "2048", "-ub", "512", "--jinja", "--no-webui",
            *([] if extra_bufts else ["--no-repack"])]
    return Server("llama-server", argv, workdir / "llama-server.log").wait(f"http://127.0.0.1:{port}")


def one_request(base, question, max_tokens):
    """``(tokens, time to first token, seconds per later token)`` of one streamed greedy chat completion."""
    body = {"model": "smollm2", "messages": [{"role": "user", "content": question}], "temperature": 0,
            "max_tokens": max_tokens, "stream": True, "stream_options": {"include_usage": True}}
    connection = http.client.HTTPConnection(urlparse(base).netloc, timeout=600)
    started = time.perf_counter()
    connection.request("POST", "/v1/chat/completions", json.dumps(body), {"Content-Type": "application/json"})
    answer = connection.getresponse()
    if answer.status != 200:
        raise RuntimeError(f"HTTP {answer.status}: {answer.read()[:200]!r}")
    first = last = None
    chunks, usage = 0, None
    for line in answer:
        if not line.startswith(b"data: ") or line.strip() == b"data: [DONE]":
            continue
        event = json.loads(line[6:])
        usage = event.get("usage") or usage
        if any(choice.get("delta", {}).get("content") for choice in event.get("choices", [])):
            last = time.perf_counter()
            first = first or last
            chunks += 1
    connection.close()
    # knowlm reports usage; llama-cpp-python's stream has none but sends one chunk per token.
    tokens = usage["completion_tokens"] if usage else chunks
    return tokens, first - started, (last - first) / max(tokens - 1, 1)


def workload(base, clients, requests, max_tokens):
    """All clients at once, each ``requests`` requests in turn: aggregate tokens/s and the per-request figures."""
    def client(index):
        return [one_request(base, QUESTIONS[(index * requests + r) % len(QUESTIONS)], max_tokens)
                for r in range(requests)]
    started = time.perf_counter()
    with ThreadPoolExecutor(clients) as pool:
        results = [row for rows in pool.map(client, range(clients)) for row in rows]
    wall = time.perf_counter() - started
    tokens = sum(row[0] for row in results)
    return {"tokens": tokens, "wall_s": wall, "tokens_per_s": tokens / wall,
            "ttft_s": [row[1] for row in results], "tpot_s": [row[2] for row in results]}


def percentile(values, q):
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, max(0, round(q / 100 * (len(ordered) - 1))))]


def summarise(run):
    return {"tokens_per_s": run["tokens_per_s"], "tokens": run["tokens"], "wall_s": run["wall_s"],
            "ttft_p50_s": percentile(run["ttft_s"], 50), "ttft_p99_s": percentile(run["ttft_s"], 99),
            "tpot_p50_s": percentile(run["tpot_s"], 50), "tpot_p99_s": percentile(run["tpot_s"], 99)}


def table(results, clients, engines) -> str:
    lines = [f"{'clients':>7} {'engine':>12} {'tok/s':>7} {'TTFT p50':>9} {'p99':>7} {'ms/tok p50':>10} {'p99':>7}"]
    for count in clients:
        rows = results[str(count)]
        for engine in engines:
            row = rows[engine]
            lines.append(f"{count:>7} {engine:>12} {row['tokens_per_s']:7.1f} {row['ttft_p50_s']:8.3f}s "
                         f"{row['ttft_p99_s']:6.3f}s {row['tpot_p50_s'] * 1e3:10.1f} {row['tpot_p99_s'] * 1e3:7.1f}")
        for peer in engines[1:]:
            ratio = rows["knowlm"]["tokens_per_s"] / rows[peer]["tokens_per_s"]
            lines.append(f"{count:>7} {'knowlm/' + peer + ' tokens/s':>33}: {ratio:.2f}x")
    return "\n".join(lines)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    parser.add_argument("--precision", default="fp32", choices=("fp32", "bf16", "int8"))
    parser.add_argument("--ctx", type=int, default=8192)
    parser.add_argument("--clients", default="1,4,16")
    parser.add_argument("--requests", type=int, default=2, help="requests per client, one after another")
    parser.add_argument("--max-tokens", type=int, default=64)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--llama-server", help="a built llama.cpp llama-server binary: a third engine")
    parser.add_argument("--out", default=str(HERE / "results"))
    parser.add_argument("--quick", action="store_true", help="one round, clients 1 and 4, 1 request each")
    args = parser.parse_args(argv)
    clients = [1, 4] if args.quick else [int(c) for c in args.clients.split(",")]
    rounds, requests = (1, 1) if args.quick else (args.rounds, args.requests)
    prepare, real = bench_module("real_prepare"), bench_module("real")
    models, skipped = prepare.prepare([args.precision], log)
    if skipped:
        sys.exit(f"bench: {skipped}")
    extra_bufts = real.llama_extra_bufts(models, log)
    workdir = Path(tempfile.mkdtemp(prefix="knowlm-serve-bench-"))
    log(f"server logs: {workdir}")
    servers = {}
    try:
        servers["knowlm"] = start_knowlm(models["knowlm", args.precision], args.ctx, max(clients), workdir)
        servers["llama.cpp"] = start_llama(models["llama.cpp", args.precision], args.ctx, extra_bufts, workdir)
        if args.llama_server:
            servers["llama-server"] = start_llama_server(args.llama_server, models["llama.cpp", args.precision],
                                                         args.ctx, max(clients), extra_bufts, workdir)
        results, peaks, bandwidth = measure(servers, clients, rounds, requests, args.max_tokens)
    finally:            # a failed start or request leaves no server behind
        for server in servers.values():
            server.stop()
    report(args, models, servers, clients, rounds, requests, results, peaks, bandwidth)
    return 0


def measure(servers, clients, rounds, requests, max_tokens):
    """``(results, peak RSS, bandwidth probes)``: every (round, concurrency, engine), the better round kept."""
    import torch  # the bandwidth probe (bench/run.py's)
    run = bench_module("run")
    bandwidth = [run.huge_page_read(torch)]
    for server in servers.values():        # warm-up: first requests, graphs, caches
        workload(server.base, 2, 1, 8)
    results = {str(count): {} for count in clients}
    for r in range(rounds):
        for count in clients:
            turn = r + clients.index(count)          # rotates the engines' order
            order = list(servers)[turn % len(servers):] + list(servers)[:turn % len(servers)]
            for name in order:
                measured = summarise(workload(servers[name].base, count, requests, max_tokens))
                best = results[str(count)].get(name)
                if best is None or measured["tokens_per_s"] > best["tokens_per_s"]:
                    results[str(count)][name] = measured
                log(f"round {r + 1}/{rounds}, {count} clients, {name}: {measured['tokens_per_s']:.1f} tok/s")
        bandwidth.append(run.huge_page_read(torch))
    return results, {name: server.peak_rss() for name, server in servers.items()}, bandwidth


def report(args, models, servers, clients, rounds, requests, results, peaks, bandwidth):
    health_bytes = sum(p.stat().st_size for p in Path(models["knowlm", args.precision]).glob("*.ckpt"))
    bound = max(bandwidth) / health_bytes
    print(table(results, clients, list(servers)))
    print(f"hardware bound, one sequence's decode (weights {health_bytes / 1e6:.0f} MB at {max(bandwidth) / 1e9:.1f} "
          f"GB/s): {bound:.1f} tokens/s")
    print("peak RSS: " + ", ".join(f"{name} {peak / 2**30:.2f} GiB" for name, peak in peaks.items()))
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    summary = {"precision": args.precision, "ctx": args.ctx, "clients": clients, "requests_per_client": requests,
              "max_tokens": args.max_tokens, "rounds": rounds, "results": results, "peak_rss_bytes": peaks,
              "read_bytes_per_s": bandwidth, "single_sequence_bound_tokens_per_s": bound}
    (out / "serve.json").write_text(json.dumps(summary, indent=1))
    top, single = str(max(clients)), str(min(clients))
    rates = {name: results[top][name]["tokens_per_s"] for name in servers}
    k = rates["knowlm"]
    peers = ", ".join(f"{k / rates[peer]:.2f}x {peer}'s ({rates[peer]:.1f})" for peer in list(servers)[1:])
    print(f"serve: {args.precision}, ctx {args.ctx}: knowlm {k:.1f} tok/s at {top} clients = "
          f"{k / results[single]['knowlm']['tokens_per_s']:.2f}x its {single}-client rate, {peers}; "
          f"{out / 'serve.json'}")


if __name__ == "__main__":
    sys.exit(main())
