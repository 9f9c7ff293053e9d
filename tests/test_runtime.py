"""Compiled graphs kept on disk: a second process loads them, and the tokens stay those of a fresh compile."""
import json
import os
import subprocess
import sys
from pathlib import Path

from knowlm import KnowLMConfig
from knowlm import runtime
from knowlm.runtime import compile_cache

SCRIPT = """
import json, sys, mindspore as ms
from knowlm import KnowLMConfig, KnowLMForCausalLM
ms.set_seed(0)
model = KnowLMForCausalLM(KnowLMConfig.from_name("tiny", use_past=True, batch_size=1, seq_length=32))
tokens = []
for mode in sys.argv[1:] or ["greedy"]:      # greedy: knowlm's loop; sample: MindFormers' (other graphs)
    sample = dict(do_sample=True, top_k=5, seed=3) if mode == "sample" else dict(do_sample=False)
    tokens.append([int(t) for t in model.generate([[5, 6, 7]], max_new_tokens=6, **sample)[0]])
print("TOKENS", json.dumps(tokens if sys.argv[1:] else tokens[0]))
"""


def _generate(tmp_path, *modes, inline=False, **env):
    env = {**os.environ, "KNOWLM_CACHE_DIR": str(tmp_path / "cache"), **env}
    for name in ("MS_COMPILER_CACHE_ENABLE", "MS_COMPILER_CACHE_PATH"):
        if name not in env or env[name] is None:
            env.pop(name, None)
    tmp_path.mkdir(exist_ok=True)
    (tmp_path / "run.py").write_text(SCRIPT, encoding="utf-8")
    command = ["-c", SCRIPT] if inline else ["run.py", *modes]
    done = subprocess.run([sys.executable, *command], env=env, cwd=tmp_path, capture_output=True, text=True,
                          check=False)
    assert done.returncode == 0, done.stderr[-2000:]
    return json.loads(done.stdout.split("TOKENS", 1)[1])


def _graphs(tmp_path):
    return {str(path): path.stat().st_mtime_ns for path in (tmp_path / "cache").rglob("*.mindir")}


def test_second_process_loads_cached_graphs_and_generates_the_same_tokens(tmp_path):
    unset = {"MS_COMPILER_CACHE_ENABLE": None, "MS_COMPILER_CACHE_PATH": None}
    first = _generate(tmp_path, **unset)
    written = _graphs(tmp_path)
    assert len(written) >= 2                           # the prefill graph and the decode-step graph
    assert _generate(tmp_path, **unset) == first
    assert _graphs(tmp_path) == written                # loaded, not compiled and written again
    assert _generate(tmp_path / "off", MS_COMPILER_CACHE_ENABLE="0") == first   # uncached reference
    assert not _graphs(tmp_path / "off")
    # No entry script to hash (`python -c`): generation works, without the cache.
    assert _generate(tmp_path / "inline", inline=True, **unset) == first
    assert not _graphs(tmp_path / "inline")


def test_greedy_then_sampling_then_greedy_each_reuse_their_own_cached_graphs(tmp_path):
    # The two decoding paths compile different graphs; MindSpore files them by compile order only.
    unset = {"MS_COMPILER_CACHE_ENABLE": None, "MS_COMPILER_CACHE_PATH": None}
    reference = _generate(tmp_path / "off", "greedy", "sample", MS_COMPILER_CACHE_ENABLE="0")
    assert reference[0] != reference[1]
    # Each path first in a process (cached), then again (loaded), then both in one process: the second path
    # compiles uncached there and leaves the first one's folder as it was.
    for modes in (["greedy"], ["sample"], ["greedy", "sample"], ["sample"]):
        expected = [reference[0] if mode == "greedy" else reference[1] for mode in modes]
        assert _generate(tmp_path, *modes, **unset) == expected, modes
    folders = {path.parent for path in (tmp_path / "cache").rglob("compile_cache_0.mindir")}
    assert len(folders) == 2                           # one per decoding path that came first in a process


def test_a_damaged_cached_graph_is_compiled_again(tmp_path):
    unset = {"MS_COMPILER_CACHE_ENABLE": None, "MS_COMPILER_CACHE_PATH": None}
    first = _generate(tmp_path, **unset)
    for path in (tmp_path / "cache").rglob("*.mindir"):
        path.chmod(0o600)
        path.write_bytes(path.read_bytes()[:1000])
    assert _generate(tmp_path, **unset) == first
    assert all(path.stat().st_size > 1000 for path in (tmp_path / "cache").rglob("*.mindir"))


def test_cache_is_on_only_while_generating_and_the_users_setting_wins(monkeypatch, tmp_path):
    config = KnowLMConfig.from_name("tiny", use_past=True)
    monkeypatch.setenv("KNOWLM_CACHE_DIR", str(tmp_path))
    monkeypatch.delenv("MS_COMPILER_CACHE_ENABLE", raising=False)
    monkeypatch.delenv("MS_COMPILER_CACHE_PATH", raising=False)
    monkeypatch.setattr(runtime, "_PROCESS_CACHE", {})
    with compile_cache(config):
        assert os.environ["MS_COMPILER_CACHE_ENABLE"] == "1"
        path = os.environ["MS_COMPILER_CACHE_PATH"]
        assert path.startswith(str(tmp_path / "graphs"))
    # Off again afterwards: a training graph compiled later in the process, or a child process, is not cached.
    assert "MS_COMPILER_CACHE_ENABLE" not in os.environ and "MS_COMPILER_CACHE_PATH" not in os.environ
    with compile_cache(config):
        assert os.environ["MS_COMPILER_CACHE_PATH"] == path
    # MindSpore keeps the process's first folder: another model config or decoding path compiles uncached here,
    # and is cached in a folder of its own when it comes first in a process.
    for other in (dict(config=KnowLMConfig.from_name("tiny", use_past=True, seq_length=64)), dict(graphs=(4, True))):
        with compile_cache(**{"config": config, **other}):
            assert os.environ["MS_COMPILER_CACHE_ENABLE"] == "0" and "MS_COMPILER_CACHE_PATH" not in os.environ
        monkeypatch.setattr(runtime, "_PROCESS_CACHE", {})
        with compile_cache(**{"config": config, **other}):
            assert os.environ["MS_COMPILER_CACHE_PATH"] != path
        monkeypatch.setattr(runtime, "_PROCESS_CACHE", {"key": "first"})
    monkeypatch.setenv("MS_COMPILER_CACHE_ENABLE", "0")
    with compile_cache(config):
        assert os.environ["MS_COMPILER_CACHE_ENABLE"] == "0"
    assert os.environ["MS_COMPILER_CACHE_ENABLE"] == "0"


def test_knowlm_command_is_quiet_and_leaves_no_log_folder_in_the_working_directory(tmp_path):
    command = [str(Path(sys.executable).with_name("knowlm")), "generate", "--model", "tiny", "--max-new-tokens",
               "4", "知识图谱"]
    env = {key: value for key, value in os.environ.items()
           if key not in ("GLOG_v", "MS_COMPILER_CACHE_ENABLE", "LOCAL_DEFAULT_PATH")}
    env["KNOWLM_CACHE_DIR"] = str(tmp_path / "cache")
    (tmp_path / "work").mkdir()
    for _ in range(2):      # compiles and writes the cache, then loads it
        done = subprocess.run(command, env=env, cwd=tmp_path / "work", capture_output=True, text=True, check=False)
        assert done.returncode == 0, done.stderr[-2000:]
        # Only knowlm's own notice: no MindSpore or MindFormers warnings (hyper_parallel imports, ...).
        assert done.stderr.splitlines() == ["knowlm: preset 'tiny' has random weights: its text is noise; pass a "
                                            "converted model directory for real output"]
        assert done.stdout.startswith("知识图谱") and done.stdout.count("\n") == 1
    assert list((tmp_path / "cache").rglob("*.mindir"))
    assert list((tmp_path / "work").iterdir()) == []                      # no ./output/log/rank_0
    # --verbose shows them again.
    done = subprocess.run([*command, "--verbose"], env=env, cwd=tmp_path / "work", capture_output=True, text=True,
                          check=False)
    assert done.returncode == 0 and "WARNING" in done.stderr
