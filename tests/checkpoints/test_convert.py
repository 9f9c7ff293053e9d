"""Checkpoint conversion against Hugging Face transformers on tiny random LLaMAs (fp32, CPU).

Tolerances: logits of a converted model equal HF's to 1e-4 (fp32, different kernels); round trips and dtype casts
are compared bit for bit.
"""
import json

import mindspore as ms
import numpy as np
import pytest
import torch
import transformers
from safetensors.torch import load_file, save_file

from reference import IDS, hf_dir, hf_llama, hf_logits, knowlm_config_from_hf, knowlm_logits, one_line_error
from knowlm import KnowLMForCausalLM
from knowlm.cli import main
from knowlm.checkpoints import stream
from knowlm.checkpoints.convert import convert_checkpoint, export_checkpoint
from knowlm.checkpoints.names import expected_shapes, hf_to_mindspore_name
from knowlm.convert_weight import main as convert_weight_main
from knowlm.checkpoints.model_dir import load_config
from knowlm.files import WEIGHTS_INDEX_NAME, WEIGHTS_NAME

# ------------------------------------------------------------------------------------------- parity

@pytest.mark.parametrize("overrides, fmt, sharded", [
    ({}, "bin", False),                                                   # plain multi-head attention
    ({"num_key_value_heads": 2}, "safetensors", True),                    # grouped-query attention
    ({"tie_word_embeddings": True}, "bin", True),
    ({"rope_theta": 500000.0, "rms_norm_eps": 1e-5}, "safetensors", False),
], ids=["mha-bin-single", "gqa-safetensors-sharded", "tied-bin-sharded", "theta-eps-safetensors-single"])
def test_converted_model_matches_hf_logits(tmp_path, overrides, fmt, sharded):
    reference = hf_llama(**overrides)
    source = hf_dir(tmp_path, reference, fmt, sharded)
    out = convert_checkpoint(source, tmp_path / "ms").output

    assert (out / WEIGHTS_INDEX_NAME).is_file() == sharded
    config = load_config(out)
    assert (config.n_kv_heads or config.num_heads, config.theta, config.rms_norm_eps, config.tie_word_embeddings) \
        == (reference.config.num_key_value_heads, reference.config.rope_theta, reference.config.rms_norm_eps,
            reference.config.tie_word_embeddings)
    model = KnowLMForCausalLM.from_pretrained(out, use_past=False)
    np.testing.assert_allclose(knowlm_logits(model, IDS), hf_logits(reference), atol=1e-4, rtol=0)


def test_expected_shapes_are_those_of_the_model_parameters():
    for overrides in ({"num_key_value_heads": 2}, {"tie_word_embeddings": True}):
        config = knowlm_config_from_hf(hf_llama(**overrides).config)
        model = KnowLMForCausalLM(config)
        params = {p.name: tuple(p.shape) for p in model.get_parameters() if not p.name.endswith("_cache")}
        assert expected_shapes(config) == params


# ------------------------------------------------------------------------------ round trip and dtypes

def test_round_trip_hf_to_mindspore_to_hf_is_bit_identical(tmp_path):
    reference = hf_llama(num_key_value_heads=2)
    source = hf_dir(tmp_path, reference, "safetensors", sharded=True)
    exported = export_checkpoint(convert_checkpoint(source, tmp_path / "ms").output, tmp_path / "back").output

    again = transformers.AutoModelForCausalLM.from_pretrained(exported).eval()
    original, result = reference.state_dict(), again.state_dict()
    assert original.keys() == result.keys()
    for name, tensor in original.items():
        assert result[name].dtype == tensor.dtype and torch.equal(result[name], tensor), name
    np.testing.assert_array_equal(hf_logits(again), hf_logits(reference))
    written = json.loads((exported / "config.json").read_text())
    for key in ("hidden_size", "num_key_value_heads", "intermediate_size", "rope_theta", "rms_norm_eps"):
        assert written[key] == reference.config.to_dict()[key], key


@pytest.mark.parametrize("dtype, torch_dtype, ms_dtype", [("fp16", torch.float16, ms.float16),
                                                          ("bf16", torch.bfloat16, ms.bfloat16)])
def test_lower_precision_output_equals_a_plain_cast(tmp_path, dtype, torch_dtype, ms_dtype):
    reference = hf_llama()
    out = convert_checkpoint(hf_dir(tmp_path, reference, "bin"), tmp_path / dtype, dtype=dtype).output

    stored = {e.name: e for e in stream.scan(out / WEIGHTS_NAME)}
    for name, tensor in reference.state_dict().items():
        cast = tensor.to(torch_dtype).contiguous().view(torch.uint8).numpy().tobytes()
        assert stored[hf_to_mindspore_name(name)].read() == cast, name
    assert load_config(out).param_init_type == ms_dtype
    if dtype == "fp16":     # and MindSpore's own reader agrees
        loaded = ms.load_checkpoint(str(out / WEIGHTS_NAME))
        np.testing.assert_array_equal(loaded["lm_head.weight"].asnumpy(),
                                      reference.lm_head.weight.detach().half().numpy())


# ---------------------------------------------------------------------------------- commands

def test_legacy_command_reads_every_shard_into_one_checkpoint_file(tmp_path, capsys):
    reference = hf_llama()
    source = hf_dir(tmp_path, reference, "bin", sharded=True)
    second_shard = sorted(source.glob("pytorch_model-*.bin"))[1]
    target = tmp_path / "knowlm.ckpt"
    assert convert_weight_main(["--torch_bin_path", str(second_shard), "--mindspore_ckpt_path", str(target)]) == 0
    assert "converted 21 tensors" in capsys.readouterr().out
    loaded = ms.load_checkpoint(str(target))
    assert set(loaded) == {hf_to_mindspore_name(n) for n in reference.state_dict()}
    np.testing.assert_array_equal(loaded["model.norm_out.weight"].asnumpy(), reference.model.norm.weight.detach())


def test_cli_convert_and_export_print_arguments_then_summary(tmp_path, capsys):
    source = hf_dir(tmp_path)
    assert main(["convert", str(source), str(tmp_path / "ms"), "--dtype", "fp32", "--check-finite"]) == 0
    assert main(["export", str(tmp_path / "ms"), str(tmp_path / "back")]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[0].startswith(f"knowlm convert: {source} (1 safetensors file(s), 21 tensors, float32)")
    assert lines[1].startswith("converted 21 tensors (228,672 parameters, 914.69 KB, float32) to ")
    assert lines[3].startswith("exported 21 tensors")


def test_cli_bad_input_is_one_line_with_exit_status_2(tmp_path, capsys):
    assert main(["convert", str(tmp_path / "nothing"), str(tmp_path / "ms")]) == 2
    assert capsys.readouterr().err.strip().splitlines() == [
        f"knowlm: error: {tmp_path / 'nothing'}: not a directory; expected a Hugging Face model directory"]


# -------------------------------------------------------------------------------- bad input

def _edit_tensors(hf_path, edit):
    tensors = load_file(hf_path / "model.safetensors")
    edit(tensors)
    save_file(tensors, hf_path / "model.safetensors", metadata={"format": "pt"})


def _add_foreign_tensors(tensors):
    for name in ("vision_tower.proj.weight", "model.layers.0.self_attn.q_norm.weight"):
        tensors[name] = torch.zeros(2)


def _drop_layer_1_mlp(tensors):
    for name in ("up", "down"):
        del tensors[f"model.layers.1.mlp.{name}_proj.weight"]


def _quantize_norm(tensors):
    tensors["model.norm.weight"] = tensors["model.norm.weight"].to(torch.int8)


def _set_config(path, **values):
    config = json.loads((path / "config.json").read_text())
    (path / "config.json").write_text(json.dumps({**config, **values}))


def _truncate(path):
    path.write_bytes(path.read_bytes()[:path.stat().st_size // 2])


BAD_INPUTS = {
    "missing shard": ("safetensors", True, lambda d: (d / "model-00002-of-00004.safetensors").unlink(),
                      r"model.safetensors.index.json: lists shard\(s\) not in the directory: model-00002-of-00004"),
    "truncated bin": ("bin", False, lambda d: _truncate(d / "pytorch_model.bin"),
                      r"pytorch_model.bin: not a readable PyTorch checkpoint, truncated or corrupt"),
    "truncated safetensors": ("safetensors", False, lambda d: _truncate(d / "model.safetensors"),
                              r"model.safetensors: not a readable safetensors file, truncated or corrupt"),
    "unknown names": ("safetensors", False, lambda d: _edit_tensors(d, _add_foreign_tensors),
                      r"model.safetensors: unknown tensor name\(s\) 'model.layers.0.self_attn.q_norm.weight', "
                      r"'vision_tower.proj.weight'"),
    "missing names": ("safetensors", False, lambda d: _edit_tensors(d, _drop_layer_1_mlp),
                      r"missing tensor\(s\) 'model.layers.1.mlp.down_proj.weight', "
                      r"'model.layers.1.mlp.up_proj.weight'"),
    "shape mismatch": ("bin", False, lambda d: _set_config(d, intermediate_size=192),
                       r"pytorch_model.bin: tensor 'model.layers.0.mlp.gate_proj.weight' has shape \(176, 64\), "
                       r"expected \(192, 64\) from the config"),
    "unsupported dtype": ("safetensors", False, lambda d: _edit_tensors(d, _quantize_norm),
                          r"model.safetensors: tensor 'model.norm.weight' has dtype int8; supported: float32, "
                          r"float16, bfloat16"),
    "rope scaling": ("safetensors", False, lambda d: _set_config(d, rope_scaling={"type": "linear", "factor": 2.0}),
                     r"config.json: rope_scaling=\{'type': 'linear', 'factor': 2.0\} is not supported"),
    "attention bias": ("safetensors", False, lambda d: _set_config(d, attention_bias=True),
                       r"config.json: attention_bias=True is not supported"),
    "mlp bias": ("safetensors", False, lambda d: _set_config(d, mlp_bias=True),
                 r"config.json: mlp_bias=True is not supported"),
    "activation": ("safetensors", False, lambda d: _set_config(d, hidden_act="gelu"),
                   r"config.json: hidden_act='gelu' is not supported; knowlm runs LLaMA with hidden_act='silu'"),
    "model type": ("safetensors", False, lambda d: _set_config(d, model_type="mistral"),
                   r"config.json: model_type='mistral' is not supported"),
    "no tokenizer": ("safetensors", False, lambda d: (d / "tokenizer.model").unlink(),
                     r"hf-safetensors: no tokenizer; expected tokenizer.model \(SentencePiece\) or tokenizer.json"),
}


@pytest.mark.parametrize("case", BAD_INPUTS)
def test_bad_input_is_refused_with_one_line_naming_file_and_problem(tmp_path, case):
    fmt, sharded, damage, message = BAD_INPUTS[case]
    source = hf_dir(tmp_path, fmt=fmt, sharded=sharded)
    damage(source)
    one_line_error(lambda: convert_checkpoint(source, tmp_path / "ms"), message)
    assert not (tmp_path / "ms").exists()       # every check runs before anything is written


def _flip_byte(path):
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0x10
    path.write_bytes(bytes(data))


@pytest.mark.parametrize("damage, message", [(_truncate, "truncated or corrupt MindSpore checkpoint"),
                                             (_flip_byte, "checksum mismatch: the file is damaged")],
                         ids=["truncated", "flipped byte"])
def test_export_refuses_a_damaged_mindspore_checkpoint_naming_it(model_dir, tmp_path, damage, message):
    damaged = tmp_path / "damaged"
    damaged.mkdir()
    for name in ("config.json", WEIGHTS_NAME):
        (damaged / name).write_bytes((model_dir / name).read_bytes())
    damage(damaged / WEIGHTS_NAME)
    one_line_error(lambda: export_checkpoint(damaged, tmp_path / "hf"), f"^{damaged / WEIGHTS_NAME}: {message}")
    assert not (tmp_path / "hf").exists()


def test_pickle_that_would_run_code_is_refused_and_nothing_runs(tmp_path):
    marker = tmp_path / "pwned"

    class Payload:      # unpickling this would call open(marker, "w"), creating the file
        def __reduce__(self):
            return open, (str(marker), "w")

    source = hf_dir(tmp_path, fmt="bin")
    torch.save({"model.embed_tokens.weight": Payload()}, source / "pytorch_model.bin")
    message = one_line_error(lambda: convert_checkpoint(source, tmp_path / "ms"),
                             r"pytorch_model.bin: refused: the pickle asks to run code \(Unsupported global")
    assert "nothing of it was run" in message
    assert not marker.exists()


def test_existing_output_is_kept_without_force_and_replaced_with_it(tmp_path):
    sharded, single = hf_dir(tmp_path, fmt="bin", sharded=True), hf_dir(tmp_path, fmt="safetensors")
    out = convert_checkpoint(sharded, tmp_path / "ms").output
    one_line_error(lambda: convert_checkpoint(single, out), r"already holds a result \(config.json\); pass --force")
    convert_checkpoint(single, out, force=True)
    assert sorted(p.name for p in out.iterdir()) == ["config.json", WEIGHTS_NAME, "tokenizer.model"]
    one_line_error(lambda: convert_checkpoint(single, single, force=True), "is the input directory")


def test_interrupted_conversion_leaves_no_file_that_looks_complete(tmp_path, monkeypatch):
    source = hf_dir(tmp_path, fmt="bin", sharded=True)
    calls = []

    def failing_write(*args):
        calls.append(args[1])
        if len(calls) == 8:
            raise KeyboardInterrupt
        original(*args)

    original = stream.write_tensor
    monkeypatch.setattr(stream, "write_tensor", failing_write)
    with pytest.raises(KeyboardInterrupt):
        convert_checkpoint(source, tmp_path / "ms")
    assert len(calls) == 8 and not (tmp_path / "ms").exists()      # nothing is published before the whole result


def _with_norm_value(value):
    reference = hf_llama()
    with torch.no_grad():
        reference.model.norm.weight[3] = value
        reference.model.norm.weight[5] = -value
    return reference


def test_fp16_overflow_is_refused_naming_the_tensor_and_nothing_is_written(tmp_path):
    source = hf_dir(tmp_path, _with_norm_value(1.0e6))     # finite in fp32 and bf16, inf in fp16
    message = (r"model.safetensors: tensor 'model.norm.weight': 2 values overflow fp16 \(max 65504\); "
               r"keep fp32 or use bf16$")
    for output in (tmp_path / "fp16", tmp_path / "fp16.ckpt"):      # the check is on without --check-finite
        one_line_error(lambda: convert_checkpoint(source, output, dtype="fp16"), message)
        assert not output.exists()
    convert_checkpoint(source, tmp_path / "bf16", dtype="bf16")
    convert_checkpoint(source, tmp_path / "fp32")


def test_failed_conversion_over_an_existing_result_leaves_it_as_it_was(tmp_path):
    source = hf_dir(tmp_path, _with_norm_value(1.0e6), sharded=True)
    out = convert_checkpoint(source, tmp_path / "ms").output
    before = {p.name: p.read_bytes() for p in out.iterdir()}
    one_line_error(lambda: convert_checkpoint(source, out, dtype="fp16", force=True), "overflow fp16")
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before


def test_check_finite_refuses_inf_or_nan_in_the_source_of_a_same_dtype_conversion(tmp_path):
    source = hf_dir(tmp_path, _with_norm_value(float("nan")))
    one_line_error(lambda: convert_checkpoint(source, tmp_path / "checked", check_finite=True),
                   r"model.safetensors: tensor 'model.norm.weight': holds 2 inf or nan values$")
    assert not (tmp_path / "checked").exists()
    convert_checkpoint(source, tmp_path / "unchecked")         # source values are only checked when asked


def test_cli_convert_overflowing_fp16_is_one_line_with_exit_status_2(tmp_path, capsys):
    source = hf_dir(tmp_path, _with_norm_value(1.0e6))
    assert main(["convert", str(source), str(tmp_path / "fp16"), "--dtype", "fp16"]) == 2
    assert capsys.readouterr().err.strip().splitlines() == [
        f"knowlm: error: {source / 'model.safetensors'}: tensor 'model.norm.weight': 2 values overflow fp16 "
        "(max 65504); keep fp32 or use bf16"]
    assert not (tmp_path / "fp16").exists()
