"""8-bit weight storage (``knowlm convert --dtype int8``): llama.cpp's Q8_0 (``GGML_TYPE_Q8_0``), byte for byte.

A 2-D weight W (N, K), K a multiple of 32, is stored as a **uint8** tensor of shape (N, K // 32 * 34): each row is
K / 32 blocks of 34 bytes, a block being its scale d (float16, little-endian) then 32 int8 values q; the weight is
d * q. Quantization is llama.cpp's reference ``quantize_row_q8_0_ref`` (ggml-quants.c): per block amax = max|x|,
d = amax / 127, id = 1 / d (0 for an all-zero block), q = roundf(x * id) (half away from zero), all in float32, and d
rounded to float16 last. The arithmetic is gguf-py's (``gguf.quants``: llama.cpp's own Python package, written to be
bit-exact with ggml-quants.c; the tests check it against a transcription of the C function). Dequantized values
d * q are exact in float32 (11 + 8 significant bits), so every implementation gives the same floats.

A row is whole blocks, so a permutation of rows (GGUF's q/k un-permutation) is a permutation of packed rows:
lossless. 1-D weights (the norms) stay float32. config.json records the storage as ``param_init_type: "int8"``
(with ``compute_dtype: "float32"``, what the weights dequantize to); the logical shapes stay the config's.
"""
from knowlm.errors import KnowLMError

Q8_0_BLOCK = 32             # values per block
Q8_0_BYTES = 34             # bytes per block: float16 scale + 32 int8
INT8 = "int8"               # the storage dtype's name: --dtype int8, config.json's param_init_type
PACKED = "uint8"            # the dtype of a Q8_0 tensor in a checkpoint
NORM_DTYPE = "float32"      # 1-D weights of an int8 model


def stored_shape(shape, dtype) -> tuple:
    """The shape a weight of logical ``shape`` has in a checkpoint of storage ``dtype`` (fp32/fp16/bf16 names, or
    ``int8``; ``uint8``, a Q8_0 tensor's own dtype, too): (N, K // 32 * 34) for a 2-D weight stored as Q8_0, else
    ``shape`` itself. A K that is not whole blocks is one line (``check_int8`` names the tensor first)."""
    shape = tuple(int(d) for d in shape)
    if dtype not in (INT8, PACKED) or len(shape) != 2:
        return shape
    rows, cols = shape
    if cols % Q8_0_BLOCK:
        raise KnowLMError(f"a weight of shape {shape}: rows of {cols} values are not whole Q8_0 blocks of "
                          f"{Q8_0_BLOCK}; it cannot be stored as int8")
    return rows, cols // Q8_0_BLOCK * Q8_0_BYTES


def stored_dtype(shape, dtype) -> str:
    """The dtype a weight of logical ``shape`` has in a checkpoint of storage ``dtype``: with int8, uint8 (Q8_0) for a
    2-D weight and float32 for a 1-D one; ``dtype`` itself otherwise."""
    if dtype != INT8:
        return dtype
    return PACKED if len(shape) == 2 else NORM_DTYPE


def logical_shape(shape, dtype) -> tuple:
    """The inverse of ``stored_shape``: the weight's shape from a checkpoint tensor's ``shape`` and ``dtype``."""
    shape = tuple(int(d) for d in shape)
    if dtype != PACKED or len(shape) != 2 or shape[1] % Q8_0_BYTES:
        return shape
    return shape[0], shape[1] // Q8_0_BYTES * Q8_0_BLOCK


def storage_of(entries) -> str:
    """The storage dtype of a checkpoint's tensors (``stream.Entry``s): int8 when any is Q8_0, else the first one's."""
    dtypes = [e.dtype for e in entries]
    return INT8 if PACKED in dtypes else (dtypes[0] if dtypes else None)


def check_int8(expected: dict, source, show=lambda name: name):
    """Refuse int8 storage, in one line naming the tensor, for a model whose 2-D weight rows are not whole blocks."""
    for name, shape in expected.items():
        if len(shape) == 2 and shape[1] % Q8_0_BLOCK:
            raise KnowLMError(f"{source}: --dtype int8 is not possible for this model: tensor {show(name)!r} of "
                              f"shape {tuple(shape)} has rows of {shape[1]} values, not a multiple of {Q8_0_BLOCK} "
                              f"(Q8_0 stores blocks of {Q8_0_BLOCK}); use bf16 or fp16")


def quantize_q8_0(array, where="weight"):
    """``array`` (N, K) float32, K a multiple of 32, as Q8_0: uint8 (N, K // 32 * 34), llama.cpp's bytes.

    Values that Q8_0 cannot hold are one line starting ``where``: inf or nan (its scale would be garbage), and
    blocks whose scale max|x| / 127 overflows float16 (|x| above ~8.3e6)."""
    import numpy as np  # pylint: disable=import-outside-toplevel  (kept out of the light checkpoint modules)
    gguf = _gguf()
    values = np.asarray(array, dtype=np.float32)
    if values.ndim != 2 or values.shape[1] % Q8_0_BLOCK:
        raise KnowLMError(f"{where}: shape {values.shape}; Q8_0 stores 2-D weights whose rows are whole blocks of "
                          f"{Q8_0_BLOCK} values")
    if values.size:
        amax = float(np.abs(values).max())
        if amax != amax or amax == float("inf"):            # max propagates nan
            raise KnowLMError(f"{where}: holds inf or nan values, which int8 (Q8_0) cannot store")
    with np.errstate(over="ignore"):           # a scale overflowing float16: refused just below
        packed = gguf.quants.quantize(values, gguf.GGMLQuantizationType.Q8_0)
    if not _scales_finite(packed):
        raise KnowLMError(f"{where}: values up to |{amax:g}| overflow the float16 scale of int8 (Q8_0) blocks "
                          f"(max {65504 * 127:g}); use bf16")
    return packed


def check_q8_0_finite(packed, where="tensor"):
    """One line starting ``where`` unless every block scale of Q8_0 ``packed`` is finite (its values are then)."""
    if not _scales_finite(packed):
        raise KnowLMError(f"{where}: holds inf or nan (Q8_0 block scales)")


def _scales_finite(packed) -> bool:
    import numpy as np  # pylint: disable=import-outside-toplevel
    return bool(np.isfinite(np.asarray(packed).reshape(-1, Q8_0_BYTES)[:, :2].copy().view(np.float16)).all())


def dequantize_q8_0(packed, shape=None, where="tensor"):
    """Q8_0 ``packed`` uint8 (N, K // 32 * 34) as float32 (N, K); ``shape``: the logical shape it must be of."""
    import numpy as np  # pylint: disable=import-outside-toplevel
    gguf = _gguf()
    packed = np.asarray(packed)
    want = stored_shape(shape, PACKED) if shape is not None else None
    if packed.dtype != np.uint8 or packed.ndim != 2 or packed.shape[1] % Q8_0_BYTES or \
            (want is not None and packed.shape != want):
        of = f" of a {tuple(shape)} weight, {want}" if want is not None else ""
        raise KnowLMError(f"{where}: {packed.dtype} of shape {packed.shape} is not Q8_0{of} (uint8 rows of "
                          f"{Q8_0_BYTES}-byte blocks)")
    return gguf.quants.dequantize(packed, gguf.GGMLQuantizationType.Q8_0)


def _gguf():
    import gguf  # pylint: disable=import-outside-toplevel  (a dependency; its import costs, so only when used)
    return gguf
