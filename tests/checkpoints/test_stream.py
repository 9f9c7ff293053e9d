"""MindSpore .ckpt files written and read a tensor at a time: the bytes of mindspore.save_checkpoint, slices joined,
its CRC trailer written and checked, damaged files named."""
import re
import zlib

import mindspore as ms
import numpy as np
import pytest

from knowlm.checkpoints import stream
from reference import one_line_error


def test_streaming_writer_writes_the_bytes_of_mindspore_save_checkpoint(tmp_path):
    rng = np.random.default_rng(0)
    tensors = {"a.weight": rng.standard_normal((3, 5)).astype(np.float32),
               "b.bias": rng.standard_normal(300).astype(np.float16)}
    ms.save_checkpoint([{"name": k, "data": ms.Tensor(v)} for k, v in tensors.items()], str(tmp_path / "ms.ckpt"))
    with open(tmp_path / "ours.ckpt", "wb") as f:
        for name, value in tensors.items():
            stream.write_tensor(f, name, value.shape, str(value.dtype), value.tobytes())
    assert (tmp_path / "ours.ckpt").read_bytes() == (tmp_path / "ms.ckpt").read_bytes()
    assert [(e.name, e.shape, e.dtype) for e in stream.scan(tmp_path / "ms.ckpt")] == \
        [("a.weight", (3, 5), "float32"), ("b.bias", (300,), "float16")]


def test_large_tensors_are_written_in_slices_that_both_readers_join(tmp_path, monkeypatch):
    monkeypatch.setattr(stream, "SLICE_BYTES", 64)     # 600 bytes -> 10 slices, as 512 MB does for real
    value = np.arange(300, dtype=np.float16)
    with open(tmp_path / "sliced.ckpt", "wb") as f:
        stream.write_tensor(f, "big", value.shape, "float16", value.tobytes())
    np.testing.assert_array_equal(ms.load_checkpoint(str(tmp_path / "sliced.ckpt"))["big"].asnumpy(), value)
    entry, = stream.scan(tmp_path / "sliced.ckpt")
    assert len(entry.segments) == 10 and entry.read() == value.tobytes()
    ms.save_checkpoint([{"name": "big", "data": ms.Tensor(value)}], str(tmp_path / "crc.ckpt"), crc_check=True)
    assert stream.scan(tmp_path / "crc.ckpt")[0].read() == value.tobytes()


# ------------------------------------------------------------------------------------------- checksums

TENSORS = {"a.weight": np.arange(15, dtype=np.float32).reshape(3, 5), "b.bias": np.ones(300, np.float16)}


def _write(path):
    with stream.writer(path) as f:
        for name, value in TENSORS.items():
            stream.write_tensor(f, name, value.shape, str(value.dtype), value.tobytes())
    return path


def test_writer_ends_files_with_the_crc_trailer_of_mindspore_save_checkpoint(tmp_path):
    ours = _write(tmp_path / "ours.ckpt")
    ms.save_checkpoint([{"name": k, "data": ms.Tensor(v)} for k, v in TENSORS.items()], str(tmp_path / "ms.ckpt"),
                       crc_check=True)
    data = ours.read_bytes()
    assert data == (tmp_path / "ms.ckpt").read_bytes()
    assert data[-17:] == b"crc_num" + zlib.crc32(data[:-17]).to_bytes(10, "big")
    loaded = ms.load_checkpoint(str(ours), crc_check=True)      # MindSpore's own check accepts our files
    np.testing.assert_array_equal(loaded["a.weight"].asnumpy(), TENSORS["a.weight"])
    assert [e.name for e in stream.verify(ours)] == list(TENSORS)


def test_verify_names_the_file_whose_bytes_were_flipped(tmp_path):
    path = _write(tmp_path / "flipped.ckpt")
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0x01            # inside b.bias's data: the structure stays valid, only the CRC tells
    path.write_bytes(bytes(data))
    assert [e.name for e in stream.scan(path)] == list(TENSORS)
    one_line_error(lambda: stream.verify(path), f"^{re.escape(str(path))}: checksum mismatch: the file is damaged")
    with pytest.raises(ValueError, match="Failed to read the checkpoint file"):     # as MindSpore's check finds
        ms.load_checkpoint(str(path), crc_check=True)


@pytest.mark.parametrize("keep", [0.5, 0.999])
def test_verify_names_a_truncated_file(tmp_path, keep):
    path = _write(tmp_path / "cut.ckpt")
    path.write_bytes(path.read_bytes()[:int(path.stat().st_size * keep)])     # the trailer goes first
    one_line_error(lambda: stream.verify(path), f"^{re.escape(str(path))}: truncated or corrupt MindSpore checkpoint")


def test_verify_names_an_empty_file(tmp_path):
    (tmp_path / "empty.ckpt").write_bytes(b"")
    one_line_error(lambda: stream.verify(tmp_path / "empty.ckpt"), "empty.ckpt: empty file")


def test_files_without_a_trailer_still_verify_by_their_structure(tmp_path):
    ms.save_checkpoint([{"name": k, "data": ms.Tensor(v)} for k, v in TENSORS.items()], str(tmp_path / "ms.ckpt"))
    assert stream.stored_crc(tmp_path / "ms.ckpt") is None
    assert [e.name for e in stream.verify(tmp_path / "ms.ckpt")] == list(TENSORS)
