"""``bench/real.py --layer13b``: what knowlm's decoding would do on KnowLM-13B here, from one and two decoder layers.

KnowLM-13B is LLaMA-13B: hidden 5120, 40 heads, SwiGLU 13824, vocabulary 32000, 40 layers, untied lm_head. A model
with 1 and one with 2 such layers (random weights: torch, seed 0, saved as a Hugging Face directory with knowlm's
builtin tokenizer, then ``knowlm convert [--dtype bf16|int8]``; cached in ``<knowlm cache>/bench/layer13b/``)
decode in interleaved rounds (seq_length 2048, a 32-token prompt, 64 steps, knowlm's public ``generate``; the step is
(t(65 tokens) - t(1 token)) / 64). One layer's step is the difference of the two; the 40-layer step is the 1-layer
step + 39 layers. Its memory: the weights the 1- and 2-layer processes hold, extrapolated the same way, plus the fp32
KV cache of 2048 positions. Printed beside llama.cpp's published figure (``/work/shared/notes/real-model.md``):
Llama-3.1-8B Q8_0 at 7.56 tokens/s on a 4-thread Zen 4, 55-85% of its DRAM bandwidth, restated as what 55-85% of
this machine's measured bandwidth gives on 13B's bytes.
"""
import json
import shutil
import subprocess
import sys
from pathlib import Path

SHAPE = dict(hidden_size=5120, num_attention_heads=40, num_key_value_heads=40, intermediate_size=13824,
             vocab_size=32000)
LAYERS = 40
SEQ_LENGTH, PROMPT, STEPS, ROUNDS = 2048, 32, 64, 3
BYTES_PER_WEIGHT = {"fp32": 4, "bf16": 2, "int8": 34 / 32}          # int8: Q8_0 blocks (32 int8 + one fp16 scale)
ANCHOR = {"tokens_per_s": 7.56, "params": 8.03e9, "bandwidth_fraction": (0.55, 0.85),
          "what": "llama.cpp Llama-3.1-8B Q8_0, 4-thread Zen 4 (published)"}


def weights(layers):
    h, f, v = SHAPE["hidden_size"], SHAPE["intermediate_size"], SHAPE["vocab_size"]
    return layers * (4 * h * h + 3 * h * f), v * h          # (layers' matmuls, lm_head); the embedding is a lookup


def build(layers, out, shape):
    """The random Hugging Face LLaMA with ``layers`` layers of ``shape`` (run in its own process: torch's memory)."""
    import torch  # pylint: disable=import-outside-toplevel
    import transformers  # pylint: disable=import-outside-toplevel
    torch.manual_seed(0)
    config = transformers.LlamaConfig(**shape, num_hidden_layers=layers, max_position_embeddings=2048,
                                      rms_norm_eps=1e-6, rope_theta=10000.0, bos_token_id=1, eos_token_id=2,
                                      pad_token_id=0, tie_word_embeddings=False)
    transformers.LlamaForCausalLM(config).save_pretrained(out)
    shutil.copyfile(Path(__file__).resolve().parents[1] / "knowlm" / "assets" / "tokenizer.model",
                    Path(out) / "tokenizer.model")


def prepare(precisions, log):
    """``(models, skipped)``: the knowlm directory of each (precision, layers)."""
    from knowlm.files import cache_dir  # pylint: disable=import-outside-toplevel
    prepare_real = _sibling("real_prepare")
    base = cache_dir() / "bench" / "layer13b"
    digest = prepare_real.converter_digest()
    models, skipped = {}, {}
    for layers in (1, 2):
        hf = base / f"hf-{layers}"
        for precision in precisions:
            out = base / f"knowlm-{precision}-{layers}-{digest}"
            for stale in base.glob(f"knowlm-{precision}-{layers}-*"):
                if stale != out:
                    shutil.rmtree(stale, ignore_errors=True)
            if (out / "config.json").is_file():
                models[precision, layers] = str(out)
                continue
            if not (hf / "config.json").is_file():
                log(f"layer13b: building the random {layers}-layer model")
                subprocess.run([sys.executable, __file__, "--build", str(layers), str(hf), json.dumps(SHAPE)],
                               check=True)
            log(f"layer13b: knowlm convert --dtype {precision} -> {out}")
            failed = prepare_real.knowlm_cli("convert", str(hf), str(out), "--dtype", precision, "--force")
            if failed:
                skipped[precision] = f"knowlm convert --dtype {precision} failed: {failed}"
                continue
            models[precision, layers] = str(out)
        shutil.rmtree(hf, ignore_errors=True)           # 2.6 / 3.9 GB; the knowlm directories are what runs
    return models, skipped


def _sibling(name):
    import importlib.util  # pylint: disable=import-outside-toplevel
    spec = importlib.util.spec_from_file_location(f"bench_{name}", Path(__file__).parent / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def run(args, workdir, probe, log):
    """Every precision in ``args.precisions``: both depths in one phase, interleaved; projected to 40 layers."""
    real = _sibling("real")
    models, skipped = prepare(args.precisions, log)
    prompts = workdir / "prompts13b.json"
    prompts.write_text(json.dumps({"chat": list(range(3, 3 + PROMPT)), "rand": list(range(3, 3 + PROMPT))}))
    spec = {"prompts": str(prompts)}
    results = {"skipped": skipped, "projections": {}}
    for precision in args.precisions:
        keys = [(precision, layers) for layers in (1, 2) if (precision, layers) in models]
        if len(keys) < 2:
            continue
        children = [real.Child("knowlm", f"{precision}-L{layers}", SEQ_LENGTH, models[precision, layers], workdir,
                               spec) for _, layers in keys]
        phase = real.Phase(children, args.max_rss_gb * 2**30, args.timeout, log)
        request = {"op": "decode", "prompt": "rand", "n": STEPS}
        for child in children:
            child.results.update(phase.ask(child) or {})
            child.results["start"] = phase.ask(child, {"op": "start", "prompt": "chat", "n": 2})
            phase.ask(child, request)
        probes, steps = [], {1: [], 2: []}
        rounds = 1 if args.quick else ROUNDS
        for r in range(rounds):
            phase.load.wait_idle(args.idle_wait, log)
            probes.append(probe())
            for (key, child) in (list(zip(keys, children)) if r % 2 == 0 else list(zip(keys, children))[::-1]):
                reply = phase.ask(child, request)
                if reply:
                    steps[key[1]].append(reply["step_s"])
        probes.append(probe())
        rss = [phase.ask(child, {"op": "rss"}) or {} for child in children]
        for child in children:
            child.fail("done")
        if not (steps[1] and steps[2]):
            skipped[precision] = "; ".join(c.failed for c in children if c.failed != "done") or "no steps"
            continue
        results["projections"][precision] = project(precision, min(steps[1]), min(steps[2]),
                                                   [c.results.get("start") or {} for c in children], rss,
                                                   max(probes))
        log(f"layer13b {precision}: 1 layer {min(steps[1]) * 1e3:.1f} ms, 2 layers {min(steps[2]) * 1e3:.1f} ms")
    return results


def project(precision, one, two, starts, rss, bandwidth):
    layer_s = two - one
    if layer_s <= 0:            # the 2-layer step no slower than the 1-layer one: noise, nothing to project
        return {"step_1_layer_s": one, "step_2_layers_s": two, "layer_s": layer_s, "projected": False}
    step_s = one + (LAYERS - 1) * layer_s
    held = [sum((s.get("held_bytes") or {}).values()) for s in starts]
    layer_bytes = held[1] - held[0] if all(held) else None
    h = SHAPE["hidden_size"]
    kv_cache = 2 * LAYERS * SEQ_LENGTH * h * 4
    matmuls, head = weights(LAYERS)
    bpw = (layer_bytes / weights(1)[0]) if layer_bytes else BYTES_PER_WEIGHT[precision]
    read = bpw * (matmuls + head)
    anchor_bytes = ANCHOR["params"] * 34 / 32
    return {"step_1_layer_s": one, "step_2_layers_s": two, "layer_s": layer_s, "step_s": step_s, "projected": True,
            "tokens_per_s": 1 / step_s, "bytes_per_weight": bpw, "read_bytes_per_token": read,
            "bound_s": read / bandwidth, "fraction_of_bound": read / bandwidth / step_s,
            "weights_bytes": (held[0] + (LAYERS - 1) * layer_bytes) if layer_bytes else None,
            "kv_cache_bytes": kv_cache, "peak_rss": [r.get("peak_rss") for r in rss],
            "peak_rss_projected": (rss[0]["peak_rss"] + (LAYERS - 1) * (rss[1]["peak_rss"] - rss[0]["peak_rss"]))
            if all(r.get("peak_rss") for r in rss) else None,
            "read_bytes_per_s": bandwidth,
            "llama_cpp_anchor": {**ANCHOR, "q8_0_13b_tokens_per_s_here": [
                f * bandwidth / (1.0625 * sum(weights(LAYERS))) for f in ANCHOR["bandwidth_fraction"]],
                "anchor_bytes_per_token": anchor_bytes}}


def table(results) -> str:
    lines = ["", f"KnowLM-13B shape (hidden 5120, SwiGLU 13824, vocab 32000), knowlm decode projected from 1 and 2 "
             f"layers to {LAYERS} (seq_length {SEQ_LENGTH})",
             "precision  1 layer    2 layers   per layer  40 layers         bound         weights    +KV cache  "
             "peak RSS (proj.)  llama.cpp Q8_0 here (anchor)"]
    for precision, p in results["projections"].items():
        if not p["projected"]:
            lines.append(f"{precision:<9}  {p['step_1_layer_s'] * 1e3:6.1f} ms  {p['step_2_layers_s'] * 1e3:6.1f} ms  "
                         "2 layers no slower than 1: noise (other load?), not projected")
            continue
        low, high = p["llama_cpp_anchor"]["q8_0_13b_tokens_per_s_here"]
        gb = (lambda b: f"{b / 1e9:.1f} GB" if b else "-")
        lines.append(f"{precision:<9}  {p['step_1_layer_s'] * 1e3:6.1f} ms  {p['step_2_layers_s'] * 1e3:6.1f} ms  "
                     f"{p['layer_s'] * 1e3:6.1f} ms  {p['step_s'] * 1e3:.0f} ms {p['tokens_per_s']:.2f} tok/s  "
                     f"{p['fraction_of_bound']:.0%} of {p['read_bytes_per_s'] / 1e9:.0f} GB/s  "
                     f"{gb(p['weights_bytes']):<9}  {gb(p['kv_cache_bytes']):<9}  {gb(p['peak_rss_projected']):<16}  "
                     f"{low:.2f}-{high:.2f} tok/s")
    lines.append(f"anchor: {ANCHOR['what']}: {ANCHOR['tokens_per_s']} tok/s at 55-85% of its DRAM bandwidth; "
                 "restated: 55-85% of this run's read bandwidth over 13B's Q8_0 bytes")
    lines += [f"layer13b skipped {k}: {v}" for k, v in results["skipped"].items()]
    return "\n".join(lines)


def summary(results) -> str:
    projected = {precision: p for precision, p in results["projections"].items() if p["projected"]}
    parts = [f"{precision} {p['tokens_per_s']:.2f} tok/s ({p['fraction_of_bound']:.0%} of the bandwidth bound)"
             for precision, p in projected.items()]
    low, high = next(iter(projected.values()), {}).get("llama_cpp_anchor", {}).get(
        "q8_0_13b_tokens_per_s_here", (0, 0))
    return (f"summary: knowlm KnowLM-13B decode projected from 1-2 layers: {'; '.join(parts) or 'nothing measured'}"
            f"; llama.cpp's published efficiency restated for 13B Q8_0 here: {low:.2f}-{high:.2f} tok/s")


if __name__ == "__main__" and sys.argv[1:2] == ["--build"]:
    build(int(sys.argv[2]), sys.argv[3], json.loads(sys.argv[4]))
