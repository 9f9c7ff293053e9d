"""The analysis and the printed report of ``bench/real.py``: best of the rounds, the decode bound, ratios, tables."""
ENGINES = ("knowlm", "transformers", "llama.cpp")
PRECISIONS = ("fp32", "bf16", "int8")
PEERS = {"fp32": "f32", "bf16": "bf16", "int8": "q8_0"}     # llama.cpp's name of each precision
FIRST_TOKENS = 64
# name -> (request, prompt length the request's tokens are counted from, decode steps)
MEASURES = {
    "prefill 47 tok": ({"op": "prefill", "prompt": "chat"}, None, None),
    "prefill 1000 tok": ({"op": "prefill", "prompt": "text1000"}, None, None),
    "decode step @64": ({"op": "decode", "prompt": "chat", "n": 16}, "chat", 16),
    "decode step @2000": ({"op": "decode", "prompt": "text1984", "n": 32}, "text1984", 32),
    "generate 64 tok": ({"op": "generate", "prompt": "chat", "n": 64}, None, None),
}
QUICK = ("prefill 47 tok", "decode step @64", "generate 64 tok")
BUSY = 0.1          # cores other processes kept busy during a measure above which it is marked (*)

# ---------------------------------------------------------------------------------------------- analysis

def shape():
    """SmolLM2-135M: (parameters of every matmul a token goes through, lm_head included; layers; KV width)."""
    h, layers, kv, ffn, vocab = 576, 30, 3 * 64, 1536, 49152
    return layers * (2 * h * h + 2 * h * kv + 3 * h * ffn) + vocab * h, layers, kv


def bytes_per_weight(engine, precision, result):
    """What the engine's matmuls read per weight: knowlm's from the bytes its layers hold (a bf16 or int8
    directory that loads as fp32 counts 4), the others' from their format."""
    if engine == "knowlm" and result.get("start", {}).get("layer_bytes"):
        matmuls, layers, _ = shape()
        layer_params = matmuls - 49152 * 576
        return result["start"]["layer_bytes"] / layer_params
    if engine == "llama.cpp":
        return {"fp32": 4, "bf16": 2, "int8": 34 / 32}[precision]
    return {"fp32": 4, "bf16": 2}[precision]


def analyse(phases, prompts):
    """Best of the rounds, the decode bound, and peer/knowlm ratios, in place."""
    matmuls, layers, kv = shape()
    for ctx, phase in phases.items():
        bandwidth = phase["read_bytes_per_s"]
        for key, result in phase["engines"].items():
            engine, precision = key.split(" ")
            bpw = bytes_per_weight(engine, precision, result)
            kv_bytes = 2 if engine == "llama.cpp" or (engine == "transformers" and precision == "bf16") else 4
            result["bytes_per_weight"] = bpw
            best = result["best"] = {}
            for name, replies in result["measures"].items():
                field = "step_s" if "step_s" in replies[0] else "s"
                fastest = min(replies, key=lambda r, f=field: r[f])
                best[name] = {"s": fastest[field], "other_cores": fastest.get("other_cores"),
                              "rounds_s": [r[field] for r in replies]}
                prompt, steps = MEASURES[name][1], MEASURES[name][2]
                if prompt:
                    position = len(prompts[prompt]) + steps / 2
                    read = bpw * matmuls + 2 * layers * position * kv * kv_bytes
                    best[name].update(bytes=read, bound_s=read / bandwidth,
                                      fraction_of_bound=read / bandwidth / best[name]["s"])
                if name.startswith("generate"):
                    best[name]["tokens_per_s"] = FIRST_TOKENS / best[name]["s"]
                    best[name]["tokens"] = replies[-1]["tokens"]
        for precision in PRECISIONS:
            own = phase["engines"].get(f"knowlm {precision}", {})
            for key, result in phase["engines"].items():
                if not key.endswith(precision) or key.startswith("knowlm"):
                    continue
                ratios = result["ratio_over_knowlm"] = {}
                for name, entry in result.get("best", {}).items():
                    if name in own.get("best", {}):
                        ratios[name] = entry["s"] / own["best"][name]["s"]
                if result.get("start") and own.get("start"):
                    ratios["first call"] = result["start"]["first_call_s"] / own["start"]["first_call_s"]
                if result.get("peak_rss") and own.get("peak_rss"):
                    ratios["peak RSS"] = result["peak_rss"] / own["peak_rss"]
        reference = phase["engines"].get("transformers fp32", {}).get("best", {}).get("generate 64 tok", {})
        for result in phase["engines"].values():
            tokens = result.get("best", {}).get("generate 64 tok", {}).get("tokens")
            if tokens and reference.get("tokens"):      # how many leading tokens agree
                same = next((i for i, (a, b) in enumerate(zip(tokens, reference["tokens"])) if a != b), len(tokens))
                result["best"]["generate 64 tok"]["tokens_equal_transformers_fp32"] = same


# ---------------------------------------------------------------------------------------------- report

def _s(seconds):
    return f"{seconds * 1e3:.1f} ms" if seconds < 1 else f"{seconds:.2f} s"


def cell(result, name):
    """The table's cell; ``*``: other processes kept more than BUSY cores busy during it."""
    if result is None:
        return "-"
    if name == "first call":
        start = result.get("start")
        return f"{_s(start['first_call_s'])} (load {_s(start['load_s'])}){_busy(start)}" if start else "failed"
    if name == "peak RSS":
        return f"{result['peak_rss'] / 1e9:.2f} GB" if result.get("peak_rss") else "-"
    entry = result.get("best", {}).get(name)
    if entry is None:
        return "failed" if result.get("failed") else "-"
    if "tokens_per_s" in entry:
        return f"{entry['tokens_per_s']:.1f} tok/s{_busy(entry)}"
    if "fraction_of_bound" in entry:
        return f"{_s(entry['s'])} ({entry['fraction_of_bound']:.0%} BW){_busy(entry)}"
    return _s(entry["s"]) + _busy(entry)


def _bound(result, name):
    """The bandwidth bound of a decode step: bytes read / best read bandwidth of the phase."""
    entry = result.get("best", {}).get(name)
    return f"{_s(entry['bound_s'])} ({entry['bytes'] / 1e6:.0f} MB)" if entry else "-"


def _mb(size):
    return f"{size / 1e6:.0f} MB" if size >= 1e7 else f"{size / 1e6:.2f} MB"


def _busy(entry):
    return "*" if (entry.get("other_cores") or 0) > BUSY else ""


def table(results) -> str:
    lines = []
    for ctx, phase in results["phases"].items():
        engines = phase["engines"]
        for precision in results["precisions"]:
            keys = [f"{e} {precision}" for e in ENGINES if f"{e} {precision}" in engines]
            if not keys:
                continue
            peers = [k for k in keys if not k.startswith("knowlm")]
            header = [f"ctx {ctx} {precision}", *[k if not k.startswith("llama") else f"llama.cpp {PEERS[precision]}"
                                                   for k in keys], *[f"{k.split()[0]}/knowlm" for k in peers]]
            rows = [header]
            names = [n for n in MEASURES if any(n in engines[k].get("best", {}) for k in keys)]
            for name in names + ["first call", "peak RSS"]:
                ratios = [engines[k].get("ratio_over_knowlm", {}).get(name) for k in peers]
                rows.append([name, *[cell(engines[k], name) for k in keys],
                             *[f"{r:.2f}x" if r else "-" for r in ratios]])
                if name.startswith("decode"):
                    rows.append(["  its bound", *[_bound(engines[k], name) for k in keys]] + [""] * len(peers))
            widths = [max(len(row[i]) for row in rows) for i in range(len(header))]
            block = ["  ".join(c.ljust(w) for c, w in zip(row, widths)).rstrip() for row in rows]
            lines += ["", block[0], "-" * len(block[0]), *block[1:]]
            for key in keys:
                start, failed = engines[key].get("start", {}), engines[key].get("failed")
                held = start.get("held_bytes") or {}
                note = [f"weights held: {', '.join(f'{d} {_mb(b)}' for d, b in held.items())}"] if held else []
                if key.startswith("llama") and start.get("tokenizer_equal") is not None:
                    note.append(f"its tokenizer gives the same ids: {start['tokenizer_equal']}")
                if "generate 64 tok" in engines[key].get("best", {}) and not key.startswith("transformers fp32"):
                    note.append(f"greedy tokens equal to transformers fp32's: "
                                f"{engines[key]['best']['generate 64 tok'].get('tokens_equal_transformers_fp32')}"
                                f"/{FIRST_TOKENS}")
                if failed:
                    note.append(f"FAILED: {failed}")
                lines.append(f"  {key}: " + "; ".join(note))
        lines.append(f"  ctx {ctx}: memory read {phase['read_bytes_per_s'] / 1e9:.1f} GB/s (best probe; "
                     f"{', '.join(f'{p / 1e9:.0f}' for p in phase['read_probes_bytes_per_s'])}); other processes "
                     f"kept {phase['other_cores'] or 0:.2f} cores busy")
    for key, reason in results["skipped"].items():
        lines.append(f"skipped {key}: {reason}")
    lines.append(f"*: other processes kept more than {BUSY} cores busy during it (a 2-thread engine then waits for "
                 "a descheduled thread and runs many times slower). BW: the decode step's bytes (weights of every "
                 "matmul + KV cache) / the phase's best read bandwidth / its time. Ratios: peer / knowlm, time or "
                 "RSS (>1: knowlm faster or smaller); best of the rounds.")
    return "\n".join(lines)


def summary(results) -> str:
    parts = []
    for ctx, phase in results["phases"].items():
        for precision in results["precisions"]:
            peer = phase["engines"].get(f"llama.cpp {precision}", {}).get("ratio_over_knowlm", {})
            if peer:
                shown = ", ".join(f"{n.replace(' tok', '')} {r:.2f}x" for n, r in peer.items())
                parts.append(f"ctx {ctx} {precision} llama.cpp/knowlm: {shown}")
        torch = phase["engines"].get("transformers fp32", {}).get("ratio_over_knowlm", {})
        if "generate 64 tok" in torch:
            parts.append(f"ctx {ctx} transformers/knowlm generate 64: {torch['generate 64 tok']:.2f}x")
    return "summary: " + ("; ".join(parts) or "nothing measured") + " (>1: knowlm faster/smaller)"


