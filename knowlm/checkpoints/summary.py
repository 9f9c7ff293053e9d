"""What a conversion reports: the ``--dtype`` it resolved, its progress bar, and the one-line ``Summary`` it prints.

Shared by every writer of ``knowlm.checkpoints`` (Hugging Face and GGUF conversion, export, LoRA merge and import).
"""
import time
from dataclasses import dataclass
from math import prod
from pathlib import Path

from tqdm import tqdm

from knowlm.checkpoints.quant import INT8, logical_shape
from knowlm.checkpoints.stream import DTYPE_ALIASES
from knowlm.errors import KnowLMError


def resolve_dtype(dtype, int8=False) -> str:
    """``--dtype``'s full name (fp32 -> float32); ``int8`` (Q8_0 storage) where the writer takes it."""
    if dtype == INT8 and int8:
        return INT8
    if dtype not in DTYPE_ALIASES:
        raise KnowLMError(f"dtype {dtype!r}: expected one of fp32, fp16, bf16{', int8' if int8 else ''}")
    return DTYPE_ALIASES[dtype]


@dataclass
class Summary:
    """What a conversion wrote; ``str()`` is the one-line report the CLI prints."""
    action: str
    output: Path
    tensors: int
    parameters: int
    nbytes: int
    dtype: str
    seconds: float

    def __str__(self):
        return (f"{self.action} {self.tensors} tensors ({self.parameters:,} parameters, {_size(self.nbytes)}, "
                f"{self.dtype}) to {self.output} in {self.seconds:.1f} s")


def _size(nbytes):
    for unit, scale in (("GB", 1e9), ("MB", 1e6), ("KB", 1e3)):
        if nbytes >= scale:
            return f"{nbytes / scale:.2f} {unit}"
    return f"{nbytes} B"


def make_summary(action, output, entries, dtype, start):
    """``dtype``: what the line says (``int8``, ``float32 dequantized from int8``); parameters are counted in the
    weights' logical shapes (a Q8_0 tensor's bytes are not its parameters)."""
    return Summary(action, Path(output), len(entries), sum(prod(logical_shape(e.shape, e.dtype)) for e in entries),
                   sum(e.nbytes for e in entries), dtype, time.time() - start)


def progress_bar(total, desc):
    # disable=None: a bar on a terminal, nothing in logs and pipes.
    return tqdm(total=total, unit="B", unit_scale=True, unit_divisor=1024, desc=desc, disable=None)
