"""int8 weight storage (``knowlm.checkpoints.quant``: llama.cpp's Q8_0) from quantization to loading and export.

The references: ``quantize_row_q8_0_ref`` of llama.cpp's ggml-quants.c, transcribed below value by value in float32,
and gguf-py (``gguf.quants``), llama.cpp's own Python package. Tiny models here have SwiGLU width 256, so that every
2-D weight's rows are whole 32-value blocks (the default tiny width, 176, is not: it is the refusal case).
"""
import json
import math
import shutil

import gguf
import mindspore as ms
import numpy as np
import pytest
import torch
import transformers

from reference import fails_with_one_line, hf_dir, hf_llama, one_line_error
from knowlm import KnowLMConfig, KnowLMForCausalLM
from knowlm.checkpoints import stream
from knowlm.checkpoints.convert import convert_checkpoint, export_checkpoint
from knowlm.checkpoints.lora import merge_lora, write_adapter_config
from knowlm.checkpoints.model_dir import load_weights, save_pretrained
from knowlm.checkpoints.names import LORA_A, LORA_B, expected_shapes, hf_to_mindspore_name, lora_name
from knowlm.checkpoints.quant import (Q8_0_BLOCK, Q8_0_BYTES, dequantize_q8_0, quantize_q8_0, stored_dtype,
                                      stored_shape)
from knowlm.files import ADAPTER_WEIGHTS, CONFIG_NAME, WEIGHTS_NAME
from knowlm.tokenizer.spm import BUILTIN_TOKENIZER

WIDTH = dict(intermediate_size=256)


def llama_cpp_q8_0(row):
    """ggml-quants.c ``quantize_row_q8_0_ref``, one float32 operation at a time: amax, d = amax / 127,
    id = d ? 1/d : 0, scale stored as GGML_FP32_TO_FP16(d) (round to nearest even), q = roundf(x * id)."""
    out = bytearray()
    for block in np.asarray(row, np.float32).reshape(-1, Q8_0_BLOCK):
        amax = np.float32(0.0)
        for v in block:
            amax = max(amax, np.float32(abs(v)))
        d = np.float32(amax / np.float32(127))
        inv = np.float32(np.float32(1.0) / d) if d else np.float32(0.0)
        out += np.float16(d).tobytes()
        for v in block:
            x0 = float(np.float32(v * inv))
            out += np.int8(math.copysign(math.floor(abs(x0) + 0.5), x0)).tobytes()  # roundf: half away from 0
    return bytes(out)


def hand_made_blocks():
    ties = np.zeros(32, np.float32)             # amax 127: d = 1, so x * id = x exactly
    ties[:9] = [127, 2.5, -2.5, 0.5, -0.5, 1.5, -1.5, 126.5, 0.49999997]
    negative_max = np.linspace(-1, 1, 32).astype(np.float32)
    negative_max[7] = -254.0                    # d = 2 from a negative value
    negative_max[8:11] = [1.0, -3.0, 5.0]       # x * id = 0.5, -1.5, 2.5: ties
    zeros = np.zeros(32, np.float32)            # d = 0, id = 0: all q = 0
    rng = np.random.default_rng(0)
    small, large = rng.normal(0, 1e-4, 32), rng.normal(0, 3e3, 32)
    return np.stack([ties, negative_max, zeros, small, large]).astype(np.float32).reshape(1, -1)


# ------------------------------------------------------------------------------------- the format

def test_quantize_gives_gguf_py_bytes_and_llama_cpp_rounding_on_ties_zeros_and_negative_max():
    row = hand_made_blocks()
    packed = quantize_q8_0(row)
    assert packed.dtype == np.uint8 and packed.shape == (1, 5 * Q8_0_BYTES)
    assert packed.tobytes() == llama_cpp_q8_0(row) == \
        gguf.quants.quantize(row, gguf.GGMLQuantizationType.Q8_0).tobytes()
    blocks = packed.reshape(5, Q8_0_BYTES)
    scales, q = blocks[:, :2].copy().view(np.float16)[:, 0], blocks[:, 2:].view(np.int8)
    assert (scales[0], scales[1], scales[2]) == (1.0, 2.0, 0.0)
    assert q[0, :9].tolist() == [127, 3, -3, 1, -1, 2, -2, 127, 0]        # half away from zero, 126.5 -> 127
    assert q[1, 7:11].tolist() == [-127, 1, -2, 3]
    assert not q[2].any()


def test_quantize_equals_the_llama_cpp_transcription_on_random_rows_of_many_scales():
    rng = np.random.default_rng(1)
    rows = (rng.standard_normal((6, 128)) * np.logspace(-6, 5, 6)[:, None]).astype(np.float32)
    packed = quantize_q8_0(rows)
    for row, ours in zip(rows, packed):
        assert ours.tobytes() == llama_cpp_q8_0(row)


def test_dequantize_of_quantize_is_within_half_a_scale_of_every_value():
    """|x - d16 * q| <= d / 2 with d = amax / 127, the float32 scale q is rounded with; storing d as float16 adds
    at most |q| * |d - d16|: at most ~0.56 d in all where d is a normal float16 (tiny scales, float16 subnormals,
    lose more, in llama.cpp too)."""
    rng = np.random.default_rng(2)
    rows = (rng.standard_normal((64, 256)) * np.logspace(-4, 4, 64)[:, None]).astype(np.float32)
    back = dequantize_q8_0(quantize_q8_0(rows), rows.shape)
    assert back.dtype == np.float32 and back.shape == rows.shape
    blocks, back = rows.reshape(-1, Q8_0_BLOCK).astype(np.float64), back.reshape(-1, Q8_0_BLOCK).astype(np.float64)
    d = np.abs(blocks).max(axis=1, keepdims=True) / 127
    d16 = d.astype(np.float16).astype(np.float64)
    q = np.round(back / d16)
    assert np.all(np.abs(blocks - back) <= d / 2 * (1 + 1e-6) + np.abs(q) * np.abs(d - d16))
    normal = d[:, 0] >= np.finfo(np.float16).tiny
    assert normal.sum() > len(d) // 2
    assert np.all(np.abs(blocks - back)[normal] <= 0.5625 * d[normal])


def test_stored_shape_and_dtype_of_each_storage():
    assert stored_shape((1000, 64), "int8") == stored_shape((1000, 64), "uint8") == (1000, 68)
    assert stored_shape((64,), "int8") == (64,) and stored_shape((1000, 64), "bfloat16") == (1000, 64)
    assert (stored_dtype((8, 64), "int8"), stored_dtype((64,), "int8"), stored_dtype((8, 64), "bfloat16")) \
        == ("uint8", "float32", "bfloat16")
    one_line_error(lambda: stored_shape((64, 176), "int8"), r"rows of 176 values are not whole Q8_0 blocks of 32")
    one_line_error(lambda: quantize_q8_0(np.full((1, 32), np.inf, np.float32), "w"), r"^w: holds inf or nan")
    one_line_error(lambda: quantize_q8_0(np.full((1, 32), 1e7, np.float32), "w"), r"^w: values up to \|1e\+07\| "
                   r"overflow the float16 scale")
    one_line_error(lambda: dequantize_q8_0(np.zeros((2, 68), np.uint8), (2, 32)), r"uint8 of shape \(2, 68\) is "
                   r"not Q8_0 of a \(2, 32\) weight, \(2, 34\)")


# ------------------------------------------------------------------------------ Hugging Face -> int8

@pytest.fixture(scope="module")
def hf_256():
    return hf_llama(**WIDTH)


@pytest.fixture(scope="module")
def int8_dir(hf_256, tmp_path_factory):
    root = tmp_path_factory.mktemp("int8")
    return convert_checkpoint(hf_dir(root, hf_256), root / "int8", dtype="int8").output


def test_hf_to_int8_stores_q8_0_of_every_2d_weight_and_float32_norms(hf_256, int8_dir):
    stored = {e.name: e for e in stream.verify(int8_dir / WEIGHTS_NAME)}
    original = {hf_to_mindspore_name(name): t.numpy() for name, t in hf_256.state_dict().items()}
    assert stored.keys() == original.keys()
    for name, values in original.items():
        entry = stored[name]
        if values.ndim == 2:
            assert (entry.dtype, entry.shape) == ("uint8", (values.shape[0], values.shape[1] // 32 * 34)), name
            assert entry.read() == gguf.quants.quantize(values, gguf.GGMLQuantizationType.Q8_0).tobytes(), name
        else:
            assert (entry.dtype, entry.read()) == ("float32", values.tobytes()), name


def test_int8_config_records_the_storage_as_bf16_does_and_nothing_else_changes(hf_256, int8_dir, tmp_path):
    fp32 = convert_checkpoint(hf_dir(tmp_path, hf_256), tmp_path / "fp32").output
    int8, plain = (json.loads((d / CONFIG_NAME).read_text()) for d in (int8_dir, fp32))
    # embedding_init_type follows param_init_type (MindFormers' default), for bf16 as for int8.
    assert [int8.pop(key) for key in ("param_init_type", "embedding_init_type", "compute_dtype")] \
        == ["int8", "int8", "float32"]
    assert [plain.pop(key) for key in ("param_init_type", "embedding_init_type", "compute_dtype")] == ["float32"] * 3
    assert int8 == plain


def test_cli_convert_int8_summary_says_int8_and_counts_parameters_not_bytes(tmp_path, capsys, hf_256):
    from knowlm.cli import main
    source = hf_dir(tmp_path, hf_256)
    assert main(["convert", str(source), str(tmp_path / "fp32")]) == 0
    assert main(["convert", str(source), str(tmp_path / "int8"), "--dtype", "int8"]) == 0
    lines = capsys.readouterr().out.splitlines()
    fp32, int8 = lines[1], lines[3]
    assert lines[2].endswith(f"-> {tmp_path / 'int8'} (int8)")
    parameters = fp32.split(" (")[1].split(" parameters")[0]
    assert int8.startswith(f"converted 21 tensors ({parameters} parameters, ") and ", int8) to " in int8


def test_int8_of_a_model_whose_rows_are_not_whole_blocks_is_refused_naming_the_tensor(tmp_path, capsys):
    source = hf_dir(tmp_path)                  # SwiGLU width 176: down_proj rows of 176 values
    fails_with_one_line(["convert", source, tmp_path / "out", "--dtype", "int8"], capsys,
                        "tensor 'model.layers.0.mlp.down_proj.weight' of shape (64, 176) has rows of 176 values, "
                        "not a multiple of 32", "--dtype int8 is not possible for this model")
    assert not (tmp_path / "out").exists()


# ------------------------------------------------------------------------------------ loading

def tiny_network(**overrides):
    return KnowLMForCausalLM(KnowLMConfig.from_name("tiny", use_past=False, **WIDTH, **overrides))


def test_load_weights_dequantizes_int8_into_float32_parameters(int8_dir):
    network = tiny_network()
    load_weights(network, int8_dir)
    stored = {e.name: e for e in stream.scan(int8_dir / WEIGHTS_NAME)}
    params = {p.name: p for p in network.get_parameters() if p.name in stored}
    assert params.keys() == stored.keys()
    for name, param in params.items():
        entry = stored[name]
        raw = np.frombuffer(entry.read(), np.uint8 if entry.dtype == "uint8" else np.float32).reshape(entry.shape)
        expected = dequantize_q8_0(raw, param.shape) if entry.dtype == "uint8" else raw
        assert param.dtype == ms.float32 and param.requires_grad
        np.testing.assert_array_equal(param.asnumpy(), expected, err_msg=name)


@pytest.mark.parametrize("storage", ["int8", "bf16"])
def test_keep_storage_replaces_2d_weights_by_parameters_of_the_checkpoints_dtype_and_bytes(hf_256, tmp_path,
                                                                                          storage):
    source = convert_checkpoint(hf_dir(tmp_path, hf_256), tmp_path / storage, dtype=storage).output
    network = tiny_network()
    load_weights(network, source, keep_storage=True)
    stored = {e.name: e for e in stream.scan(source / WEIGHTS_NAME)}
    want = ms.uint8 if storage == "int8" else ms.bfloat16
    cell = network.model.layers[1].attention.wq
    assert cell.weight.dtype == want and cell.weight.name == "model.layers.1.attention.wq.weight"
    assert not cell.weight.requires_grad
    assert network.model.tok_embeddings.embedding_weight.dtype == want
    params = {p.name: p for p in network.get_parameters() if p.name in stored}
    assert params.keys() == stored.keys()
    for name, param in params.items():
        entry = stored[name]
        assert param.dtype == (want if len(entry.shape) == 2 else ms.float32), name
        assert tuple(param.shape) == entry.shape, name
        if param.dtype == want or storage == "int8":        # unchanged bytes (int8's norms are float32 already)
            assert param.asnumpy().tobytes() == entry.read(), name
        else:                                               # bf16 norms: cast to the parameter's float32
            cast = torch.frombuffer(bytearray(entry.read()), dtype=torch.bfloat16).float().numpy()
            np.testing.assert_array_equal(param.asnumpy(), cast, err_msg=name)


def test_keep_storage_keeps_a_tied_lm_head_on_the_embedding_parameter(tmp_path):
    model = hf_llama(tie_word_embeddings=True, **WIDTH)
    source = convert_checkpoint(hf_dir(tmp_path, model), tmp_path / "int8", dtype="int8").output
    network = tiny_network(tie_word_embeddings=True)
    load_weights(network, source, keep_storage=True)
    assert network.lm_head.weight is network.model.tok_embeddings.embedding_weight
    assert network.lm_head.weight.dtype == ms.uint8


def test_save_pretrained_records_int8_only_for_q8_0_weights(int8_dir, tmp_path):
    from knowlm.checkpoints.model_dir import load_config
    for keep in (True, False):
        network = tiny_network()
        load_weights(network, int8_dir, keep_storage=keep)
        out = save_pretrained(network, tmp_path / str(keep), BUILTIN_TOKENIZER, config=load_config(int8_dir))
        config = json.loads((out / CONFIG_NAME).read_text())
        assert config["param_init_type"] == config["embedding_init_type"] == ("int8" if keep else "float32")
        stream.validate([out / WEIGHTS_NAME], expected_shapes(load_config(out)), out,
                        "int8" if keep else "float32")


def _rewrite(directory, name, edit):
    """``directory``'s checkpoint with tensor ``name`` rewritten as ``edit(shape, dtype, bytes)`` returns."""
    entries = stream.scan(directory / WEIGHTS_NAME)
    data = {e.name: e.read() for e in entries}
    with stream.writer(directory / WEIGHTS_NAME) as f:
        for e in entries:
            shape, dtype, raw = edit(e.shape, e.dtype, data[e.name]) if e.name == name else (e.shape, e.dtype,
                                                                                                data[e.name])
            stream.write_tensor(f, e.name, shape, dtype, raw)


def test_uint8_tensor_of_another_shape_than_the_packed_one_is_refused_in_one_line(int8_dir, tmp_path):
    broken = shutil.copytree(int8_dir, tmp_path / "broken")
    _rewrite(broken, "model.layers.0.attention.wq.weight", lambda shape, dtype, raw: ((32, 136), dtype, raw))
    message = r"tensor 'model.layers.0.attention.wq.weight' is uint8 of shape \(32, 136\), expected \(64, 68\): " \
              r"Q8_0 of the config's \(64, 64\)"
    one_line_error(lambda: load_weights(tiny_network(), broken), message)
    one_line_error(lambda: export_checkpoint(broken, tmp_path / "hf"), message)
    # A uint8 norm is not Q8_0 either.
    norm = shutil.copytree(int8_dir, tmp_path / "norm")
    _rewrite(norm, "model.norm_out.weight", lambda shape, dtype, raw: ((256,), "uint8", raw))
    one_line_error(lambda: stream.validate([norm / WEIGHTS_NAME], expected_shapes(KnowLMConfig.from_name(
        "tiny", **WIDTH)), norm), r"'model.norm_out.weight' is uint8, but its config shape \(64,\) is not one")


# ------------------------------------------------------------------------- back to float weights

def test_export_of_int8_is_float32_dequantized_and_transformers_loads_it(int8_dir, tmp_path):
    lines = []
    summary = export_checkpoint(int8_dir, tmp_path / "hf", echo=lines.append)
    assert "float32 dequantized from int8" in str(summary) and "(float32, dequantized)" in lines[0]
    model = transformers.AutoModelForCausalLM.from_pretrained(summary.output).eval()
    assert json.loads((summary.output / "config.json").read_text())["torch_dtype"] == "float32"
    stored = {e.name: e for e in stream.scan(int8_dir / WEIGHTS_NAME)}
    state = model.state_dict()
    assert {hf_to_mindspore_name(n) for n in state} == stored.keys()
    for hf_name, tensor in state.items():
        entry = stored[hf_to_mindspore_name(hf_name)]
        assert tensor.dtype == torch.float32, hf_name
        raw = np.frombuffer(entry.read(), np.uint8 if entry.dtype == "uint8" else np.float32).reshape(entry.shape)
        expected = dequantize_q8_0(raw) if entry.dtype == "uint8" else raw
        np.testing.assert_array_equal(tensor.numpy(), expected, err_msg=hf_name)


def test_merge_lora_into_an_int8_base_merges_the_dequantized_values_into_float32(int8_dir, tmp_path):
    rng, weight = np.random.default_rng(3), "model.layers.1.feed_forward.w2.weight"       # (64, 256)
    a, b = rng.standard_normal((4, 256)).astype(np.float32), rng.standard_normal((64, 4)).astype(np.float32)
    adapter = tmp_path / "adapter"
    adapter.mkdir()
    with stream.writer(adapter / ADAPTER_WEIGHTS) as f:
        stream.write_tensor(f, lora_name(weight, LORA_A), a.shape, "float32", a)
        stream.write_tensor(f, lora_name(weight, LORA_B), b.shape, "float32", b)
    write_adapter_config(adapter, rank=4, alpha=8.0, target_modules=[".*w2"])
    summary = merge_lora(int8_dir, adapter, tmp_path / "merged")
    assert "float32 dequantized from int8" in str(summary)
    config = json.loads((summary.output / CONFIG_NAME).read_text())
    assert config["param_init_type"] == config["embedding_init_type"] == config["compute_dtype"] == "float32"
    base = {e.name: e for e in stream.scan(int8_dir / WEIGHTS_NAME)}
    for entry in stream.verify(summary.output / WEIGHTS_NAME):
        source = base[entry.name]
        assert entry.dtype == "float32", entry.name
        values = np.frombuffer(entry.read(), np.float32).reshape(entry.shape)
        raw = np.frombuffer(source.read(), np.uint8 if source.dtype == "uint8" else np.float32)
        expected = dequantize_q8_0(raw.reshape(source.shape)) if source.dtype == "uint8" else raw.reshape(entry.shape)
        if entry.name == weight:        # alpha / rank = 2; float64, rounded once (sums of 4 in another order)
            expected = (expected.astype(np.float64) + 2.0 * (b.astype(np.float64) @ a)).astype(np.float32)
            np.testing.assert_allclose(values, expected, rtol=1e-6, atol=0)
        else:
            np.testing.assert_array_equal(values, expected, err_msg=entry.name)

