"""The knowlm model directory: saving, loading, and the one-line errors for checkpoints that do not fit."""
import json
import shutil
import subprocess
import sys

import mindspore as ms
import numpy as np
import pytest

from reference import hf_dir, hf_llama, knowlm_logits, one_line_error
from knowlm import KnowLMConfig, KnowLMError, KnowLMForCausalLM
from knowlm.checkpoints import model_dir, stream
from knowlm.checkpoints.convert import convert_checkpoint
from knowlm.checkpoints.model_dir import checkpoint_files, load_weights, save_pretrained
from knowlm.checkpoints.names import is_kv_cache_parameter
from knowlm.checkpoints.quant import dequantize_q8_0
from knowlm.cli import main
from knowlm.files import WEIGHTS_INDEX_NAME, WEIGHTS_NAME
from knowlm.models.load import load_model
from knowlm.tokenizer.spm import BUILTIN_TOKENIZER


def tiny(**overrides):
    return KnowLMForCausalLM(KnowLMConfig.from_name("tiny", **overrides))


def saved(tmp_path, name, **overrides):
    return save_pretrained(tiny(**overrides), tmp_path / name, BUILTIN_TOKENIZER)


def test_save_then_load_reproduces_logits(model_dir, tmp_path):
    first = KnowLMForCausalLM.from_pretrained(model_dir, use_past=False)
    again = KnowLMForCausalLM.from_pretrained(save_pretrained(first, tmp_path / "copy", BUILTIN_TOKENIZER),
                                              use_past=False)
    ids = [[1, 5, 9, 200, 3]]
    np.testing.assert_array_equal(knowlm_logits(first, ids), knowlm_logits(again, ids))


def test_model_directory_holds_only_complete_files(model_dir):
    assert sorted(p.name for p in model_dir.iterdir()) == ["config.json", WEIGHTS_NAME, "tokenizer.model"]


def test_existing_directory_is_not_overwritten_without_force(model_dir):
    with pytest.raises(KnowLMError, match=r"already holds a result \(config.json\); pass --force"):
        save_pretrained(tiny(), model_dir, BUILTIN_TOKENIZER)


def test_checkpoint_for_another_vocabulary_is_refused(tmp_path):
    other = saved(tmp_path, "v500", vocab_size=500)
    with pytest.raises(KnowLMError, match="vocabulary of 500 tokens in 'model.tok_embeddings.embedding_weight', "
                                          "but the config has vocab_size 1000"):
        load_weights(tiny(), other)


def test_checkpoint_for_another_size_is_refused(tmp_path):
    other = saved(tmp_path, "wide", intermediate_size=192)
    with pytest.raises(KnowLMError, match=r"'model.layers.0.feed_forward.w1.weight' has shape \(192, 64\), "
                                          r"expected \(176, 64\)"):
        load_weights(tiny(), other)


def test_checkpoint_missing_parameters_is_refused(tmp_path):
    other = saved(tmp_path, "shallow", num_layers=1)
    with pytest.raises(KnowLMError, match=r"9 parameter\(s\) missing, e.g. model.layers.1"):
        load_weights(tiny(), other)


def test_checkpoint_with_foreign_tensors_is_refused(tmp_path):
    path = tmp_path / "foreign.ckpt"
    ms.save_checkpoint([{"name": "encoder.weight", "data": ms.Tensor(np.zeros(3, np.float32))}], str(path))
    with pytest.raises(KnowLMError, match="unexpected tensor 'encoder.weight'"):
        load_weights(tiny(), path)


def test_truncated_checkpoint_is_refused(model_dir, tmp_path):
    broken = tmp_path / "broken.ckpt"
    broken.write_bytes((model_dir / WEIGHTS_NAME).read_bytes()[:1000])
    one_line_error(lambda: load_weights(tiny(), broken), f"^{broken}: truncated or corrupt MindSpore checkpoint")


# ----------------------------------------------------------------------------- damaged files and checksums

def copy_model(model_dir, target):
    shutil.copytree(model_dir, target)
    return target


def flip_byte(path, at=0.5):
    data = bytearray(path.read_bytes())
    data[int(len(data) * at)] ^= 0x10
    path.write_bytes(bytes(data))


def test_flipped_byte_in_a_converted_model_is_refused_naming_the_file(model_dir, tmp_path):
    damaged = copy_model(model_dir, tmp_path / "damaged")
    flip_byte(damaged / WEIGHTS_NAME)
    one_line_error(lambda: load_weights(tiny(), damaged),
                   f"^{damaged / WEIGHTS_NAME}: checksum mismatch: the file is damaged .*; copy or convert it again$")


def test_truncated_shard_is_refused_naming_the_shard(tmp_path):
    model = convert_checkpoint(hf_dir(tmp_path, sharded=True), tmp_path / "sharded").output
    shard = sorted(model.glob("mindspore_model-*.ckpt"))[1]
    shard.write_bytes(shard.read_bytes()[:shard.stat().st_size * 2 // 3])
    one_line_error(lambda: load_weights(tiny(), model), f"^{shard}: truncated or corrupt MindSpore checkpoint")


def test_shard_cut_between_two_tensors_is_named_by_its_missing_parameters(tmp_path):
    model = convert_checkpoint(hf_dir(tmp_path, sharded=True), tmp_path / "sharded").output
    shard = sorted(model.glob("mindspore_model-*.ckpt"))[1]
    first = stream.scan(shard)[0]
    shard.write_bytes(shard.read_bytes()[:first.segments[-1][0] + first.nbytes])    # one whole record, no trailer
    one_line_error(lambda: load_weights(tiny(), model), rf"^{shard}: \d+ parameter\(s\) missing")


def test_checkpoints_with_and_without_a_crc_trailer_both_load(model_dir, tmp_path):
    saved_dir = saved(tmp_path, "saved")
    assert stream.stored_crc(saved_dir / WEIGHTS_NAME) is not None     # save_pretrained: crc_check=True
    load_weights(tiny(), saved_dir)
    plain = copy_model(model_dir, tmp_path / "plain")                   # as older knowlm and MindSpore wrote them
    weights = ms.load_checkpoint(str(plain / WEIGHTS_NAME))
    (plain / WEIGHTS_NAME).unlink()
    ms.save_checkpoint([{"name": k, "data": v} for k, v in weights.items()], str(plain / WEIGHTS_NAME))
    assert stream.stored_crc(plain / WEIGHTS_NAME) is None
    ids = [[1, 5, 9, 200, 3]]
    np.testing.assert_array_equal(knowlm_logits(KnowLMForCausalLM.from_pretrained(plain, use_past=False), ids),
                                  knowlm_logits(KnowLMForCausalLM.from_pretrained(model_dir, use_past=False), ids))


def test_cli_generate_from_a_damaged_model_is_one_line_with_exit_status_2(model_dir, tmp_path, capsys):
    damaged = copy_model(model_dir, tmp_path / "damaged")
    flip_byte(damaged / WEIGHTS_NAME)
    assert main(["generate", "--model", str(damaged), "--max-new-tokens", "2", "hello"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1].startswith(f"knowlm: error: {damaged / WEIGHTS_NAME}: checksum mismatch: the file is damaged")
    assert len([line for line in err if line.startswith("knowlm: error:")]) == 1


def test_index_listing_a_missing_shard_is_refused(tmp_path):
    (tmp_path / WEIGHTS_INDEX_NAME).write_text(json.dumps({"weight_map": {"a": "part-1.ckpt"}}))
    with pytest.raises(KnowLMError, match="lists shard\\(s\\) not in the directory: part-1.ckpt"):
        load_weights(tiny(), tmp_path)


def test_directory_without_config_is_refused(tmp_path):
    with pytest.raises(KnowLMError, match="config.json: not found; expected a knowlm model directory"):
        KnowLMForCausalLM.from_pretrained(tmp_path)


def test_load_model_accepts_directory_yaml_name_and_tiny(model_dir, monkeypatch):
    monkeypatch.setenv("KNOWLM_TINY_CHECKPOINT", str(model_dir))
    from knowlm.models.pipelines import config_path
    for spec in (str(model_dir), str(config_path("knowlm_tiny")), "knowlm_tiny", "tiny"):
        model, tokenizer = load_model(spec, use_past=False)
        assert isinstance(model, KnowLMForCausalLM) and tokenizer.vocab_size == 1000


@pytest.mark.parametrize("spec, message", [
    ("knowlm-13b-zhixi", "preset 'knowlm-13b-zhixi' has no weights"),
    ("nothing-here", r"model 'nothing-here': not a model directory, packaged model \(smollm2\), yaml file, pipeline name"),
])
def test_load_model_refuses_what_it_cannot_load(spec, message):
    with pytest.raises(KnowLMError, match=message):
        load_model(spec)


# --------------------------------------------------------------------- one tensor at a time, as MindSpore loads

WIDE = dict(intermediate_size=256)      # rows of whole Q8_0 blocks, so int8 is possible


@pytest.fixture(scope="module")
def hf_256():
    return hf_llama(**WIDE)


def wide(**overrides):
    return KnowLMForCausalLM(KnowLMConfig.from_name("tiny", use_past=False, **WIDE, **overrides))


def mindspore_reference(path, network, keep_storage):
    """What the former loader (``mindspore.load_checkpoint`` per file, then ``load_param_into_net``) put into each
    parameter of ``network``: name -> (dtype, numpy values)."""
    loaded = {name: value for file in checkpoint_files(path) for name, value in ms.load_checkpoint(str(file)).items()}
    out = {}
    for param in network.get_parameters():
        if is_kv_cache_parameter(param.name):
            continue
        value = loaded[param.name]
        if keep_storage and len(param.shape) == 2 and value.dtype in (ms.bfloat16, ms.uint8):
            out[param.name] = value.dtype, value.asnumpy()
        elif value.dtype == ms.uint8:
            out[param.name] = ms.float32, dequantize_q8_0(value.asnumpy(), param.shape)
        else:
            out[param.name] = ms.float32, value.asnumpy().astype(np.float32)
    return out


def streamed_only(monkeypatch):
    """``load_weights`` may not fall back to ``mindspore.load_checkpoint``: every tensor must come from ``stream``."""
    def refuse(path):
        raise AssertionError(f"{path} was read whole by mindspore.load_checkpoint")
    monkeypatch.setattr(model_dir, "_read_checkpoint", refuse)


def assert_loaded_like_mindspore(path, keep_storage, monkeypatch, **config):
    reference = mindspore_reference(path, wide(**config), keep_storage)
    network = wide(**config)
    with monkeypatch.context() as patch:
        streamed_only(patch)
        load_weights(network, path, keep_storage=keep_storage)
    params = {p.name: p for p in network.get_parameters() if not is_kv_cache_parameter(p.name)}
    assert params.keys() == reference.keys()
    for name, (dtype, values) in reference.items():
        param = params[name]
        assert param.dtype == dtype and tuple(param.shape) == values.shape, name
        if dtype == ms.float32:
            np.testing.assert_array_equal(param.asnumpy(), values, err_msg=name)
        else:                                   # kept as stored: the same bits
            assert param.asnumpy().tobytes() == values.tobytes(), name
    return network


@pytest.mark.parametrize("storage, keep", [("fp32", False), ("fp16", False), ("bf16", False), ("bf16", True),
                                           ("int8", False), ("int8", True)])
def test_converted_weights_stream_into_the_values_mindspore_loads(hf_256, tmp_path, monkeypatch, storage, keep):
    source = convert_checkpoint(hf_dir(tmp_path, hf_256), tmp_path / storage, dtype=storage).output
    network = assert_loaded_like_mindspore(source, keep, monkeypatch)
    if keep and storage == "int8":
        assert network.model.layers[0].attention.wq.weight.dtype == ms.uint8


def test_sharded_saved_plain_and_sliced_checkpoints_stream_too(hf_256, tmp_path, monkeypatch):
    sharded = convert_checkpoint(hf_dir(tmp_path, hf_256, sharded=True), tmp_path / "sharded").output
    assert len(checkpoint_files(sharded)) > 1
    assert_loaded_like_mindspore(sharded, False, monkeypatch)
    saved_dir = save_pretrained(wide(), tmp_path / "saved", BUILTIN_TOKENIZER)     # mindspore.save_checkpoint
    assert_loaded_like_mindspore(saved_dir, False, monkeypatch)
    plain = tmp_path / "plain.ckpt"                                                 # without a CRC trailer
    ms.save_checkpoint(wide(), str(plain))
    assert_loaded_like_mindspore(plain, False, monkeypatch)
    with monkeypatch.context() as patch:        # tensors written in slices, as MindSpore splits those over 512 MB
        patch.setattr(stream, "SLICE_BYTES", 4096)
        sliced = convert_checkpoint(hf_dir(tmp_path / "one", hf_256), tmp_path / "sliced", dtype="bf16").output
    assert max(len(e.segments) for e in stream.scan(sliced / WEIGHTS_NAME)) > 1
    assert_loaded_like_mindspore(sliced, True, monkeypatch)


def append_map_tensor(path, name="adam_m.table"):
    """A MindSpore map-tensor record (a MapParameter's keys, values, status) appended to ``path``, a checkpoint
    without a trailer: a record kind ``stream`` does not parse and ``mindspore.load_checkpoint`` does."""
    def field(key, data):
        return key + stream._varint(len(data)) + data       # pylint: disable=protected-access
    def tensor(array):
        dims = b"".join(b"\x08" + stream._varint(d) for d in array.shape)  # pylint: disable=protected-access
        return dims + field(b"\x12", str(array.dtype).encode()) + field(b"\x1a", array.tobytes())
    parts = [np.array([1, 2], np.int32), np.ones((2, 3), np.float32), np.zeros(2, np.int32)]
    record = field(b"\x0a", name.encode()) + field(b"\x1a", b"".join(field(b"\x0a", tensor(a)) for a in parts))
    with open(path, "ab") as f:
        f.write(field(b"\x0a", record))


@pytest.mark.parametrize("keep", [False, True])
def test_a_record_stream_cannot_parse_falls_back_to_mindspore_with_one_log_line(hf_256, tmp_path, caplog, keep):
    source = convert_checkpoint(hf_dir(tmp_path, hf_256), tmp_path / "bf16", dtype="bf16").output
    plain = tmp_path / "plain.ckpt"
    with open(plain, "wb") as f:
        for entry in stream.scan(source / WEIGHTS_NAME):
            stream.write_tensor(f, entry.name, entry.shape, entry.dtype, entry.read())
    append_map_tensor(plain)
    with pytest.raises(stream.UnsupportedRecord, match="map tensor"):
        stream.scan(plain)
    reference = mindspore_reference(plain, wide(), keep)
    network = wide()
    with caplog.at_level("WARNING", logger="knowlm"):
        load_weights(network, plain, keep_storage=keep)
    lines = [r.getMessage() for r in caplog.records if r.name == "knowlm"]
    assert len(lines) == 1 and "map tensor" in lines[0] and "mindspore.load_checkpoint" in lines[0], lines
    for param in network.get_parameters():
        dtype, values = reference[param.name]
        assert param.dtype == dtype and param.asnumpy().tobytes() == values.tobytes(), param.name


def test_nothing_is_loaded_before_every_tensor_is_checked(hf_256, tmp_path):
    source = convert_checkpoint(hf_dir(tmp_path, hf_256), tmp_path / "model").output
    entries = stream.scan(source / WEIGHTS_NAME)
    last, short = entries[-1], tmp_path / "short.ckpt"
    with stream.writer(short) as f:         # every tensor right but the last, one row short
        for entry in entries[:-1]:
            stream.write_tensor(f, entry.name, entry.shape, entry.dtype, entry.read())
        shape = (last.shape[0] - 1, *last.shape[1:])
        stream.write_tensor(f, last.name, shape, last.dtype, np.zeros(shape, np.float32))
    network = wide()
    before = {p.name: p.asnumpy().copy() for p in network.get_parameters()}
    with pytest.raises(KnowLMError, match=rf"{last.name!r} has shape \({shape[0]},"):
        load_weights(network, short)
    for param in network.get_parameters():
        np.testing.assert_array_equal(param.asnumpy(), before[param.name], err_msg=param.name)


def test_a_tensor_in_two_places_is_refused_naming_both(model_dir, tmp_path):
    entries = stream.scan(model_dir / WEIGHTS_NAME)
    twice = tmp_path / "twice.ckpt"
    with stream.writer(twice) as f:
        for entry in [*entries, entries[0]]:
            stream.write_tensor(f, entry.name, entry.shape, entry.dtype, entry.read())
    one_line_error(lambda: load_weights(tiny(), twice), f"^{twice}: tensor {entries[0].name!r} is also in {twice}$")


PEAK = """
import sys, tempfile
from pathlib import Path
import mindspore as ms
from knowlm import KnowLMConfig, KnowLMForCausalLM
from knowlm.checkpoints import stream
from knowlm.checkpoints.model_dir import load_weights, save_pretrained
from knowlm.tokenizer.spm import BUILTIN_TOKENIZER

def status(key):
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) * 1024 for line in f if line.startswith(key))

def network():
    return KnowLMForCausalLM(KnowLMConfig.from_name("tiny", use_past=False, vocab_size=8000, hidden_size=512,
                                                    num_heads=8, intermediate_size=1536, num_layers=4))

def growth(net, path, keep_storage):
    load_weights(network(), path, keep_storage)     # once for the imports and caches a first call makes
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")                                # peak RSS (VmHWM) := RSS now
    before = status("VmRSS")
    load_weights(net, path, keep_storage)
    sizes = [p.nbytes for p in net.get_parameters()]
    print("PEAK", status("VmHWM") - before, sum(sizes), max(sizes))

root = Path(tempfile.mkdtemp(dir=sys.argv[1]))
net = network()
growth(net, save_pretrained(net, root / "model", BUILTIN_TOKENIZER), False)    # into parameters of its dtype
with stream.writer(root / "bf16.ckpt") as f:
    for p in net.get_parameters():
        stream.write_tensor(f, p.name, p.shape, "bfloat16", p.astype(ms.bfloat16).view(ms.uint16).asnumpy())
growth(network(), root / "bf16.ckpt", True)         # replacing float32 parameters by bfloat16 ones
"""


def test_loading_costs_one_tensor_of_memory_not_a_second_copy_of_the_model(tmp_path):
    """Peak RSS while loading ~84 MB of float32 weights (16 MB the largest tensor) into a network that holds them
    already, then their bfloat16 copy with ``keep_storage``: about one tensor more, where ``mindspore.load_checkpoint``
    made it twice the weights (and a bfloat16 load kept every float32 parameter it replaced until it ended)."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
    except OSError:
        pytest.skip("no /proc/self/clear_refs to reset the peak RSS with")
    run = subprocess.run([sys.executable, "-c", PEAK, str(tmp_path)], capture_output=True, text=True, check=False)
    assert run.returncode == 0, run.stderr[-3000:]
    (growth, weights, largest), (bf16_growth, bf16_weights, bf16_largest) = \
        [map(int, line.split()[1:]) for line in run.stdout.splitlines() if line.startswith("PEAK ")]
    assert weights > 80e6 and largest < weights / 5 and bf16_weights < weights * 0.51
    # Half the weights: room for the largest tensor (or stream.verify's CRC block), none for a second model.
    assert growth < weights / 2, (growth, weights, largest)
    assert bf16_growth < bf16_weights / 2, (bf16_growth, bf16_weights, bf16_largest)
