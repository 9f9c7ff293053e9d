"""MindSpore ``.ckpt`` files read and written one tensor at a time.

``mindspore.save_checkpoint`` needs every tensor in memory at once and ``mindspore.load_checkpoint`` reads and
parses a whole file, so a 13B model would need its full size in RAM (several times over while parsing). The
format is simple enough to stream: a ``.ckpt`` file is the protobuf message ``Checkpoint`` of MindSpore's
``checkpoint.proto``, written as a run of one-value messages, one per tensor (or per 512 MB slice of one)::

    Checkpoint  { repeated Value value = 1; }
    Value       { string tag = 1; TensorProto tensor = 2; }
    TensorProto { repeated int64 dims = 1; string tensor_type = 2; bytes tensor_content = 3; }

``write_tensor`` emits exactly the bytes ``mindspore.save_checkpoint`` writes (a test compares them), with the
tensor data written straight from the caller's buffer; ``scan`` reads only the headers and notes where each
tensor's data lies, so checking a file costs no memory and reading a tensor costs that tensor.
"""
import os
from dataclasses import dataclass, field
from math import prod

import numpy as np

from knowlm.checkpoints.names import check_tensors
from knowlm.errors import KnowLMError


@dataclass(frozen=True)
class DType:
    ckpt: str           # MindSpore's TensorProto.tensor_type
    safetensors: str    # safetensors header dtype
    itemsize: int
    exponent_mask: int  # all-ones exponent = inf or nan; checked on the raw bits, so bf16 needs no numpy type


DTYPES = {
    "float32": DType("Float32", "F32", 4, 0x7F800000),
    "float16": DType("Float16", "F16", 2, 0x7C00),
    "bfloat16": DType("BFloat16", "BF16", 2, 0x7F80),
}
DTYPE_ALIASES = {"fp32": "float32", "fp16": "float16", "bf16": "bfloat16", **{name: name for name in DTYPES}}
_BY_CKPT_TYPE = {dtype.ckpt: name for name, dtype in DTYPES.items()}
# Other types that training checkpoints hold (step counters, flags): scanned, never converted.
_OTHER_TYPES = {"Float64": 8, "Int8": 1, "UInt8": 1, "Int16": 2, "UInt16": 2, "Int32": 4, "UInt32": 4, "Int64": 8,
                "UInt64": 8, "Bool": 1, "str": None}
_ITEMSIZE = {**{dtype.ckpt: dtype.itemsize for dtype in DTYPES.values()}, **_OTHER_TYPES}
_UINT = {2: np.uint16, 4: np.uint32}

# mindspore.train.serialization.SLICE_SIZE: larger tensors are written as several values with the same tag.
SLICE_BYTES = 512 * 1024 * 1024
_CRC_TRAILER = b"crc_num"   # save_checkpoint(crc_check=True) appends b"crc_num" + 10 bytes
_TAG, _TENSOR, _DIMS, _TYPE, _CONTENT = b"\x0a", b"\x12", b"\x08", b"\x12", b"\x1a"


@dataclass
class Entry:
    """One tensor of a checkpoint file: its header and where its bytes lie."""
    name: str
    shape: tuple
    dtype: str
    path: str
    segments: list = field(default_factory=list)   # [(offset, nbytes)], one per slice

    @property
    def nbytes(self):
        return sum(size for _, size in self.segments)

    def read(self) -> bytes:
        with open(self.path, "rb") as f:
            return b"".join(_read_at(f, offset, size) for offset, size in self.segments)

    def copy_to(self, out, block=64 * 1024 * 1024):
        with open(self.path, "rb") as f:
            for offset, size in self.segments:
                for start in range(0, size, block):
                    out.write(_read_at(f, offset + start, min(block, size - start)))

    def all_finite(self, block=64 * 1024 * 1024) -> bool:
        dtype = DTYPES[self.dtype]
        bits = np.dtype(_UINT[dtype.itemsize]).newbyteorder("<")
        with open(self.path, "rb") as f:
            for offset, size in self.segments:
                for start in range(0, size, block):
                    raw = np.frombuffer(_read_at(f, offset + start, min(block, size - start)), bits)
                    if np.any(raw & dtype.exponent_mask == dtype.exponent_mask):
                        return False
        return True


def _read_at(f, offset, size):
    f.seek(offset)
    return f.read(size)


def _varint(value: int) -> bytes:
    out = bytearray()
    while value > 0x7F:
        out.append(value & 0x7F | 0x80)
        value >>= 7
    out.append(value)
    return bytes(out)


def write_tensor(f, name: str, shape, dtype: str, data):
    """Append tensor ``name`` (raw little-endian bytes ``data``, any buffer) to the open ``.ckpt`` file ``f``."""
    data = memoryview(data).cast("B")
    tag = name.encode("utf-8")
    type_name = DTYPES[dtype].ckpt.encode()
    dims = b"".join(_DIMS + _varint(d) for d in shape)
    for start in range(0, max(len(data), 1), SLICE_BYTES):
        chunk = data[start:start + SLICE_BYTES]
        tensor_head = dims + _TYPE + _varint(len(type_name)) + type_name + _CONTENT + _varint(len(chunk))
        tensor_len = len(tensor_head) + len(chunk)
        value_head = _TAG + _varint(len(tag)) + tag + _TENSOR + _varint(tensor_len)
        f.write(_TAG + _varint(len(value_head) + tensor_len) + value_head + tensor_head)
        f.write(chunk)


class _Reader:
    """Protobuf wire-format fields of one file, read through a buffered handle without loading values."""

    def __init__(self, f, path, size):
        self.f, self.path, self.size = f, path, size

    def varint(self):
        result = shift = 0
        while True:
            byte = self.f.read(1)
            if not byte:
                raise self.corrupt("ends inside a field header")
            result |= (byte[0] & 0x7F) << shift
            if byte[0] < 0x80:
                return result
            shift += 7

    def length(self, end):
        size = self.varint()
        if self.f.tell() + size > end:
            raise self.corrupt(f"a field of {size} bytes runs past the end of the file at byte {self.f.tell()}")
        return size

    def corrupt(self, problem):
        return KnowLMError(f"{self.path}: truncated or corrupt MindSpore checkpoint ({problem})")


def scan(path) -> list:
    """Headers of every tensor in ``.ckpt`` file ``path``, in file order (slices of one tensor merged)."""
    path = str(path)
    size = os.path.getsize(path)
    entries = []
    with open(path, "rb") as f:
        reader = _Reader(f, path, size)
        while f.tell() < size:
            if size - f.tell() == 17:
                if f.read(7) == _CRC_TRAILER:
                    break
                f.seek(-7, os.SEEK_CUR)
            if f.read(1) != _TAG:
                raise reader.corrupt(f"expected a tensor record at byte {f.tell() - 1}")
            length = reader.length(size)
            end = f.tell() + length
            name, shape, dtype, segment = _scan_value(reader, end)
            if entries and entries[-1].name == name and entries[-1].shape == shape:
                entries[-1].segments.append(segment)
            else:
                entries.append(Entry(name, shape, dtype, path, [segment]))
    for entry in entries:
        itemsize = DTYPES[entry.dtype].itemsize if entry.dtype in DTYPES else _ITEMSIZE[entry.dtype]
        if itemsize and entry.nbytes != prod(entry.shape) * itemsize:
            raise KnowLMError(f"{path}: tensor {entry.name!r} of shape {entry.shape} ({entry.dtype}) holds "
                              f"{entry.nbytes} bytes; the file is corrupt")
    return entries


def _scan_value(reader, end):
    f = reader.f
    name = shape = dtype = segment = None
    while f.tell() < end:
        key = f.read(1)
        if key == _TAG:
            name = f.read(reader.length(end)).decode("utf-8", "replace")
        elif key == _TENSOR:
            length = reader.length(end)
            shape, dtype, segment = _scan_tensor(reader, f.tell() + length)
        else:
            raise reader.corrupt(f"unsupported field {key!r} at byte {f.tell() - 1} (map tensors are not supported)")
    if name is None or segment is None:
        raise reader.corrupt(f"record ending at byte {end} has no name or no tensor")
    return name, shape, dtype, segment


def _scan_tensor(reader, end):
    f = reader.f
    dims, type_name, segment = [], None, None
    while f.tell() < end:
        key = f.read(1)
        if key == _DIMS:
            dims.append(reader.varint())
        elif key == b"\x0a":       # packed dims, as other protobuf writers may emit
            length = reader.length(end)
            packed_end = f.tell() + length
            while f.tell() < packed_end:
                dims.append(reader.varint())
        elif key == _TYPE:
            type_name = f.read(reader.length(end)).decode("ascii", "replace")
        elif key == _CONTENT:
            size = reader.length(end)
            segment = (f.tell(), size)
            f.seek(size, os.SEEK_CUR)
        else:
            raise reader.corrupt(f"unexpected tensor field {key!r} at byte {f.tell() - 1}")
    if type_name not in _ITEMSIZE:
        raise reader.corrupt(f"unknown tensor type {type_name!r} at byte {end}")
    if segment is None:
        raise reader.corrupt(f"tensor record ending at byte {end} has no data")
    return tuple(dims), _BY_CKPT_TYPE.get(type_name, type_name), segment


def validate(files, expected, source, dtype=None, check_finite=False) -> list:
    """Re-read checkpoint ``files`` (headers only) and check them against ``expected`` (name -> shape); entries."""
    entries = [entry for path in files for entry in scan(path)]
    check_tensors(entries, expected, source, dtype)
    if check_finite:
        for entry in entries:
            if not entry.all_finite():
                raise KnowLMError(f"{entry.path}: tensor {entry.name!r} holds inf or nan values")
    return entries
