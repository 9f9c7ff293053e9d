"""MindSpore .ckpt files written and read a tensor at a time: the bytes of mindspore.save_checkpoint, slices joined."""
import mindspore as ms
import numpy as np

from knowlm.checkpoints import stream


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
