"""knowlm's own CPU kernel: a matrix-vector product for decoding, built on first use as a MindSpore AOT custom op.

Decoding multiplies one new token per sequence by every weight, so its speed is the memory bandwidth at which the
weights stream. On the 2-core machine knowlm is measured on (a plain sum reads 29-32 GB/s), MindSpore's CPU
``MatMul`` streams such products at 15-19 GB/s inside a decode step and ``csrc/gemv.cpp`` at 28-29 GB/s (profiled);
the benchmark's large-config decode step went from 80.6 ms to 54.6 ms, 94% of the bandwidth bound.

The library is compiled with the system's C++ compiler (``$CXX``, else ``c++``; its threads follow
``OMP_NUM_THREADS``, else one per core) into knowlm's cache folder, once per source and machine. Without a
compiler, or with ``KNOWLM_CPU_KERNELS=0``, the models keep MindSpore's ``MatMul``: same tokens, slower decoding.
"""
import functools
import hashlib
import logging
import os
import platform
import shutil
import subprocess
from pathlib import Path

from mindspore import nn, ops

log = logging.getLogger("knowlm")

SOURCE = Path(__file__).parent / "csrc" / "gemv.cpp"
FLAGS = ("-O3", "-march=native", "-pthread", "-shared", "-fPIC", "-std=c++17")
# Up to this many rows (sequences decoding at once) the kernel beats MatMul: 1.3-1.8x its speed at 1, 4 and 8 rows
# on the benchmark's weight shapes; at 16 rows sometimes slower.
GEMV_MAX_ROWS = 8


def _cpu_signature() -> str:
    # -march=native: a library built on one CPU may not run on another sharing the cache folder.
    cpuinfo = Path("/proc/cpuinfo")
    if cpuinfo.is_file():
        lines = cpuinfo.read_text(errors="replace").splitlines()
        return next((line for line in lines if line.startswith(("flags", "Features"))), "")
    return platform.processor()


@functools.lru_cache(maxsize=None)
def gemv_library():
    """Path of the compiled kernel library, or None (switched off, or no working compiler: logged once)."""
    from knowlm.model import cache_dir  # pylint: disable=import-outside-toplevel  # knowlm.model imports this
    if os.environ.get("KNOWLM_CPU_KERNELS", "1") == "0":
        return None
    compiler = os.environ.get("CXX", "c++")
    digest = hashlib.sha256(SOURCE.read_bytes())
    digest.update(" ".join((compiler,) + FLAGS + (platform.machine(), _cpu_signature())).encode())
    library = cache_dir() / "kernels" / f"gemv-{digest.hexdigest()[:20]}.so"
    if library.is_file():
        return library
    if shutil.which(compiler) is None:
        log.warning("knowlm: no C++ compiler (%s), so decoding uses MindSpore's MatMul (slower); set CXX to one",
                    compiler)
        return None
    # A name of its own per process: two processes may build the same library at once.
    partial = library.with_name(f"{library.name}.{os.getpid()}.partial")
    try:
        library.parent.mkdir(parents=True, exist_ok=True)
        done = subprocess.run([compiler, *FLAGS, "-o", str(partial), str(SOURCE)], capture_output=True, text=True,
                              check=False)
        if done.returncode != 0:
            last = (done.stderr.strip().splitlines() or ["no message"])[-1]
            log.warning("knowlm: building %s failed (%s), so decoding uses MindSpore's MatMul (slower)", SOURCE, last)
            return None
        os.replace(partial, library)
    except OSError as error:
        log.warning("knowlm: cannot build %s in %s (%s), so decoding uses MindSpore's MatMul (slower)",
                    SOURCE.name, library.parent, error)
        return None
    finally:
        partial.unlink(missing_ok=True)
    return library


class DecodeMatMul(nn.Cell):
    """``MatMul(transpose_b=True)`` that uses the kernel when ``x`` has few rows (shapes are static in GRAPH mode,
    so each compiled graph holds one of the two)."""

    def __init__(self, library):
        super().__init__()
        self.gemv = ops.Custom(f"{library}:KnowLMGemv", out_shape=lambda x, w: [x[0], w[0]],
                               out_dtype=lambda x, w: x, func_type="aot")
        self.matmul = ops.MatMul(transpose_b=True)

    def construct(self, x, weight):
        if x.shape[0] <= GEMV_MAX_ROWS:
            return self.gemv(x, weight)
        return self.matmul(x, weight)
