"""``knowlm convert`` of a llama.cpp GGUF file: a LLaMA-architecture ``.gguf`` -> a knowlm model directory, streamed.

A GGUF file is untrusted data. It is read with the ``gguf`` package's ``GGUFReader`` (a numpy memory map; nothing
in the file runs), every read is bounds-checked against the file's length (a truncated or corrupt file is one line
naming it), and every tensor's name, type and shape is checked against the config the metadata implies before
anything is written. Then one tensor at a time: dequantized (``gguf.quants.dequantize``, from the memory map),
q/k rows put back in Hugging Face's order, cast, written, dropped, so memory stays near one tensor. With ``--dtype
int8`` (Q8_0, ``knowlm.checkpoints.quant``), a Q8_0 tensor of the file is copied as its raw bytes (q/k: its packed rows
reordered, blocks and scales with their row: lossless), any other 2-D one dequantized and quantized to Q8_0.

The tokenizer is converted by transformers' own GGUF code (what ``AutoTokenizer.from_pretrained(..., gguf_file=...)``
does), then its special tokens and BOS/EOS flags are set from the file's metadata (see ``_tokenizer``), and saved
as ``tokenizer.json`` + ``tokenizer_config.json`` with the file's chat template.
"""
import os
import re
import time
from collections import Counter
from dataclasses import dataclass
from math import prod
from pathlib import Path

import numpy as np

from knowlm.checkpoints import stream
from knowlm.checkpoints.summary import Summary, make_summary, progress_bar, resolve_dtype
from knowlm.checkpoints.hf import checked_cast, import_torch, knowlm_config_from_hf
from knowlm.checkpoints.names import check_tensors, expected_shapes, hf_to_mindspore_name, listing
from knowlm.checkpoints.quant import (INT8, PACKED, check_int8, check_q8_0_finite, quantize_q8_0, stored_dtype,
                                      stored_shape)
from knowlm.checkpoints.stream import DTYPES
from knowlm.errors import KnowLMError, first_line
from knowlm.files import (CHAT_TEMPLATE_NAME, CONFIG_NAME, FAST_TOKENIZER_NAME, SPECIAL_TOKENS_MAP_NAME, TOKENIZER_CONFIG_NAME, TOKENIZER_NAME, WEIGHTS_GLOB,
                          WEIGHTS_NAME, staged_output, write_json)

# llama.cpp tensor name -> Hugging Face LLaMA name ("{}": the layer); MindSpore names come from names.WEIGHTS.
GGUF_TO_HF = {
    "token_embd.weight": "model.embed_tokens.weight",
    "blk.{}.attn_norm.weight": "model.layers.{}.input_layernorm.weight",
    "blk.{}.attn_q.weight": "model.layers.{}.self_attn.q_proj.weight",
    "blk.{}.attn_k.weight": "model.layers.{}.self_attn.k_proj.weight",
    "blk.{}.attn_v.weight": "model.layers.{}.self_attn.v_proj.weight",
    "blk.{}.attn_output.weight": "model.layers.{}.self_attn.o_proj.weight",
    "blk.{}.ffn_norm.weight": "model.layers.{}.post_attention_layernorm.weight",
    "blk.{}.ffn_gate.weight": "model.layers.{}.mlp.gate_proj.weight",
    "blk.{}.ffn_up.weight": "model.layers.{}.mlp.up_proj.weight",
    "blk.{}.ffn_down.weight": "model.layers.{}.mlp.down_proj.weight",
    "output_norm.weight": "model.norm.weight",
    "output.weight": "lm_head.weight",
    # Old conversions may keep rotary_emb.inv_freq: names.WEIGHTS drops it (recomputed from rope_theta).
    "blk.{}.attn_rot_embd": "model.layers.{}.self_attn.rotary_emb.inv_freq",
}
_PATTERNS = [(re.compile("^" + re.escape(src).replace(r"\{\}", r"(\d+)") + "$"), dst)
             for src, dst in GGUF_TO_HF.items()]
# Per-dimension RoPE frequency factors (llama.cpp's form of Llama 3.1's rope scaling). knowlm's rotary embedding
# has no such factors: the tensor is dropped only when every factor is 1 (then it changes nothing), else refused.
_ROPE_FREQS = "rope_freqs.weight"

# Tensor types converted (all dequantized by gguf-py): float, the legacy block quants and the common K-quants.
TENSOR_TYPES = ("F32", "F16", "BF16", "Q8_0", "Q4_0", "Q4_1", "Q5_0", "Q5_1", "Q4_K", "Q5_K", "Q6_K")

# GGUF metadata key (after "llama.") -> Hugging Face config.json key; the same table transformers reads.
GGUF_CONFIG_TO_HF = {
    "embedding_length": "hidden_size",
    "block_count": "num_hidden_layers",
    "attention.head_count": "num_attention_heads",
    "attention.head_count_kv": "num_key_value_heads",
    "feed_forward_length": "intermediate_size",
    "attention.layer_norm_rms_epsilon": "rms_norm_eps",
    "rope.freq_base": "rope_theta",
    "context_length": "max_position_embeddings",
    "rope.dimension_count": "head_dim",
}
# What llama.cpp itself requires of a LLaMA file; the others have defaults (kv heads = heads, theta 10000).
_REQUIRED = ("embedding_length", "block_count", "attention.head_count", "feed_forward_length",
             "attention.layer_norm_rms_epsilon", "context_length")
_TOKEN_IDS = {"bos_token_id": "bos_token_id", "eos_token_id": "eos_token_id", "padding_token_id": "pad_token_id",
              "unknown_token_id": "unk_token_id"}
# tokenizer.ggml.model values transformers' GGUFLlamaConverter reads.
_TOKENIZER_MODELS = {"llama": "SentencePiece", "gpt2": "byte-level BPE"}
# Tokenizer files an older result in ``output`` (--force) may hold that this one does not replace: a SentencePiece
# tokenizer.model wins over tokenizer.json, and chat_template.jinja over tokenizer_config.json's template.
_STALE = (TOKENIZER_NAME, CHAT_TEMPLATE_NAME, SPECIAL_TOKENS_MAP_NAME)


@dataclass
class GGUFTensor:
    """A tensor of the GGUF file under its MindFormers ``name``, in Hugging Face's shape (what the checks need)."""
    name: str
    shape: tuple
    dtype: str
    path: str
    gguf_name: str
    index: int          # in reader.tensors
    nbytes: int         # written


def convert_gguf(gguf_path, output, dtype=None, force=False, check_finite=False, echo=None) -> Summary:
    """Convert the llama.cpp GGUF file ``gguf_path`` of a LLaMA model to a knowlm model directory ``output``.

    ``dtype`` (fp32/fp16/bf16, or int8: Q8_0) defaults to fp32: quantized weights are dequantized to fp32, the
    type llama.cpp computes with (with int8, Q8_0 tensors are copied as they are). A narrowing cast is checked for
    overflow, and ``check_finite`` checks every value for inf and nan. A failure names the file (and tensor or key)
    in one line and leaves ``output`` as it was. ``echo`` (e.g. ``print``) receives the resolved arguments before the
    work starts.
    """
    start = time.time()
    path, output = Path(gguf_path), Path(output)
    if output.suffix == ".ckpt":
        raise KnowLMError(f"{output}: a GGUF file converts to a model directory (its tokenizer goes with the "
                          "weights); expected a directory name, not a .ckpt file")
    dtype = resolve_dtype(dtype or "fp32", int8=True)
    reader = open_gguf(path)
    arch = _meta(reader, path, "general.architecture")
    if arch != "llama":
        raise KnowLMError(f"{path}: architecture {arch!r} is not supported; knowlm converts LLaMA-architecture "
                          "GGUF files")
    plan, rope_freqs = _plan(reader, path, dtype)
    config = knowlm_config_from_hf(_hf_config(reader, path, plan), dtype, source=str(path))
    if rope_freqs is not None:
        _check_rope_freqs(reader.tensors[rope_freqs], path)
    by_name = {e.name: e.gguf_name for e in plan}
    expected = expected_shapes(config)
    check_tensors(plan, expected, path, show=lambda name: by_name.get(name, name))
    if dtype == INT8:
        check_int8(expected, path, show=lambda name: by_name.get(name, name))
    tokenizer = _tokenizer(reader, path, config.vocab_size)
    if output.exists() and not output.is_dir():
        raise KnowLMError(f"{output}: exists and is not a directory; expected the output model directory")
    names = [WEIGHTS_NAME, FAST_TOKENIZER_NAME, TOKENIZER_CONFIG_NAME, CONFIG_NAME]
    with staged_output(output, names, force, stale=WEIGHTS_GLOB) as (weights, tokenizer_json, tokenizer_config,
                                                                      config_json):
        if echo:
            types = Counter(t.tensor_type.name for t in reader.tensors)
            echo(f"knowlm convert: {path} (GGUF, {len(plan)} tensors: "
                 f"{', '.join(f'{n} {k}' for k, n in types.items())}) -> {output} ({dtype})")
        with progress_bar(sum(e.nbytes for e in plan), "convert") as bar:
            _write(weights, reader, plan, config, dtype, check_finite, bar)
        written = stream.validate([weights], expected, output, dtype, checksum=False)
        _save_tokenizer(tokenizer, weights.parent / "hf-tokenizer", tokenizer_json, tokenizer_config)
        values = config.to_dict()
        values["checkpoint_name_or_path"] = ""
        write_json(config_json, values)
        for name in _STALE:             # last, once all is written and checked: see _STALE
            (output / name).unlink(missing_ok=True)
    return make_summary("converted", output, written, dtype, start)


# ------------------------------------------------------------------------------------------------ reading

def import_gguf():
    try:
        import gguf  # pylint: disable=import-outside-toplevel  (optional: only GGUF conversion needs it)
    except ImportError:
        raise KnowLMError("converting a GGUF file needs the gguf and transformers packages: "
                          "pip install 'knowlm[torch]' gguf transformers") from None
    return gguf


def open_gguf(path: Path):
    """``gguf.GGUFReader`` of ``path`` (memory-mapped: tensors are views, no data is read yet), every read of it
    checked against the file's length; a file that is not GGUF, truncated or corrupt is one line naming it."""
    gguf = import_gguf()
    if not path.is_file():
        raise KnowLMError(f"{path}: {'not a file' if path.exists() else 'not found'}; expected a llama.cpp "
                          ".gguf file")
    with open(path, "rb") as f:
        magic = f.read(4)
    if magic != b"GGUF":
        raise KnowLMError(f"{path}: not a GGUF file (it starts with {magic!r}, not b'GGUF'); expected a llama.cpp "
                          ".gguf file")

    class CheckedReader(gguf.GGUFReader):
        # GGUFReader slices its memory map without bounds checks: a short file gives short arrays, and errors
        # far from the cause (or none). Every header read and tensor view goes through _get.
        def _get(self, offset, dtype, count=1, override_order=None):
            end = int(offset) + np.dtype(dtype).itemsize * int(count)
            if end > self.data.size:
                raise _PastEnd(f"{end - int(offset)} bytes at byte {int(offset)} run past the end of the file, "
                               f"{self.data.size} bytes")
            return super()._get(offset, dtype, count, override_order)

    try:
        reader = CheckedReader(path)
    except Exception as err:  # pylint: disable=broad-except  (the reader raises many types for bad files)
        raise KnowLMError(f"{path}: truncated or corrupt GGUF ({first_line(err)}); download or copy it "
                          "again") from None
    size = os.path.getsize(path)
    for t in reader.tensors:     # checked here too, in case a gguf release reads tensor data without _get
        if t.data_offset + t.n_bytes > size:
            raise KnowLMError(f"{path}: truncated or corrupt GGUF (tensor {t.name!r} lies at bytes "
                              f"{t.data_offset}-{t.data_offset + t.n_bytes}, the file has {size}); download or "
                              "copy it again")
    if reader.byte_order != "I":
        raise KnowLMError(f"{path}: a big-endian GGUF file; knowlm converts little-endian ones (llama.cpp's "
                          "default)")
    return reader


class _PastEnd(Exception):
    pass


def _meta(reader, path, key, default=None, kind=None):
    """Metadata value ``key`` (a str, number, bool or list), ``default`` if absent; ``kind`` "int"/"float" demands
    a positive number of that kind, ``None`` as ``default`` a value."""
    field = reader.fields.get(key)
    if field is None:
        if default is None:
            raise KnowLMError(f"{path}: missing metadata {key}; expected a llama.cpp LLaMA GGUF file")
        return default
    try:
        value = field.contents()
    except (UnicodeDecodeError, ValueError, IndexError) as err:
        raise KnowLMError(f"{path}: unreadable metadata {key} ({first_line(err)})") from None
    if kind == "int" and not (type(value) is int and value > 0):  # pylint: disable=unidiomatic-typecheck (not bool)
        raise KnowLMError(f"{path}: metadata {key}={value!r}; expected a positive integer")
    if kind == "float" and not (type(value) in (int, float) and 0 < value < float("inf")):  # noqa: E721
        raise KnowLMError(f"{path}: metadata {key}={value!r}; expected a positive number")
    return value


def _to_hf(gguf_name):
    for pattern, target in _PATTERNS:
        match = pattern.match(gguf_name)
        if match:
            return target.replace("{}", match.group(1)) if match.groups() else target
    return None


def _plan(reader, path, dtype):
    """The tensors to write (``GGUFTensor``, file order) and the index of ``rope_freqs.weight`` if present; unknown
    names and unsupported types refused."""
    plan, unknown, rope_freqs = [], [], None
    for index, t in enumerate(reader.tensors):
        if t.name == _ROPE_FREQS:
            rope_freqs = index
            continue
        hf_name = _to_hf(t.name)
        if hf_name is None:
            unknown.append(t.name)
            continue
        name = hf_to_mindspore_name(hf_name)
        if name is None:
            continue
        if t.tensor_type.name not in TENSOR_TYPES:
            raise KnowLMError(f"{path}: tensor {t.name!r} has type {t.tensor_type.name}; supported: "
                              f"{', '.join(TENSOR_TYPES)}")
        shape = tuple(int(d) for d in reversed(t.shape.tolist()))   # GGUF lists ne0, the contiguous one, first
        stored = stored_dtype(shape, dtype)          # Q8_0: rows of K / 32 blocks of 34 bytes (K checked later)
        nbytes = shape[0] * (shape[1] // 32) * 34 if stored == PACKED else prod(shape) * DTYPES[stored].itemsize
        plan.append(GGUFTensor(name, shape, dtype, str(path), t.name, index, nbytes))
    if unknown:
        raise KnowLMError(f"{path}: unknown tensor name(s) {listing(unknown)}; expected llama.cpp LLaMA names "
                          f"such as {next(iter(GGUF_TO_HF))!r}")
    return plan, rope_freqs


def _hf_config(reader, path, plan) -> dict:
    """The Hugging Face ``config.json`` the metadata describes (what transformers builds from it)."""
    meta = {key: _meta(reader, path, f"llama.{key}", None if key in _REQUIRED else False,
                       "float" if key in ("attention.layer_norm_rms_epsilon", "rope.freq_base") else "int")
            for key in GGUF_CONFIG_TO_HF if key in _REQUIRED or f"llama.{key}" in reader.fields}
    hf = {"model_type": "llama", **{GGUF_CONFIG_TO_HF[key]: value for key, value in meta.items()}}
    if _meta(reader, path, "llama.expert_count", 0):
        raise KnowLMError(f"{path}: a mixture-of-experts LLaMA (llama.expert_count="
                          f"{_meta(reader, path, 'llama.expert_count')}); knowlm converts dense LLaMA models")
    for key, none in (("rope.scaling.type", "none"), ("rope.scaling.factor", 1.0), ("rope.scale_linear", 1.0)):
        value = _meta(reader, path, f"llama.{key}", none)                # rope.scale_linear: older files' key
        if value not in (none, 0.0):                                      # factor 0: unset
            raise KnowLMError(f"{path}: llama.{key}={value!r}: rope scaling is not supported; knowlm runs LLaMA "
                              "without rope scaling")
    heads, kv_heads = hf["num_attention_heads"], hf.get("num_key_value_heads", hf["num_attention_heads"])
    if hf["hidden_size"] % (2 * heads) or heads % kv_heads:
        raise KnowLMError(f"{path}: llama.embedding_length={hf['hidden_size']} with {heads} heads and {kv_heads} "
                          "KV heads; expected an even head size and heads a multiple of the KV heads")
    embedding = next((e for e in plan if e.gguf_name == "token_embd.weight"), None)
    if embedding is None or len(embedding.shape) != 2:
        raise KnowLMError(f"{path}: missing tensor 'token_embd.weight' (2-D); expected a llama.cpp LLaMA GGUF file")
    hf["vocab_size"] = embedding.shape[0]
    hf["tie_word_embeddings"] = not any(e.gguf_name == "output.weight" for e in plan)
    for key, name in _TOKEN_IDS.items():
        value = _meta(reader, path, f"tokenizer.ggml.{key}", False)
        if value is not False:
            if type(value) is not int or not 0 <= value < hf["vocab_size"]:  # noqa: E721  (not bool)
                raise KnowLMError(f"{path}: metadata tokenizer.ggml.{key}={value!r}; expected a token id below "
                                  f"the vocabulary size {hf['vocab_size']}")
            hf[name] = value
    return hf


def _check_rope_freqs(t, path):
    gguf = import_gguf()
    if t.tensor_type.name not in TENSOR_TYPES or not np.all(gguf.quants.dequantize(t.data, t.tensor_type) == 1):
        raise KnowLMError(f"{path}: tensor {_ROPE_FREQS!r} holds RoPE frequency factors (Llama 3.1-style rope "
                          "scaling), which knowlm's LLaMA does not implement")


# ------------------------------------------------------------------------------------------------ writing

def unpermute_qk(weight, n_head):
    """Hugging Face's row order of a q_proj / k_proj weight from llama.cpp's.

    llama.cpp's ``convert_hf_to_gguf.py`` permutes each head's rows from the rotate-half layout (Hugging Face's
    and MindFormers') to interleaved pairs: ``w.reshape(n_head, 2, d // n_head // 2, *rest).swapaxes(1, 2)``; this
    is its inverse, as transformers' ``LlamaTensorProcessor._reverse_permute_weights`` does it (k: n_head = KV heads).
    """
    return weight.reshape(n_head, weight.shape[0] // n_head // 2, 2, *weight.shape[1:]).swapaxes(1, 2) \
        .reshape(weight.shape)


def _write(tmp, reader, plan, config, dtype, check_finite, bar):
    """One tensor at a time: dequantize from the memory map, un-permute q/k, cast (checked), write, drop. With int8,
    a Q8_0 tensor's packed rows are copied (q/k rows un-permuted), other 2-D ones quantized to Q8_0."""
    gguf, torch = import_gguf(), import_torch()
    heads = {"attn_q": config.num_heads, "attn_k": config.n_kv_heads or config.num_heads}
    with stream.writer(tmp) as f:
        for entry in plan:
            t = reader.tensors[entry.index]
            kind, target = entry.gguf_name.split(".")[-2], stored_dtype(entry.shape, dtype)
            where = f"{entry.path}: tensor {entry.gguf_name!r}"
            if target == PACKED and t.tensor_type == gguf.GGMLQuantizationType.Q8_0:
                packed = np.asarray(t.data).reshape(stored_shape(entry.shape, PACKED))      # bytes as they are
                if check_finite:
                    check_q8_0_finite(packed, where)
                if kind in heads:
                    packed = unpermute_qk(packed, heads[kind])                              # whole packed rows
                stream.write_tensor(f, entry.name, packed.shape, PACKED, np.ascontiguousarray(packed))
                bar.update(entry.nbytes)
                continue
            values = gguf.quants.dequantize(t.data, t.tensor_type).reshape(entry.shape)
            if kind in heads:
                values = unpermute_qk(values, heads[kind])
            # A writable, contiguous float32 copy at most (F32 tensors are read-only views of the map).
            values = torch.from_numpy(np.require(values, np.float32, ["C", "W"]))
            cast = checked_cast(values, "float32" if target == PACKED else target, where, check_finite)
            del values
            if target == PACKED:
                packed = quantize_q8_0(cast.numpy(), where)
                stream.write_tensor(f, entry.name, packed.shape, PACKED, packed)
            else:
                stream.write_tensor(f, entry.name, entry.shape, target, cast.reshape(-1).view(torch.uint8).numpy())
            del cast
            bar.update(entry.nbytes)


# ---------------------------------------------------------------------------------------------- tokenizer

def _tokenizer(reader, path, vocab_size):
    """The file's tokenizer as transformers converts it (``LlamaTokenizerFast``), fixed where transformers
    misreads the metadata.

    transformers 4.57 sets the EOS token to the BOS token for every llama GGUF file, leaves the pad token unset and
    always adds a BOS token: here the bos/eos/unk/pad tokens are those the file names, and BOS/EOS are added as
    its ``tokenizer.ggml.add_bos_token`` / ``add_eos_token`` say (transformers' default when absent). The token
    ids themselves are transformers' conversion, unchanged.
    """
    model = _meta(reader, path, "tokenizer.ggml.model", False)
    if model is False or "tokenizer.ggml.tokens" not in reader.fields:
        raise KnowLMError(f"{path}: holds no tokenizer (tokenizer.ggml.model, tokenizer.ggml.tokens); knowlm "
                          "needs the tokenizer the weights were trained with")
    if model not in _TOKENIZER_MODELS:
        raise KnowLMError(f"{path}: tokenizer.ggml.model={model!r} is not supported; expected "
                          + " or ".join(f"{k!r} ({v})" for k, v in _TOKENIZER_MODELS.items()))
    try:
        from transformers import LlamaTokenizerFast  # pylint: disable=import-outside-toplevel  (optional)
        from transformers.integrations.ggml import GGUF_TOKENIZER_MAPPING, _gguf_parse_value, convert_gguf_tokenizer
    except ImportError:
        import_gguf()
        raise KnowLMError("converting a GGUF file needs the transformers package: pip install transformers") \
            from None
    # What transformers' load_gguf_checkpoint collects, read from this (checked) reader instead of a second one.
    sections = {section: {} for section in GGUF_TOKENIZER_MAPPING}
    for key, field in reader.fields.items():
        if key.startswith("tokenizer."):
            value = [_gguf_parse_value(field.parts[i], field.types) for i in field.data]
            value = value[0] if len(value) == 1 else value
            for section, renames in GGUF_TOKENIZER_MAPPING.items():
                if key.removeprefix("tokenizer.") in renames:
                    sections[section][renames[key.removeprefix("tokenizer.")]] = value
    tokens = sections["tokenizer"]["tokens"]
    if not isinstance(tokens, list) or len(tokens) > vocab_size:
        raise KnowLMError(f"{path}: tokenizer.ggml.tokens holds {len(tokens) if isinstance(tokens, list) else 1} "
                          f"tokens; expected at most the {vocab_size} rows of token_embd.weight")
    try:
        backend, extra = convert_gguf_tokenizer("llama", sections["tokenizer"])
        tokenizer = LlamaTokenizerFast(tokenizer_object=backend, **{**sections["tokenizer_config"], **extra})
    except Exception as err:  # pylint: disable=broad-except  (the converter raises many types for bad metadata)
        raise KnowLMError(f"{path}: the tokenizer metadata could not be converted ({first_line(err)})") from None
    for key, name in _TOKEN_IDS.items():
        token_id = sections["tokenizer"].get(name)
        if isinstance(token_id, int) and 0 <= token_id < len(tokens):
            setattr(tokenizer, name.removesuffix("_id"), tokens[token_id])
    for flag in ("add_bos_token", "add_eos_token"):
        if f"tokenizer.ggml.{flag}" in reader.fields:   # LlamaTokenizerFast rebuilds its post-processor
            setattr(tokenizer, flag, _meta(reader, path, f"tokenizer.ggml.{flag}") is True)
    return tokenizer


def _save_tokenizer(tokenizer, scratch, tokenizer_json, tokenizer_config):
    """``tokenizer.json`` and ``tokenizer_config.json`` (chat template inside) to the two staged paths.

    ``save_pretrained`` of a GGUF-converted tokenizer would also copy the GGUF file as ``tokenizer.model`` (not a
    SentencePiece model): ``legacy_format=False`` writes the fast tokenizer only."""
    tokenizer.save_pretrained(scratch, legacy_format=False, save_jinja_files=False)
    os.replace(scratch / FAST_TOKENIZER_NAME, tokenizer_json)
    os.replace(scratch / TOKENIZER_CONFIG_NAME, tokenizer_config)
