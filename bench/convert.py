"""Benchmark (not a test): knowlm's converter against MindFormers' ``convert_pt_to_ms`` on the same checkpoint.

    python bench/convert.py [--size-mb 1000] [--shards 4] [--hidden H] [--workdir DIR]

Generates a random fp32 Hugging Face LLaMA of about ``--size-mb`` as sharded ``pytorch_model-*.bin`` files (the
layout KnowLM-13B ships in) in a temporary directory, converts it with each converter in its own subprocess and
prints throughput (input MB per second of conversion, imports excluded), peak RSS while converting (VmHWM,
reset after the imports; shown as RSS after imports + what converting added, and that addition against the
largest shard), the whole process's peak (``ru_maxrss``) and the machine's memory bandwidth (a numpy copy), so the
figures can be read against the hardware. The input is freshly written, so it is read from the
page cache by both converters. The issue's target: peak RSS at most 1.5x the largest input shard, faster than
MindFormers.
"""
import argparse
import importlib.util
import json
import os
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

MB = 1e6


def memory_bandwidth(nbytes=256 * 2**20, repeats=5):
    """Bytes per second numpy copies between two large arrays (each byte read once and written once)."""
    import numpy as np  # pylint: disable=import-outside-toplevel
    src, dst = np.ones(nbytes // 8), np.empty(nbytes // 8)
    best = min(_timed(lambda: np.copyto(dst, src)) for _ in range(repeats))
    return nbytes / best


def _timed(call):
    start = time.perf_counter()
    call()
    return time.perf_counter() - start


def llama_shape(size_mb, hidden):
    """A LLaMA config of about ``size_mb`` fp32 megabytes: embeddings at most 40% of it, then whole layers."""
    hidden = hidden or (2048 if size_mb >= 800 else 1024)
    ffn = 256 * ((8 * hidden // 3 + 255) // 256)
    vocab = max(1024, min(32000, int(0.4 * size_mb * MB / (2 * hidden * 4)) // 64 * 64))   # >= builtin tokenizer
    per_layer = (4 * hidden * hidden + 3 * hidden * ffn + 2 * hidden) * 4
    layers = max(1, round((size_mb * MB - 2 * vocab * hidden * 4) / per_layer))
    return dict(hidden_size=hidden, intermediate_size=ffn, num_hidden_layers=layers, vocab_size=vocab,
                num_attention_heads=hidden // 128, num_key_value_heads=hidden // 128, max_position_embeddings=2048,
                rms_norm_eps=1e-6, rope_theta=10000.0, bos_token_id=1, eos_token_id=2, pad_token_id=0,
                tie_word_embeddings=False, hidden_act="silu", model_type="llama",
                architectures=["LlamaForCausalLM"], torch_dtype="float32")


def hf_tensor_shapes(c):
    h, f, v = c["hidden_size"], c["intermediate_size"], c["vocab_size"]
    shapes = {"model.embed_tokens.weight": (v, h)}
    for i in range(c["num_hidden_layers"]):
        p = f"model.layers.{i}."
        shapes.update({p + "self_attn.q_proj.weight": (h, h), p + "self_attn.k_proj.weight": (h, h),
                       p + "self_attn.v_proj.weight": (h, h), p + "self_attn.o_proj.weight": (h, h),
                       p + "mlp.gate_proj.weight": (f, h), p + "mlp.up_proj.weight": (f, h),
                       p + "mlp.down_proj.weight": (h, f), p + "input_layernorm.weight": (h,),
                       p + "post_attention_layernorm.weight": (h,)})
    shapes.update({"model.norm.weight": (h,), "lm_head.weight": (v, h)})
    return shapes


def write_checkpoint(directory: Path, size_mb, shards, hidden):
    """Random weights as ``shards`` .bin files of about equal size plus index, config and tokenizer."""
    import torch  # pylint: disable=import-outside-toplevel
    config = llama_shape(size_mb, hidden)
    shapes = hf_tensor_shapes(config)
    total = sum(4 * torch.Size(s).numel() for s in shapes.values())
    groups, current, size = [], {}, 0
    for name, shape in shapes.items():
        current[name] = shape
        size += 4 * torch.Size(shape).numel()
        if size >= total * (len(groups) + 1) / shards and len(groups) < shards - 1:
            groups.append(current)
            current = {}
    groups.append(current)
    weight_map, generator = {}, torch.Generator().manual_seed(0)
    for i, group in enumerate(groups, 1):
        name = f"pytorch_model-{i:05d}-of-{len(groups):05d}.bin"
        torch.save({k: torch.randn(s, generator=generator) * 0.02 for k, s in group.items()}, directory / name)
        weight_map.update({k: name for k in group})
    (directory / "pytorch_model.bin.index.json").write_text(json.dumps(
        {"metadata": {"total_size": total}, "weight_map": weight_map}))
    (directory / "config.json").write_text(json.dumps(config))
    # The builtin tokenizer, found without importing knowlm (and MindSpore) into this process.
    package = Path(importlib.util.find_spec("knowlm").origin).parent
    shutil.copyfile(package / "assets" / "tokenizer.model", directory / "tokenizer.model")
    return config, total, max((directory / f).stat().st_size for f in set(weight_map.values()))


def child(which, source, output):
    """Runs in the subprocess: import, note RSS, convert, report one JSON line."""
    os.environ.setdefault("GLOG_v", "3")
    if which == "knowlm":
        from knowlm.checkpoints.convert import convert_checkpoint  # pylint: disable=import-outside-toplevel

        def run():
            convert_checkpoint(source, output, prefer="bin")
    else:
        from mindformers.models.llama.convert_weight import \
            convert_pt_to_ms  # pylint: disable=import-outside-toplevel

        def run():
            convert_pt_to_ms(source, str(Path(output) / "mindformers.ckpt"))
            if not (Path(output) / "mindformers.ckpt").is_file():
                raise SystemExit("MindFormers wrote no checkpoint")
    Path(output).mkdir(exist_ok=True)
    baseline = _status_bytes("VmRSS")
    # Linux: writing 5 to clear_refs resets the peak (VmHWM) to the current RSS, so the peak measured next is
    # the conversion's, not the imports' transient one.
    Path("/proc/self/clear_refs").write_text("5")
    seconds = _timed(run)
    print(json.dumps({"seconds": seconds, "baseline": baseline, "converting": _status_bytes("VmHWM"),
                      "peak": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024}))


def _status_bytes(field):
    line = next(row for row in Path("/proc/self/status").read_text().splitlines() if row.startswith(field + ":"))
    return int(line.split()[1]) * 1024


def measure(which, source, output, workdir):
    start = time.perf_counter()
    done = subprocess.run([sys.executable, __file__, "--child", which, str(source), str(output)], cwd=workdir,
                          capture_output=True, text=True, env={**os.environ, "GLOG_v": "3"}, check=False)
    if done.returncode != 0:
        sys.exit(f"{which} failed:\n{done.stderr[-3000:]}")
    result = json.loads(done.stdout.strip().splitlines()[-1])
    result["wall"] = time.perf_counter() - start
    return result


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--size-mb", type=float, default=1000)
    parser.add_argument("--shards", type=int, default=4)
    parser.add_argument("--hidden", type=int, help="default: 2048 from 800 MB up, else 1024")
    parser.add_argument("--workdir", help="where the checkpoints go (default: a temporary directory, removed)")
    parser.add_argument("--child", nargs=3, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        return child(*args.child)

    workdir = Path(args.workdir or tempfile.mkdtemp(prefix="knowlm-bench-"))
    try:
        source = workdir / "hf"
        source.mkdir(parents=True, exist_ok=True)
        config, total, largest = write_checkpoint(source, args.size_mb, args.shards, args.hidden)
        print(f"machine: {os.cpu_count()} CPUs, numpy copy {memory_bandwidth() / 1e9:.1f} GB/s "
              "(bytes copied per second: each read once, written once)")
        print(f"input: {args.shards} .bin shards, {total / MB:.0f} MB fp32, largest shard {largest / MB:.0f} MB; "
              f"hidden {config['hidden_size']}, {config['num_hidden_layers']} layers, vocab {config['vocab_size']}")
        results = {}
        for which in ("knowlm", "mindformers"):
            r = results[which] = measure(which, source, workdir / f"out-{which}", workdir)
            print(f"{which:12s} {total / MB / r['seconds']:7.0f} MB/s ({r['seconds']:.2f} s converting, "
                  f"{r['wall']:.1f} s with imports); peak RSS while converting {r['converting'] / MB:.0f} MB = "
                  f"{r['baseline'] / MB:.0f} MB after imports + {(r['converting'] - r['baseline']) / MB:.0f} MB "
                  f"= {(r['converting'] - r['baseline']) / largest:.2f}x largest shard; process peak "
                  f"{r['peak'] / MB:.0f} MB")
        ours, theirs = results["knowlm"], results["mindformers"]
        added = [max(r["converting"] - r["baseline"], 1) for r in (ours, theirs)]
        print(f"ratio knowlm / mindformers: speed {theirs['seconds'] / ours['seconds']:.2f}x, "
              f"peak RSS {ours['peak'] / theirs['peak']:.2f}x, RSS added by converting {added[0] / added[1]:.2f}x")
    finally:
        if not args.workdir:
            shutil.rmtree(workdir, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
