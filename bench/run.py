"""Benchmark (not a test): knowlm against Hugging Face transformers + PEFT on CPU, read against the hardware.

    python bench/run.py [--quick] [--out DIR] [--config small|large|both]        

For each config both sides get the same random LLaMA weights (built in torch with a fixed seed, saved as a
Hugging Face directory and converted by ``knowlm.checkpoints.convert``), fp32, 2 threads each, and run:

1. prefill: forward of 1 x 128 tokens (knowlm: ``use_past=False``, ``seq_length=128``);
2. decode: greedy 32 new tokens after a 96-token prompt with a KV cache (knowlm: ``use_past=True``,
   ``seq_length=128``; transformers: ``min_new_tokens=32`` so that both give 32); the tokens are compared. The
   time of one decode step is (time for 32 tokens - time for 1 token) / 31, which leaves the prefill out;
3. LoRA training step: batch 2 x 256, rank 8 (alpha 16) on q and v, AdamW (knowlm: MindFormers'
   ``get_pet_model`` + ``KnowLMTrainOneStepCell``, GRAPH mode; transformers: PEFT + ``torch.optim.AdamW``);
4. conversion of a sharded ``.bin`` checkpoint: knowlm against MindFormers' ``convert_pt_to_ms``, with
   ``bench/convert.py``'s functions (about 1 GB; for the large config, the large config's own size).

Each side runs in fresh subprocesses: MindSpore's GRAPH mode and CPU thread pool are set once per process. With
the full plan every measure has its own process; ``--quick`` runs one process per side, on the small config with 4
layers instead of 8. The first call (GRAPH compilation on the knowlm side, allocation on both) is reported apart
from the median of the calls after it; one more knowlm decode process then reports its first call with the graphs
the first one left in the run's compile cache (what a user's second ``knowlm generate`` pays).

The hardware bound is measured in the same run: peak fp32 matmul FLOP/s (2048 x 2048, torch and numpy, 2 threads)
and memory read bandwidth (sum over a 256 MB array: numpy, torch, and torch over numpy's memory, which numpy puts
on huge pages), the best of each. Each measure says which fraction of it a side reaches: model FLOPs / time / peak
for prefill and training (matmuls only, attention counted as a full square), fp32 weight bytes read per token /
decode-step time / bandwidth for decoding, where the bandwidth is the huge-page probe's best in the decode
measure's own process, before each repeat and after the last (the machine's memory speed changes from minute to
minute).

Ratios are peer / knowlm (time, or peak RSS for conversion): above 1 means knowlm is faster (or smaller). Writes
``results.json`` (every comparison in a field whose name contains ``ratio``) and ``results.png`` to ``--out``.
"""
import argparse
import functools
import importlib.util
import json
import os
import resource
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from importlib.metadata import version
from pathlib import Path

HERE = Path(__file__).resolve().parent
THREADS = 2
MARK = "BENCH-RESULT "      # prefix of a child's result line: MindSpore and MindFormers print to stdout too

# Hugging Face LlamaConfig sizes.
CONFIGS = {
    "small": dict(hidden_size=512, num_hidden_layers=8, num_attention_heads=8, intermediate_size=1376,
                  vocab_size=32000),
    "large": dict(hidden_size=2048, num_hidden_layers=6, num_attention_heads=16, intermediate_size=5504,
                  vocab_size=32000),
    # --tiny only: proves the whole suite runs (tests/test_bench.py); its numbers mean nothing.
    "tiny": dict(hidden_size=64, num_hidden_layers=2, num_attention_heads=4, intermediate_size=176,
                 vocab_size=1000),
}
# --quick: the small config with half the layers (half the compile time), to finish within a minute.
CONFIGS["quick"] = {**CONFIGS["small"], "num_hidden_layers": 4}
PREFILL = 128                   # prefill tokens; also the decode model's seq_length
PROMPT, NEW_TOKENS = 96, 32     # PROMPT + NEW_TOKENS == PREFILL
TRAIN_BATCH, TRAIN_SEQ = 2, 256
LORA_RANK, LORA_ALPHA, LEARNING_RATE, WEIGHT_DECAY = 8, 16, 1e-4, 0.01
MEASURES = ("prefill", "decode", "train")
VERSIONS = ("mindspore", "mindformers", "torch", "transformers", "peft", "numpy")
READ_BYTES = 256 * 2**20    # memory read probes: far beyond the caches
BUSY = 0.1                  # CPU cores used by other processes above which a measure is flagged as disturbed


@dataclass
class Plan:
    """How much work: timed calls after the first, conversion size (MB, 0 = the config's own) and repeats."""
    configs: tuple
    repeats: dict
    convert_mb: dict
    convert_repeats: int
    isolate: bool           # one subprocess per measure; else one per side and config


def make_plan(args) -> Plan:
    if args.tiny:
        return Plan(("tiny",), dict(prefill=2, decode=1, train=2), {"tiny": 10}, 1, False)
    if args.quick:
        return Plan(("quick",), dict(prefill=3, decode=2, train=2), {"quick": 100}, 1, False)
    configs = ("small", "large") if args.config == "both" else (args.config,)
    return Plan(configs, dict(prefill=10, decode=5, train=5), {"small": 1000, "large": 0}, 2, True)


def weight_counts(c):
    """(parameters of the layers' matmuls, of the lm_head): what every token multiplies by (the embedding is a
    lookup; norms are negligible)."""
    h, layers = c["hidden_size"], c["num_hidden_layers"]
    kv = c.get("num_key_value_heads", c["num_attention_heads"]) * h // c["num_attention_heads"]
    return layers * (2 * h * h + 2 * h * kv + 3 * h * c["intermediate_size"]), c["vocab_size"] * h


def forward_flops(c, batch, seq):
    """Matmul FLOPs of a forward over ``batch`` x ``seq`` tokens, attention scores and context as full squares."""
    return batch * (2 * sum(weight_counts(c)) * seq + 4 * c["num_hidden_layers"] * seq * seq * c["hidden_size"])


def train_flops(c, batch, seq):
    """Matmul FLOPs of a LoRA step: per weight and token 2 forward + 2 for the activations' gradient (frozen
    weights get no gradient of their own, LoRA's are negligible); attention 3 times its forward."""
    return 3 * forward_flops(c, batch, seq) - 2 * batch * sum(weight_counts(c)) * seq


def token_ids(shape, vocab, seed):
    """Deterministic token ids, clear of pad/bos/eos (0, 1, 2): the same on both sides."""
    import numpy as np  # pylint: disable=import-outside-toplevel
    return np.random.default_rng(seed).integers(3, vocab, shape)


class OtherLoad:
    """CPU cores that processes outside this run kept busy, on average, from creation to ``cores()``: the
    machine's busy time (/proc/stat, Linux) less this process's and its finished children's (getrusage)."""

    def __init__(self):
        self.start = self._sample()

    @staticmethod
    def _sample():
        stat = Path("/proc/stat")
        if not stat.is_file():
            return None
        # user nice system idle iowait irq softirq steal, in clock ticks
        ticks = [int(t) for t in stat.read_text().split("\n", 1)[0].split()[1:9]]
        busy = (sum(ticks) - ticks[3] - ticks[4]) / os.sysconf("SC_CLK_TCK")
        own = sum(getattr(resource.getrusage(who), field) for who in (resource.RUSAGE_SELF, resource.RUSAGE_CHILDREN)
                  for field in ("ru_utime", "ru_stime"))
        return time.perf_counter(), busy, own

    def cores(self):
        end = self._sample()
        if self.start is None or end is None:
            return None
        (t0, busy0, own0), (t1, busy1, own1) = self.start, end
        return max(0.0, (busy1 - busy0 - (own1 - own0)) / (t1 - t0))


def timed(call):
    start = time.perf_counter()
    result = call()
    return time.perf_counter() - start, result


def time_calls(call, repeats):
    """The first call (compilation, allocation) apart from the median of ``repeats`` calls after it."""
    first, result = timed(call)
    times = []
    for _ in range(repeats):
        seconds, result = timed(call)
        times.append(seconds)
    return {"first_call_s": first, "median_s": statistics.median(times), "times_s": times}, result


@functools.lru_cache(maxsize=None)
def _huge_page_array():
    import numpy as np  # pylint: disable=import-outside-toplevel
    return np.ones(READ_BYTES // 4, np.float32)


def huge_page_read(torch):
    """Bytes/s of torch summing READ_BYTES of numpy's memory, best of 5: numpy asks the kernel for huge pages for its
    large arrays (madvise), torch's allocator does not, and this is the fastest plain read on the 2-core machine
    (~70 GB/s in its fast phases, against ~35-41 GB/s on 4 KB pages)."""
    return READ_BYTES / min(time_calls(torch.from_numpy(_huge_page_array()).sum, 5)[0]["times_s"])


# --------------------------------------------------------------------------------------- child processes

class TorchSide:
    """Hugging Face transformers (+ PEFT): the reference, and the hardware bound."""

    def __init__(self, spec):
        import torch  # pylint: disable=import-outside-toplevel
        import transformers  # pylint: disable=import-outside-toplevel
        torch.set_num_threads(THREADS)
        transformers.logging.set_verbosity_error()
        self.torch, self.transformers, self.spec = torch, transformers, spec
        self.config, self.hf_dir = spec["config"], Path(spec["workdir"]) / "hf"

    def bounds(self):
        import numpy as np  # pylint: disable=import-outside-toplevel
        torch, n = self.torch, 2048
        a, b = torch.randn(n, n), torch.randn(n, n)
        matmul = {"torch": min(time_calls(lambda: a @ b, 5)[0]["times_s"]),
                  "numpy": min(time_calls(lambda: np.matmul(a.numpy(), b.numpy()), 5)[0]["times_s"])}
        array, tensor = np.ones(READ_BYTES // 8), torch.ones(READ_BYTES // 4)
        read = {"numpy": READ_BYTES / min(time_calls(array.sum, 5)[0]["times_s"]),
                "torch": READ_BYTES / min(time_calls(tensor.sum, 5)[0]["times_s"]),
                "torch_huge_pages": huge_page_read(torch)}
        return {"matmul_flops": {k: 2 * n**3 / s for k, s in matmul.items()}, "read_bytes_per_s": read}

    def prepare(self):
        """The shared weights: a LLaMA built with seed 0, saved as a Hugging Face directory with a tokenizer."""
        if (self.hf_dir / "config.json").is_file():
            return {}
        self.torch.manual_seed(0)
        config = self.transformers.LlamaConfig(**self.config, max_position_embeddings=2048, rms_norm_eps=1e-6,
                                               rope_theta=10000.0, bos_token_id=1, eos_token_id=2, pad_token_id=0,
                                               tie_word_embeddings=False)
        seconds, model = timed(lambda: self.transformers.LlamaForCausalLM(config))
        model.save_pretrained(self.hf_dir)
        # knowlm's builtin tokenizer, found without importing knowlm (and MindSpore) here.
        package = Path(importlib.util.find_spec("knowlm").origin).parent
        shutil.copyfile(package / "assets" / "tokenizer.model", self.hf_dir / "tokenizer.model")
        return {"build_s": seconds}

    def convert_input(self):
        """The checkpoint the conversion measure converts (bench/convert.py's sharded .bin files)."""
        source = convert_source(self.spec["workdir"])
        source.mkdir(exist_ok=True)
        size_mb = self.spec["convert_mb"] or weight_bytes(self.config) / 1e6
        config, total, largest = converter_bench().write_checkpoint(source, size_mb, 4,
                                                                    max(self.config["hidden_size"], 256))
        return {"bytes": total, "largest_shard": largest, "shape": config}

    def _model(self):
        return self.transformers.LlamaForCausalLM.from_pretrained(self.hf_dir, dtype=self.torch.float32)

    def prefill(self):
        model, ids = self._model().eval(), self.torch.tensor(token_ids((1, PREFILL), self.config["vocab_size"], 1))
        with self.torch.inference_mode():
            return time_calls(lambda: model(ids).logits, self.spec["repeats"]["prefill"])[0]

    def decode(self):
        torch, model = self.torch, self._model().eval()
        ids = torch.tensor(token_ids((1, PROMPT), self.config["vocab_size"], 2))

        def generate(new_tokens):
            with torch.inference_mode():
                return model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=new_tokens,
                                      min_new_tokens=new_tokens, do_sample=False, pad_token_id=0)
        return decode_result(generate, lambda out: out[0, PROMPT:].tolist(), self.spec["repeats"]["decode"])

    def train(self):
        import peft  # pylint: disable=import-outside-toplevel
        torch = self.torch
        model = self._model()
        model.config.use_cache = False
        model = peft.get_peft_model(model, peft.LoraConfig(r=LORA_RANK, lora_alpha=LORA_ALPHA, lora_dropout=0.0,
                                                           target_modules=["q_proj", "v_proj"]))
        model.train()
        optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=LEARNING_RATE,
                                      weight_decay=WEIGHT_DECAY)
        # The same rows as knowlm's, whose model takes seq_length + 1 ids and shifts them itself.
        ids = torch.tensor(token_ids((TRAIN_BATCH, TRAIN_SEQ + 1), self.config["vocab_size"], 3)[:, :TRAIN_SEQ])

        def step():
            loss = model(input_ids=ids, labels=ids).loss
            loss.backward()
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            return loss.item()
        return time_calls(step, self.spec["repeats"]["train"])[0]


class KnowLMSide:
    """knowlm: KnowLMForCausalLM in GRAPH mode, weights converted from the torch side's directory."""

    def __init__(self, spec):
        import logging  # pylint: disable=import-outside-toplevel
        import mindspore as ms  # pylint: disable=import-outside-toplevel
        ms.device_context.cpu.op_tuning.threads_num(THREADS)
        from mindformers.tools.logger import get_logger  # pylint: disable=import-outside-toplevel
        get_logger().setLevel(logging.WARNING)
        self.ms, self.spec, self.config = ms, spec, spec["config"]
        self.model_dir = Path(spec["workdir"]) / "knowlm"

    def prepare(self):
        from knowlm.checkpoints.convert import convert_checkpoint  # pylint: disable=import-outside-toplevel
        if (self.model_dir / "config.json").is_file():
            return {}
        return {"convert_s": timed(lambda: convert_checkpoint(Path(self.spec["workdir"]) / "hf",
                                                              self.model_dir))[0]}

    def _model(self, **overrides):
        from knowlm import KnowLMForCausalLM  # pylint: disable=import-outside-toplevel
        return KnowLMForCausalLM.from_pretrained(self.model_dir, **overrides)

    def prefill(self):
        ms = self.ms
        model = self._model(use_past=False, seq_length=PREFILL, batch_size=1)
        model.set_train(False)
        ids = ms.Tensor(token_ids((1, PREFILL), self.config["vocab_size"], 1), ms.int32)

        def forward():
            logits = model(ids)[0]
            ms.runtime.synchronize()
            return logits
        return time_calls(forward, self.spec["repeats"]["prefill"])[0]

    def _generate(self):
        model = self._model(use_past=True, seq_length=PREFILL, batch_size=1)
        prompt = token_ids(PROMPT, self.config["vocab_size"], 2).tolist()
        return lambda new_tokens: model.generate([prompt], max_new_tokens=new_tokens, do_sample=False)

    def decode(self):
        return decode_result(self._generate(), lambda out: [int(t) for t in out[0][PROMPT:]],
                             self.spec["repeats"]["decode"])

    def first_decode(self):
        """The first ``generate`` call alone: in a second process, with the graphs the first left in the cache."""
        generate = self._generate()
        return {"first_call_s": timed(lambda: generate(NEW_TOKENS))[0]}

    def train(self):
        ms = self.ms
        from mindformers.pet import LoraConfig, get_pet_model  # pylint: disable=import-outside-toplevel
        from knowlm.train.finetune import KnowLMTrainOneStepCell  # pylint: disable=import-outside-toplevel
        model = get_pet_model(self._model(use_past=False, seq_length=TRAIN_SEQ, batch_size=TRAIN_BATCH),
                              LoraConfig(lora_rank=LORA_RANK, lora_alpha=LORA_ALPHA, lora_dropout=0.0,
                                         target_modules=".*wq|.*wv"))
        optimizer = ms.nn.AdamWeightDecay(model.trainable_params(), learning_rate=LEARNING_RATE,
                                          weight_decay=WEIGHT_DECAY)
        cell = KnowLMTrainOneStepCell(model, optimizer)
        cell.set_train(True)
        ids = ms.Tensor(token_ids((TRAIN_BATCH, TRAIN_SEQ + 1), self.config["vocab_size"], 3), ms.int32)
        return time_calls(lambda: float(cell(ids)[0].asnumpy()), self.spec["repeats"]["train"])[0]


def decode_result(generate, new_tokens_of, repeats):
    """Time ``generate(NEW_TOKENS)`` and ``generate(1)`` (the prefill and first token); the step time is their
    difference over the NEW_TOKENS - 1 steps between. The memory read bandwidth is probed before each repeat and
    after the last (``huge_page_read``), and the best probe kept: this virtual machine's memory speed changes from
    minute to minute (the same probe read 70 and, 10 minutes later, 37 GB/s), so the run's bound, probed once, does
    not hold during every measure (a decode step measured at 105% of it)."""
    import torch  # pylint: disable=import-outside-toplevel
    torch.set_num_threads(THREADS)
    first, out = timed(lambda: generate(NEW_TOKENS))
    generate(1)
    long, short, probes = [], [], []
    for _ in range(repeats):
        probes.append(huge_page_read(torch))
        seconds, out = timed(lambda: generate(NEW_TOKENS))
        long.append(seconds)
        short.append(timed(lambda: generate(1))[0])
    probes.append(huge_page_read(torch))
    median = statistics.median
    return {"first_call_s": first, "median_s": median(long), "times_s": long, "tokens": new_tokens_of(out),
            "single_token_median_s": median(short), "step_s": (median(long) - median(short)) / (NEW_TOKENS - 1),
            "read_bytes_per_s": max(probes), "read_probes_bytes_per_s": probes}


SIDES = {"torch": TorchSide, "knowlm": KnowLMSide}


def child(spec):
    side = SIDES[spec["side"]](spec)
    print(MARK + json.dumps({task: getattr(side, task)() for task in spec["tasks"]}))


# ---------------------------------------------------------------------------------------------- parent

def converter_bench():
    """bench/convert.py as a module (bench/ is not a package)."""
    spec = importlib.util.spec_from_file_location("bench_convert", HERE / "convert.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def convert_source(workdir):
    return Path(workdir) / "convert-input"


def weight_bytes(c):
    """fp32 bytes of a whole checkpoint of ``c`` (untied embedding and lm_head)."""
    layers, head = weight_counts(c)
    return 4 * (layers + 2 * head)


def run_child(side, tasks, config_name, plan, workdir, log):
    spec = dict(side=side, tasks=tasks, config=CONFIGS[config_name], workdir=str(workdir),
                repeats=plan.repeats, convert_mb=plan.convert_mb[config_name])
    threads = {name: str(THREADS) for name in ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS")}
    # The run's own graph cache (knowlm.model.compile_cache): cold at the first call, warm at the rerun.
    env = {**os.environ, **threads, "GLOG_v": "3", "LOCAL_DEFAULT_PATH": str(workdir / "output"),
           "KNOWLM_CACHE_DIR": str(workdir / "cache")}
    start, others = time.perf_counter(), OtherLoad()
    done = subprocess.run([sys.executable, __file__, "--child", json.dumps(spec)], cwd=workdir, env=env,
                          capture_output=True, text=True, check=False)
    lines = [line for line in done.stdout.splitlines() if line.startswith(MARK)]
    if done.returncode != 0 or not lines:
        sys.exit(f"bench: {side} {'+'.join(tasks)} ({config_name}) failed:\n{done.stderr[-4000:]}")
    log(f"{config_name}: {side} {' + '.join(tasks)} done in {time.perf_counter() - start:.0f} s")
    results = json.loads(lines[-1][len(MARK):])
    for result in results.values():
        result["other_cores"] = others.cores()
    return results


def measure_conversion(workdir, repeats, log):
    """knowlm's converter and MindFormers' on the torch side's ``convert_input``, each in its own process."""
    bench = converter_bench()
    results = {}
    for which in ("knowlm", "mindformers"):
        runs, others = [], OtherLoad()
        for i in range(repeats):
            output = workdir / f"convert-{which}-{i}"
            runs.append(bench.measure(which, convert_source(workdir), output, workdir))
            shutil.rmtree(output, ignore_errors=True)
        results[which] = {"median_s": statistics.median(r["seconds"] for r in runs),
                          "peak_rss": max(r["peak"] for r in runs),
                          "rss_after_imports": max(r["baseline"] for r in runs), "runs": runs,
                          "other_cores": others.cores()}
        log(f"conversion: {which} done")
    return results


def run_config(name, plan, workdir, want_bounds, log):
    """Every measure of config ``name``: {measure: {side: result}} plus the conversion input and bounds."""
    workdir.mkdir(parents=True, exist_ok=True)
    setup = ["prepare", "convert_input"] + (["bounds"] if want_bounds else [])
    if plan.isolate:
        groups = {"torch": [setup] + [[m] for m in MEASURES], "knowlm": [["prepare"]] + [[m] for m in MEASURES]}
    else:                   # one process per side: its setup, then every measure
        groups = {"torch": [setup + list(MEASURES)], "knowlm": [["prepare", *MEASURES]]}
    raw = {"torch": {}, "knowlm": {}}
    for side, side_groups in groups.items():
        for tasks in side_groups:
            raw[side].update(run_child(side, tasks, name, plan, workdir, log))
    # A second process decoding with the same model loads the graphs the first one compiled.
    raw["knowlm"]["decode"]["first_call_cached_s"] = \
        run_child("knowlm", ["first_decode"], name, plan, workdir, log)["first_decode"]["first_call_s"]
    measures = {m: {side: raw[side][m] for side in raw} for m in MEASURES}
    measures["convert"] = {"input": raw["torch"]["convert_input"],
                           **measure_conversion(workdir, plan.convert_repeats, log)}
    return measures, raw["torch"].get("bounds")


def summarize_bounds(raw):
    peak = max(raw["matmul_flops"].values())
    bandwidth = max(raw["read_bytes_per_s"].values())
    return {**raw, "peak_flops": peak, "bandwidth": bandwidth}


def analyse(c, measures, bounds):
    """Add ratios (peer / knowlm) and fractions of the hardware bound to ``measures`` of config ``c``."""
    flops = {"prefill": forward_flops(c, 1, PREFILL), "train": train_flops(c, TRAIN_BATCH, TRAIN_SEQ)}
    for measure in ("prefill", "train"):
        entry = measures[measure]
        entry["flops"] = flops[measure]
        for side in ("knowlm", "torch"):
            entry[side]["fraction_of_peak_flops"] = flops[measure] / entry[side]["median_s"] / bounds["peak_flops"]
    decode = measures["decode"]
    decode["weight_bytes_per_token"] = 4 * sum(weight_counts(c))
    for side in ("knowlm", "torch"):
        entry = decode[side]
        entry["tokens_per_s"] = NEW_TOKENS / entry["median_s"]
        entry["bound_step_s"] = decode["weight_bytes_per_token"] / entry["read_bytes_per_s"]
        entry["fraction_of_bandwidth"] = entry["bound_step_s"] / entry["step_s"]
    decode["tokens_equal"] = decode["knowlm"]["tokens"] == decode["torch"]["tokens"]
    decode["step_ratio_torch_over_knowlm"] = decode["torch"]["step_s"] / decode["knowlm"]["step_s"]
    for measure in MEASURES:
        entry = measures[measure]
        entry["ratio_torch_over_knowlm"] = entry["torch"]["median_s"] / entry["knowlm"]["median_s"]
        entry["first_call_ratio_torch_over_knowlm"] = entry["torch"]["first_call_s"] / entry["knowlm"]["first_call_s"]
        entry["knowlm"]["compile_s"] = entry["knowlm"]["first_call_s"] - entry["knowlm"]["median_s"]
    convert = measures["convert"]
    for side in ("knowlm", "mindformers"):
        convert[side]["bytes_per_s"] = convert["input"]["bytes"] / convert[side]["median_s"]
        convert[side]["fraction_of_bandwidth"] = convert[side]["bytes_per_s"] / bounds["bandwidth"]
    convert["ratio_mindformers_over_knowlm"] = convert["mindformers"]["median_s"] / convert["knowlm"]["median_s"]
    convert["peak_rss_ratio_mindformers_over_knowlm"] = \
        convert["mindformers"]["peak_rss"] / convert["knowlm"]["peak_rss"]
    return measures


# ---------------------------------------------------------------------------------------------- report

def _s(seconds):
    return f"{seconds * 1e3:.1f} ms" if seconds < 1 else f"{seconds:.2f} s"


def table(results) -> str:
    bounds = results["bounds"]
    rows = [("config", "measure", "knowlm", "peer", "peer/knowlm", "knowlm 1st", "peer 1st", "knowlm/bound",
             "peer/bound")]

    def timing(name, label, entry, ratio, shown=_s):
        first = _s(entry["knowlm"]["first_call_s"])
        if "first_call_cached_s" in entry["knowlm"]:
            first += f" ({_s(entry['knowlm']['first_call_cached_s'])} cached)"
        return [name, label, shown(entry["knowlm"]), shown(entry["torch"]), f"{entry[ratio]:.2f}x",
                first, _s(entry["torch"]["first_call_s"])]

    def flops(entry):
        return [f"{entry[side]['fraction_of_peak_flops']:.0%} FLOP" for side in ("knowlm", "torch")]

    for name, m in results["configs"].items():
        dec, conv = m["decode"], m["convert"]
        rows.append(timing(name, "prefill 1x128", m["prefill"], "ratio_torch_over_knowlm",
                           lambda side: _s(side["median_s"])) + flops(m["prefill"]))
        rows.append(timing(name, f"decode {PROMPT}+{NEW_TOKENS}", dec, "ratio_torch_over_knowlm",
                           lambda side: f"{_s(side['median_s'])} {side['tokens_per_s']:.0f} tok/s")
                    + ["tokens equal" if dec["tokens_equal"] else "TOKENS DIFFER", ""])
        rows.append([name, "decode step", _s(dec["knowlm"]["step_s"]), _s(dec["torch"]["step_s"]),
                     f"{dec['step_ratio_torch_over_knowlm']:.2f}x", "", "",
                     *(f"{dec[side]['fraction_of_bandwidth']:.0%} of {dec[side]['read_bytes_per_s'] / 1e9:.0f} GB/s"
                       for side in ("knowlm", "torch"))])
        rows.append(timing(name, f"LoRA step {TRAIN_BATCH}x{TRAIN_SEQ}", m["train"], "ratio_torch_over_knowlm",
                           lambda side: _s(side["median_s"])) + flops(m["train"]))
        rows.append([name, f"convert {conv['input']['bytes'] / 1e9:.2f} GB",
                     *(f"{_s(conv[side]['median_s'])} {conv[side]['bytes_per_s'] / 1e6:.0f} MB/s"
                       for side in ("knowlm", "mindformers")),
                     f"{conv['ratio_mindformers_over_knowlm']:.2f}x", "", "",
                     *(f"{conv[side]['fraction_of_bandwidth']:.0%} BW" for side in ("knowlm", "mindformers"))])
        rows.append([name, "convert peak RSS",
                     *(f"{conv[side]['peak_rss'] / 1e6:.0f} MB" for side in ("knowlm", "mindformers")),
                     f"{conv['peak_rss_ratio_mindformers_over_knowlm']:.2f}x", "", "", "", ""])
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    lines = ["  ".join(cell.ljust(w) for cell, w in zip(row, widths)).rstrip() for row in rows]
    lines.insert(1, "-" * len(lines[0]))
    return "\n".join([
        f"bound: peak fp32 matmul {bounds['peak_flops'] / 1e9:.0f} GFLOP/s (torch "
        f"{bounds['matmul_flops']['torch'] / 1e9:.0f}, numpy {bounds['matmul_flops']['numpy'] / 1e9:.0f}), "
        f"memory read {bounds['bandwidth'] / 1e9:.1f} GB/s (numpy {bounds['read_bytes_per_s']['numpy'] / 1e9:.1f}, "
        f"torch {bounds['read_bytes_per_s']['torch'] / 1e9:.1f}, torch on huge pages "
        f"{bounds['read_bytes_per_s']['torch_huge_pages'] / 1e9:.1f}); {THREADS} threads per side",
        "peer: transformers (+PEFT) for prefill/decode/LoRA, MindFormers' convert_pt_to_ms for convert; "
        "peer/knowlm > 1: knowlm faster (smaller); 1st: first call (knowlm: includes GRAPH compile; cached: "
        "in a second process, graphs loaded from the compile cache); "
        "decode step: (t32 - t1) / 31; bound: FLOP = model FLOPs / time / peak, BW = bytes / time / bandwidth; "
        "decode step: weight bytes / step / the read bandwidth probed in its process during the measure (best)",
        *lines])


def disturbance(results) -> str:
    """One line: how much CPU other processes took during the run, and which measures they overlapped."""
    sides = [(m, side) for m in MEASURES for side in ("knowlm", "torch")] + \
        [("convert", side) for side in ("knowlm", "mindformers")]
    taken = {"bounds": results["bounds"]["other_cores"],
             **{f"{name} {m} {side}": measures[m][side]["other_cores"]
                for name, measures in results["configs"].items() for m, side in sides}}
    busy = [f"{what} ({cores:.2f})" for what, cores in taken.items() if (cores or 0) > BUSY]
    average = results["machine"]["other_cores"]
    if average is None:
        return "other processes: not measured (no /proc/stat)"
    line = f"other processes kept {average:.2f} of {os.cpu_count()} cores busy on average during the run"
    if not busy:
        return line + "; no measure was disturbed"
    return (line + f"; disturbed (cores taken): {', '.join(busy)}. Timings with other load mean little: 2-thread "
            "OpenMP work (torch) waits for a descheduled thread and runs many times slower; rerun on an idle machine")


def chart(results, path):
    import matplotlib  # pylint: disable=import-outside-toplevel
    import matplotlib.ticker  # pylint: disable=import-outside-toplevel
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt  # pylint: disable=import-outside-toplevel
    configs = results["configs"]
    fig, (left, right) = plt.subplots(1, 2, figsize=(13, 4.8))
    ratios = {"prefill": ("prefill", "ratio_torch_over_knowlm"), "decode": ("decode", "ratio_torch_over_knowlm"),
              "decode step": ("decode", "step_ratio_torch_over_knowlm"),
              "LoRA step": ("train", "ratio_torch_over_knowlm"),
              "convert": ("convert", "ratio_mindformers_over_knowlm"),
              "convert RSS": ("convert", "peak_rss_ratio_mindformers_over_knowlm")}
    width = 0.8 / len(configs)
    for i, (name, m) in enumerate(configs.items()):
        bars = left.bar([j + i * width for j in range(len(ratios))],
                        [m[measure][key] for measure, key in ratios.values()], width, label=name)
        left.bar_label(bars, fmt="%.2f", fontsize=7)
    left.set_yscale("log")
    left.yaxis.set_major_locator(matplotlib.ticker.LogLocator(subs=(1, 2, 5)))
    left.yaxis.set_major_formatter(matplotlib.ticker.ScalarFormatter())
    left.yaxis.set_minor_formatter(matplotlib.ticker.NullFormatter())
    left.axhline(1.0, color="black", linewidth=0.8)
    left.set_xticks([j + width * (len(configs) - 1) / 2 for j in range(len(ratios))], list(ratios), rotation=20)
    left.set_ylabel("peer / knowlm  (> 1: knowlm faster)")
    left.set_title("knowlm vs transformers (convert: vs MindFormers)")
    left.legend()
    bound = {"prefill": ("prefill", "fraction_of_peak_flops"), "decode step": ("decode", "fraction_of_bandwidth"),
             "LoRA step": ("train", "fraction_of_peak_flops")}
    labels, bars = [], {"knowlm": [], "torch": []}
    for name, m in configs.items():
        for label, (measure, key) in bound.items():
            labels.append(f"{name}\n{label}")
            for side, values in bars.items():
                values.append(100 * m[measure][side][key])
    for k, (side, values) in enumerate(bars.items()):
        right.bar([j + k * 0.4 for j in range(len(labels))], values, 0.4, label=side)
    right.set_xticks([j + 0.2 for j in range(len(labels))], labels, fontsize=8)
    right.set_ylabel("% of hardware bound")
    right.set_title("% of peak matmul FLOP/s (decode step: of memory bandwidth)")
    right.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main(argv=None):
    parser = argparse.ArgumentParser(prog="bench/run.py", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="the small config with 4 layers, fewer repeats, "
                                                             "100 MB conversion (under a minute)")
    parser.add_argument("--config", choices=("small", "large", "both"), default="both")
    parser.add_argument("--out", default=str(HERE / "results"), help="where results.json and results.png go")
    parser.add_argument("--workdir", help="keep the weights here and reuse them (default: a temporary directory)")
    parser.add_argument("--tiny", action="store_true", help=argparse.SUPPRESS)     # tests/test_bench.py
    parser.add_argument("--child", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.child:
        return child(json.loads(args.child))

    plan = make_plan(args)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    workdir = Path(args.workdir or tempfile.mkdtemp(prefix="knowlm-bench-")).resolve()
    started, others = time.perf_counter(), OtherLoad()

    def log(message):
        print(f"[{time.perf_counter() - started:5.0f} s] {message}", file=sys.stderr, flush=True)

    results = {"mode": "tiny" if args.tiny else "quick" if args.quick else "full",
               "machine": {"cpus": os.cpu_count(), "threads_per_side": THREADS,
                           "versions": {name: version(name) for name in VERSIONS}},
               "repeats": plan.repeats, "configs": {}}
    try:
        bounds = None
        for name in plan.configs:
            measures, raw_bounds = run_config(name, plan, workdir / name, bounds is None, log)
            bounds = bounds or summarize_bounds(raw_bounds)
            results["configs"][name] = analyse(CONFIGS[name], measures, bounds)
            results["configs"][name]["shape"] = CONFIGS[name]
    finally:
        if not args.workdir:
            shutil.rmtree(workdir, ignore_errors=True)
    results["bounds"] = bounds
    results["machine"].update(other_cores=others.cores(), seconds=time.perf_counter() - started)
    (out / "results.json").write_text(json.dumps(results, indent=1))
    chart(results, out / "results.png")
    print(table(results))
    print(disturbance(results))
    print(f"wrote {out / 'results.json'} and {out / 'results.png'} in {time.perf_counter() - started:.0f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
