"""A smoke run of bench/run.py on a tiny model (--tiny: one process per side, one or two calls per measure): its
JSON, its chart, and greedy tokens equal to transformers'.

Only the structure is checked: the numbers of a tiny model on a shared CI machine mean nothing.
"""
import json
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
RATIOS = {"prefill": ["ratio_torch_over_knowlm", "first_call_ratio_torch_over_knowlm"],
          "decode": ["ratio_torch_over_knowlm", "step_ratio_torch_over_knowlm", "first_call_ratio_torch_over_knowlm"],
          "train": ["ratio_torch_over_knowlm", "first_call_ratio_torch_over_knowlm"],
          "convert": ["ratio_mindformers_over_knowlm", "peak_rss_ratio_mindformers_over_knowlm"]}


def test_bench_writes_a_ratio_for_every_measure_and_a_chart(tmp_path):
    done = subprocess.run([sys.executable, str(REPO / "bench" / "run.py"), "--tiny", "--out", str(tmp_path)],
                          capture_output=True, text=True, timeout=300, check=False)
    assert done.returncode == 0, done.stderr[-3000:]
    results = json.loads((tmp_path / "results.json").read_text())
    assert results["bounds"]["peak_flops"] > 0 and results["bounds"]["bandwidth"] > 0
    tiny = results["configs"]["tiny"]
    for measure, ratios in RATIOS.items():
        for ratio in ratios:
            assert tiny[measure][ratio] > 0, (measure, ratio)
    for measure in ("prefill", "decode", "train"):
        for side in ("knowlm", "torch"):
            assert {"first_call_s", "median_s"} <= tiny[measure][side].keys()
    assert tiny["decode"]["knowlm"]["first_call_cached_s"] > 0      # a second process, graphs from the cache
    assert len(tiny["decode"]["knowlm"]["tokens"]) == 32 and tiny["decode"]["tokens_equal"] is True
    assert (tmp_path / "results.png").read_bytes().startswith(b"\x89PNG")
    assert "peer/knowlm" in done.stdout and "LoRA step 2x256" in done.stdout
