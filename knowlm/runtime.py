"""Where knowlm meets MindSpore's process-wide state: the device, the execution mode and the compile cache."""
import contextlib
import functools
import hashlib
import json
import logging
import os
import sys
from importlib.metadata import version

import mindspore as ms

from knowlm.files import PACKAGE_DIR, cache_dir

log = logging.getLogger("knowlm")


def on_ascend() -> bool:
    return ms.get_context("device_target") == "Ascend"


def use_graph_mode():
    """GRAPH mode off Ascend: MindSpore's default asynchronous PYNATIVE dispatch is many times slower on CPU."""
    if not on_ascend() and ms.get_context("mode") != ms.GRAPH_MODE:
        log.info("knowlm: switching MindSpore to GRAPH mode on %s", ms.get_context("device_target"))
        ms.set_context(mode=ms.GRAPH_MODE)


@contextlib.contextmanager
def compile_cache(config, kernels=None):
    """Within the block, MindSpore keeps the graphs it compiles on disk, and a later process running the same model
    loads them instead of compiling (the first call's time is in the README's benchmark table).

    Used around generation only: training graphs carry the run's hyperparameters as constants and cannot be saved
    (PyExecute nodes). MindSpore re-reads the switch for each graph but takes the folder once per process, and it
    checks a cached graph against the network's parameters and its entry script's own imports, not against installed
    packages: the folder is therefore named after the MindSpore/MindFormers versions, knowlm's source, the model
    config and the kernel library its graphs call (``kernels``, see ``knowlm.models.kernels``), so that a change to
    any of them compiles afresh. A ``MS_COMPILER_CACHE_ENABLE`` set by the user (``0`` turns caching off) is obeyed
    as it is.
    """
    if "MS_COMPILER_CACHE_ENABLE" in os.environ or not (sys.argv and os.path.isfile(sys.argv[0])):
        yield       # the user decides; or `python -c`/a REPL: MindSpore's cache needs an entry script to parse
        return
    ours = {"MS_COMPILER_CACHE_ENABLE": "1"}
    if "MS_COMPILER_CACHE_PATH" not in os.environ:
        digest = hashlib.sha256(_code_digest().encode())
        digest.update(json.dumps({key: value for key, value in config.to_dict().items()
                                  if key != "checkpoint_name_or_path"}, sort_keys=True, default=str).encode())
        digest.update(str(kernels).encode())
        ours["MS_COMPILER_CACHE_PATH"] = str(cache_dir() / "graphs" / digest.hexdigest()[:20])
    os.environ.update(ours)
    try:
        yield
    finally:        # nothing leaks into later training graphs or child processes
        for name in ours:
            os.environ.pop(name, None)


@functools.lru_cache(maxsize=None)
def _code_digest():
    # Once per process: generate runs once per batch of `knowlm extract`.
    digest = hashlib.sha256(json.dumps([version("mindspore"), version("mindformers")]).encode())
    for path in sorted(PACKAGE_DIR.rglob("*.py")) + sorted(PACKAGE_DIR.rglob("csrc/*")):
        digest.update(path.read_bytes())
    return digest.hexdigest()
