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

Files written through ``writer`` end with the trailer ``mindspore.save_checkpoint(..., crc_check=True)`` writes and
``mindspore.load_checkpoint(..., crc_check=True)`` checks (``mindspore/train/serialization.py``: ``_exec_save``,
``_parse_ckpt_proto``)::

    b"crc_num" + (CRC-32 of every byte before the trailer).to_bytes(10, "big")      # 17 bytes

The CRC-32 is zlib's (MindSpore calls ``binascii.crc32``, the same function). ``verify`` checks it, reading the file
in blocks, before ``scan`` checks the structure; files without a trailer (older knowlm output, MindSpore's default)
are checked by ``scan`` alone, which names a file cut short.
"""
import contextlib
import os
import zlib
from dataclasses import dataclass, field
from math import prod

from knowlm.checkpoints.names import check_tensors
from knowlm.checkpoints.quant import PACKED
from knowlm.errors import KnowLMError


@dataclass(frozen=True)
class DType:
    ckpt: str           # MindSpore's TensorProto.tensor_type
    safetensors: str    # safetensors header dtype
    itemsize: int
    short: str          # the name ``--dtype`` takes
    max: float          # the largest finite value: a cast to a type with a smaller one can overflow


DTYPES = {
    "float32": DType("Float32", "F32", 4, "fp32", 3.4028234663852886e38),
    "float16": DType("Float16", "F16", 2, "fp16", 65504.0),
    "bfloat16": DType("BFloat16", "BF16", 2, "bf16", 3.3895313892515355e38),
}
DTYPE_ALIASES = {**{dtype.short: name for name, dtype in DTYPES.items()}, **{name: name for name in DTYPES}}
# The tensor types ``write_tensor`` writes: the float types, and uint8 for Q8_0 weights (``quant``).
CKPT_TYPES = {**{name: dtype.ckpt for name, dtype in DTYPES.items()}, PACKED: "UInt8"}
_BY_CKPT_TYPE = {ckpt: name for name, ckpt in CKPT_TYPES.items()}
# Other types that training checkpoints hold (step counters, flags): scanned, never converted.
_OTHER_TYPES = {"Float64": 8, "Int8": 1, "UInt8": 1, "Int16": 2, "UInt16": 2, "Int32": 4, "UInt32": 4, "Int64": 8,
                "UInt64": 8, "Bool": 1, "str": None}
_ITEMSIZE = {**{dtype.ckpt: dtype.itemsize for dtype in DTYPES.values()}, **_OTHER_TYPES}

# mindspore.train.serialization.SLICE_SIZE: larger tensors are written as several values with the same tag.
SLICE_BYTES = 512 * 1024 * 1024
CRC_MARKER = b"crc_num"     # save_checkpoint(crc_check=True) appends b"crc_num" + the CRC-32 in 10 bytes
TRAILER_BYTES = len(CRC_MARKER) + 10
_CRC_BLOCK = 16 * 1024 * 1024
_TAG, _TENSOR, _DIMS, _TYPE, _CONTENT = b"\x0a", b"\x12", b"\x08", b"\x12", b"\x1a"
_MAP_TENSOR = b"\x1a"      # Value.maptensor: MindSpore's MapParameter (embedding tables of recommendation models)


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

    def readinto(self, buffer):
        """Read the tensor's bytes straight into writable ``buffer`` of ``nbytes`` bytes (a numpy array's, say): no
        copy in between, so loading a tensor costs that tensor once."""
        view = memoryview(buffer).cast("B")
        if len(view) != self.nbytes:
            raise ValueError(f"tensor {self.name!r}: a buffer of {len(view)} bytes for {self.nbytes}")
        at = 0
        with open(self.path, "rb", buffering=0) as f:
            for offset, size in self.segments:
                f.seek(offset)
                end = at + size
                while at < end:
                    got = f.readinto(view[at:end])
                    if not got:
                        raise KnowLMError(f"{self.path}: ends inside tensor {self.name!r}; the file changed after it "
                                          "was checked, or is cut short")
                    at += got
        return buffer

    def copy_to(self, out, block=64 * 1024 * 1024):
        with open(self.path, "rb") as f:
            for offset, size in self.segments:
                for start in range(0, size, block):
                    out.write(_read_at(f, offset + start, min(block, size - start)))


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
    type_name = CKPT_TYPES[dtype].encode()
    dims = b"".join(_DIMS + _varint(d) for d in shape)
    for start in range(0, max(len(data), 1), SLICE_BYTES):
        chunk = data[start:start + SLICE_BYTES]
        tensor_head = dims + _TYPE + _varint(len(type_name)) + type_name + _CONTENT + _varint(len(chunk))
        tensor_len = len(tensor_head) + len(chunk)
        value_head = _TAG + _varint(len(tag)) + tag + _TENSOR + _varint(tensor_len)
        f.write(_TAG + _varint(len(value_head) + tensor_len) + value_head + tensor_head)
        f.write(chunk)


class ChecksumWriter:
    """A binary file that keeps the CRC-32 of everything written to it (``write_tensor`` writes through it)."""

    def __init__(self, f):
        self.f, self.crc = f, 0

    def write(self, data):
        self.crc = zlib.crc32(data, self.crc)
        return self.f.write(data)

    def trailer(self) -> bytes:
        return CRC_MARKER + self.crc.to_bytes(10, "big")


@contextlib.contextmanager
def writer(path):
    """``path`` opened for ``write_tensor`` calls; a clean exit ends it with MindSpore's CRC trailer, so both
    ``verify`` and ``mindspore.load_checkpoint(crc_check=True)`` can tell a damaged copy."""
    with open(path, "wb") as f:
        out = ChecksumWriter(f)
        yield out
        f.write(out.trailer())


def stored_crc(path):
    """The CRC-32 that the trailer of ``.ckpt`` file ``path`` records, or None for a file without one."""
    with open(path, "rb") as f:
        size = f.seek(0, os.SEEK_END)
        if size < TRAILER_BYTES:
            return None
        f.seek(size - TRAILER_BYTES)
        tail = f.read(TRAILER_BYTES)
    return int.from_bytes(tail[len(CRC_MARKER):], "big") if tail.startswith(CRC_MARKER) else None


def verify(path) -> list:
    """``scan(path)`` after checking the file whole: its CRC-32 against its trailer when it has one (read in
    blocks; memory stays flat). A damaged, truncated or empty file fails with one line naming it."""
    path = str(path)
    stored = stored_crc(path)
    if stored is not None:
        crc = 0
        with open(path, "rb", buffering=0) as f:
            left = f.seek(0, os.SEEK_END) - TRAILER_BYTES
            f.seek(0)
            block = memoryview(bytearray(max(0, min(_CRC_BLOCK, left))))    # one buffer, read into again and again
            while left > 0:
                got = f.readinto(block[:min(len(block), left)])
                if not got:
                    break
                crc = zlib.crc32(block[:got], crc)
                left -= got
        if crc != stored:
            raise KnowLMError(f"{path}: checksum mismatch: the file is damaged (CRC-32 {crc:08x}, its trailer "
                              f"records {stored:08x}); copy or convert it again")
    elif os.path.getsize(path) == 0:
        raise KnowLMError(f"{path}: empty file; expected a MindSpore checkpoint")
    return scan(path)


class UnsupportedRecord(KnowLMError):
    """A record of a kind ``scan`` does not parse (a map tensor, a tensor type it does not know) in a file that is
    otherwise well formed: ``mindspore.load_checkpoint`` may still read it."""


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

    def unsupported(self, problem):
        return UnsupportedRecord(f"{self.path}: a MindSpore checkpoint with {problem}, which knowlm's reader does not "
                                 "parse")

    def corrupt(self, problem):
        return KnowLMError(f"{self.path}: truncated or corrupt MindSpore checkpoint ({problem}); copy or convert "
                           "it again")


def scan(path) -> list:
    """Headers of every tensor in ``.ckpt`` file ``path``, in file order (slices of one tensor merged)."""
    path = str(path)
    size = os.path.getsize(path)
    entries = []
    with open(path, "rb") as f:
        reader = _Reader(f, path, size)
        while f.tell() < size:
            if size - f.tell() == TRAILER_BYTES:
                if f.read(len(CRC_MARKER)) == CRC_MARKER:
                    break
                f.seek(-len(CRC_MARKER), os.SEEK_CUR)
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
        itemsize = _ITEMSIZE[CKPT_TYPES.get(entry.dtype, entry.dtype)]
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
        elif key == _MAP_TENSOR:
            raise reader.unsupported(f"a map tensor at byte {f.tell() - 1}")
        else:
            raise reader.corrupt(f"unsupported field {key!r} at byte {f.tell() - 1}")
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
        raise reader.unsupported(f"tensor type {type_name!r} at byte {end}")
    if segment is None:
        raise reader.corrupt(f"tensor record ending at byte {end} has no data")
    return tuple(dims), _BY_CKPT_TYPE.get(type_name, type_name), segment


def validate(files, expected, source, dtype=None, checksum=True) -> list:
    """Check checkpoint ``files`` against ``expected`` (name -> logical shape: a uint8 tensor must be its Q8_0 form,
    ``names.check_tensors``) and ``dtype`` (``int8``: Q8_0 2-D weights, float32 norms); their entries. ``checksum``:
    ``verify`` each file (its CRC-32, a read of the whole file) before its headers are read; off for files this
    process has just written through ``writer``, whose trailer holds the CRC-32 of the very bytes written."""
    entries = [entry for path in files for entry in (verify(path) if checksum else scan(path))]
    check_tensors(entries, expected, source, dtype)
    return entries
