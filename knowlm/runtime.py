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


# The cache folder MindSpore took in this process (it reads MS_COMPILER_CACHE_PATH once), and the key it stands for.
_PROCESS_CACHE = {}


@contextlib.contextmanager
def compile_cache(config, kernels=None, graphs=None):
    """Within the block, MindSpore keeps the graphs it compiles on disk, and a later process running the same model
    loads them instead of compiling (the first call's time is in the README's benchmark table).

    Used around generation only: training graphs carry the run's hyperparameters as constants and cannot be saved
    (PyExecute nodes). MindSpore files a process's graphs by the order it compiles them (``compile_cache_0``,
    ``_1``, ...), not by what they are, and checks a cached graph only against the network's parameters and its
    entry script's imports. The folder is therefore named after everything that decides which graphs come in which
    order: the MindSpore/MindFormers versions, knowlm's source, the model config, the kernel library its graphs
    call (``kernels``, see ``knowlm.models.kernels``) and ``graphs``, what the call compiles (the decoding path and
    the batch shape). MindSpore takes the folder once per process, so a later call in the same process whose key
    differs from the first compiles without the cache: its graphs would land in another key's folder. A
    ``MS_COMPILER_CACHE_ENABLE`` set by the user (``0`` turns caching off) is obeyed as it is.
    """
    if "MS_COMPILER_CACHE_ENABLE" in os.environ or not (sys.argv and os.path.isfile(sys.argv[0])):
        yield       # the user decides; or `python -c`/a REPL: MindSpore's cache needs an entry script to parse
        return
    digest = hashlib.sha256(_code_digest().encode())
    digest.update(json.dumps({key: value for key, value in config.to_dict().items()
                              if key != "checkpoint_name_or_path"}, sort_keys=True, default=str).encode())
    digest.update(json.dumps([str(kernels), graphs], default=str).encode())
    key = digest.hexdigest()[:20]
    first = _PROCESS_CACHE.setdefault("key", key)
    if first != key:
        ours = {"MS_COMPILER_CACHE_ENABLE": "0"}
    elif "MS_COMPILER_CACHE_PATH" in os.environ:
        ours = {"MS_COMPILER_CACHE_ENABLE": "1"}
    else:
        ours = {"MS_COMPILER_CACHE_ENABLE": "1", "MS_COMPILER_CACHE_PATH": str(cache_dir() / "graphs" / key)}
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
