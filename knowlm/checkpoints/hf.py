"""The Hugging Face side of a LLaMA checkpoint: ``config.json`` keys and weight files, read and written.

``.bin`` files are read with ``torch.load(weights_only=True, mmap=True)`` (a pickle that would run code is refused,
nothing of it runs) and ``.safetensors`` with ``safe_open``; both map the file instead of reading it, so the memory a
shard costs is the pages touched. ``HF_CONFIG_TO_KNOWLM`` is the single source of truth for config keys; names and
shapes of tensors come from ``knowlm.checkpoints.names``.
"""
import json
import re
import struct
from dataclasses import dataclass
from math import prod
from pathlib import Path

import numpy as np
from safetensors import SafetensorError, safe_open

from knowlm.checkpoints import stream
from knowlm.checkpoints.names import check_tensors, hf_to_mindspore_name, mindspore_to_hf_name
from knowlm.checkpoints.quant import INT8, PACKED, dequantize_q8_0, logical_shape, quantize_q8_0, stored_dtype
from knowlm.checkpoints.stream import DTYPES
from knowlm.errors import KnowLMError, first_line
from knowlm.files import index_shards
from knowlm.models.config import KnowLMConfig


# Hugging Face config.json key -> KnowLMConfig key. Keys absent from config.json keep KnowLMConfig's defaults,
# which equal transformers' LlamaConfig defaults for all but the sizes, and those are required.
HF_CONFIG_TO_KNOWLM = {
    "hidden_size": "hidden_size",
    "num_hidden_layers": "num_layers",
    "num_attention_heads": "num_heads",
    "num_key_value_heads": "n_kv_heads",
    "intermediate_size": "intermediate_size",
    "vocab_size": "vocab_size",
    "rms_norm_eps": "rms_norm_eps",
    "rope_theta": "theta",
    "max_position_embeddings": "max_position_embedding",
    "tie_word_embeddings": "tie_word_embeddings",
    "bos_token_id": "bos_token_id",
    "eos_token_id": "eos_token_id",
    "pad_token_id": "pad_token_id",
}
_REQUIRED_HF_KEYS = ("hidden_size", "num_hidden_layers", "num_attention_heads", "intermediate_size", "vocab_size")
# Settings knowlm's LLaMA does not implement: key -> the only value accepted (an absent key is accepted).
_HF_SETTINGS = {"model_type": "llama", "hidden_act": "silu", "rope_scaling": None, "attention_bias": False,
                "mlp_bias": False}

HF_SAFETENSORS, HF_SAFETENSORS_INDEX = "model.safetensors", "model.safetensors.index.json"
HF_BIN, HF_BIN_INDEX = "pytorch_model.bin", "pytorch_model.bin.index.json"
_HF_WEIGHTS = {"safetensors": (HF_SAFETENSORS_INDEX, HF_SAFETENSORS), "bin": (HF_BIN_INDEX, HF_BIN)}
# safetensors dtype codes in torch's names (the unsupported ones only for messages).
_SAFETENSORS_DTYPES = {**{dtype.safetensors: name for name, dtype in DTYPES.items()}, "F64": "float64",
                       "I64": "int64", "I32": "int32", "I16": "int16", "I8": "int8", "U8": "uint8", "BOOL": "bool"}


def knowlm_config_from_hf(hf: dict, dtype="float32", source="config.json", **overrides) -> KnowLMConfig:
    """The ``KnowLMConfig`` of a Hugging Face LLaMA ``config.json`` (a dict); unsupported settings refused.

    ``dtype``, the weights' storage, is recorded as ``param_init_type``, and as ``compute_dtype`` too except for
    ``int8`` (Q8_0), whose weights compute as the float32 they dequantize to."""
    for key, accepted in _HF_SETTINGS.items():
        if key in hf and hf[key] != accepted:
            raise KnowLMError(f"{source}: {key}={hf[key]!r} is not supported; knowlm runs LLaMA with "
                              f"{key}={accepted!r}")
    missing = [key for key in _REQUIRED_HF_KEYS if hf.get(key) is None]
    if missing:
        raise KnowLMError(f"{source}: missing {', '.join(missing)}; expected a Hugging Face LLaMA config.json")
    head_dim = hf["hidden_size"] // hf["num_attention_heads"]
    if hf.get("head_dim") not in (None, head_dim):
        raise KnowLMError(f"{source}: head_dim={hf['head_dim']} is not supported; knowlm uses hidden_size / "
                          f"num_attention_heads = {head_dim}")
    values = {dst: hf[src] for src, dst in HF_CONFIG_TO_KNOWLM.items() if hf.get(src) is not None}
    if isinstance(values.get("eos_token_id"), list):
        values["eos_token_id"] = values["eos_token_id"][0]
    if values.get("pad_token_id", 0) < 0:
        del values["pad_token_id"]          # some LLaMA configs say -1: knowlm pads with <unk> (id 0)
    values["seq_length"] = values.get("max_position_embedding", 2048)
    return KnowLMConfig(**{**values, "param_init_type": dtype, "compute_dtype": "float32" if dtype == INT8 else dtype,
                           **overrides})


def hf_config_from_knowlm(config, dtype: str) -> dict:
    """The Hugging Face ``config.json`` of a knowlm model (``transformers.LlamaForCausalLM``)."""
    values = {src: getattr(config, dst) for src, dst in HF_CONFIG_TO_KNOWLM.items()}
    values["num_key_value_heads"] = config.n_kv_heads or config.num_heads
    return {"architectures": ["LlamaForCausalLM"], **_HF_SETTINGS, **values, "torch_dtype": dtype}


def hf_weight_files(hf_dir: Path, prefer: str = "safetensors") -> list:
    """The weight files of a Hugging Face directory: the index's shards or the single file, ``prefer``'s first."""
    order = [prefer] + [kind for kind in _HF_WEIGHTS if kind != prefer]
    for kind in order:
        index, single = (hf_dir / name for name in _HF_WEIGHTS[kind])
        if index.is_file():
            return index_shards(index)
        if single.is_file():
            return [single]
    names = ", ".join(name for kind in order for name in _HF_WEIGHTS[kind])
    raise KnowLMError(f"{hf_dir}: no Hugging Face weights; expected one of {names}")


@dataclass
class HFTensor:
    """A tensor of a Hugging Face file under its MindFormers ``name``: what the checks and the writer need."""
    name: str
    shape: tuple
    dtype: str
    path: str
    hf_name: str
    nbytes: int


class HFShard:
    """One Hugging Face weight file: every tensor's shape and dtype at once, its data only when asked.

    Both readers map the file instead of reading it, so the memory a shard costs is the pages touched.
    """

    def __init__(self, path: Path):
        self.path = path
        if path.suffix == ".safetensors":
            self._file = _open_safetensors(path)
            headers = {name: self._file.get_slice(name) for name in self._file.keys()}
            self.headers = {name: (tuple(s.get_shape()), _SAFETENSORS_DTYPES.get(s.get_dtype(), s.get_dtype()))
                            for name, s in headers.items()}
        else:
            self._file = _torch_load(path)
            for name, value in self._file.items():
                if not hasattr(value, "dtype"):
                    raise KnowLMError(f"{path}: {name!r} is a {type(value).__name__}, not a tensor; expected a "
                                      "Hugging Face state dict")
            self.headers = {name: (tuple(t.shape), str(t.dtype).removeprefix("torch."))
                            for name, t in self._file.items()}
        for name, (_, dtype) in self.headers.items():
            if dtype not in DTYPES:
                raise KnowLMError(f"{path}: tensor {name!r} has dtype {dtype}; supported: "
                                  f"{', '.join(DTYPES)} (quantized checkpoints cannot be converted)")

    def tensor(self, name):
        return self._file.get_tensor(name) if self.path.suffix == ".safetensors" else self._file[name]

    def nbytes(self, name):
        shape, dtype = self.headers[name]
        return prod(shape) * DTYPES[dtype].itemsize


def _torch_load(path):
    torch = import_torch()
    try:
        try:
            state = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
        except RuntimeError as err:
            if "mmap can only be used" not in str(err):
                raise
            # torch < 1.6's format cannot be mapped: such a file is read into memory whole.
            state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # pylint: disable=broad-except  (torch raises many types for bad files)
        if "Weights only load failed" in str(err):
            detail = re.search(r"WeightsUnpickler error: (.*?)(?: was not an allowed|\. |$)", str(err), re.M)
            raise KnowLMError(f"{path}: refused: the pickle asks to run code ("
                              f"{detail.group(1) if detail else 'not plain tensors'}); nothing of it was run. "
                              "Only checkpoints of plain tensors are converted") from None
        raise KnowLMError(f"{path}: not a readable PyTorch checkpoint, truncated or corrupt "
                          f"({first_line(err)})") from None
    if not isinstance(state, dict):
        raise KnowLMError(f"{path}: holds a {type(state).__name__}, expected a state dict of tensors")
    return state


def _open_safetensors(path):
    import_torch()
    try:
        return safe_open(str(path), framework="pt")
    except (SafetensorError, OSError) as err:
        raise KnowLMError(f"{path}: not a readable safetensors file, truncated or corrupt "
                          f"({first_line(err)})") from None


def import_torch():
    try:
        import torch  # pylint: disable=import-outside-toplevel  (optional: the torch extra)
    except ImportError:
        raise KnowLMError("reading Hugging Face weights and building the quickstart model need torch: "
                          "pip install 'knowlm[torch]'") from None
    return torch


def checked_cast(tensor, dtype: str, where: str, check_finite=False, hint=None):
    """``tensor`` cast to ``dtype``, refused with one line starting ``where`` when the cast overflows (values finite
    before, inf after: checked whenever ``dtype`` has the smaller range) or, with ``check_finite``, when the result
    holds inf or nan. ``hint``: what to do about an overflow (by default: keep the source's dtype). One pass of
    ``aminmax`` per check; the values are counted only when it finds something."""
    torch = import_torch()
    cast = tensor.to(getattr(torch, dtype))
    if tensor.numel() == 0:
        return cast
    limit = DTYPES[dtype].max
    if limit < torch.finfo(tensor.dtype).max:
        low, high = (float(v) for v in torch.aminmax(tensor))
        if not -limit <= low <= high <= limit:          # out of range, or a nan (every comparison with nan is false)
            overflow = int((torch.isinf(cast) & torch.isfinite(tensor)).sum())
            if overflow:
                source = str(tensor.dtype).removeprefix("torch.")
                if hint is None:
                    keep = [DTYPES[source].short] if source in DTYPES else []
                    if dtype == "float16" and source != "bfloat16":
                        keep.append("bf16")
                    hint = "keep " + " or use ".join(keep)
                values = "1 value overflows" if overflow == 1 else f"{overflow} values overflow"
                raise KnowLMError(f"{where}: {values} {DTYPES[dtype].short} (max {limit:g}); {hint}")
    if check_finite:
        low, high = (float(v) for v in torch.aminmax(cast))
        if not -float("inf") < low <= high < float("inf"):
            bad = int((~torch.isfinite(cast)).sum())
            raise KnowLMError(f"{where}: holds {bad} inf or nan value{'s' if bad != 1 else ''}")
    return cast


def write_mindspore(tmp, entries, dtype, bar, check_finite=False):
    """Write ``entries`` (planned ``HFTensor``s) to MindSpore file ``tmp``, one tensor at a time, with MindSpore's
    CRC trailer. Each cast is checked on the way (``checked_cast``): a narrowing one for overflow, always; every one
    for inf and nan with ``check_finite``. ``dtype`` ``int8``: 2-D weights quantized to Q8_0 from float32 (inf and nan
    refused), 1-D ones float32."""
    torch = import_torch()
    shard = None
    with stream.writer(tmp) as f:
        for entry in entries:
            if shard is None or entry.path != str(shard.path):
                shard = None                        # unmap the previous input file before mapping the next
                shard = HFShard(Path(entry.path))
            where, target = f"{entry.path}: tensor {entry.hf_name!r}", stored_dtype(entry.shape, dtype)
            cast = checked_cast(shard.tensor(entry.hf_name), "float32" if target == PACKED else target, where,
                                check_finite)
            if target == PACKED:
                packed = quantize_q8_0(cast.numpy(), where)
                stream.write_tensor(f, entry.name, packed.shape, PACKED, packed)
            else:
                stream.write_tensor(f, entry.name, entry.shape, target,
                                    cast.contiguous().reshape(-1).view(torch.uint8).numpy())
            bar.update(entry.nbytes)


def write_safetensors(tmp, entries, bar):
    """safetensors: 8-byte header length, JSON header (names, dtypes, shapes, offsets), then the raw data.

    Float tensors are copied unchanged; a Q8_0 one (uint8) is written dequantized, float32 of its logical shape."""
    header, offset = {}, 0
    for entry in entries:
        dtype, shape = ("float32", logical_shape(entry.shape, PACKED)) if entry.dtype == PACKED else \
            (entry.dtype, entry.shape)
        nbytes = prod(shape) * DTYPES[dtype].itemsize
        header[mindspore_to_hf_name(entry.name)] = {"dtype": DTYPES[dtype].safetensors, "shape": list(shape),
                                                    "data_offsets": [offset, offset + nbytes]}
        offset += nbytes
    header["__metadata__"] = {"format": "pt"}       # transformers refuses files without it
    blob = json.dumps(header, separators=(",", ":")).encode()
    blob += b" " * (-len(blob) % 8)                 # data starts 8-byte aligned
    with open(tmp, "wb") as f:
        f.write(struct.pack("<Q", len(blob)) + blob)
        for entry in entries:
            if entry.dtype == PACKED:
                packed = np.frombuffer(entry.read(), np.uint8).reshape(entry.shape)
                f.write(dequantize_q8_0(packed, where=f"{entry.path}: tensor {entry.name!r}").astype("<f4").data)
            else:
                entry.copy_to(f)
            bar.update(entry.nbytes)


def validate_safetensors(files, expected, source, dtype):
    entries = [HFTensor(hf_to_mindspore_name(name), shape, dtype_, str(path), name, 0)
               for path in files for name, (shape, dtype_) in HFShard(path).headers.items()]
    check_tensors(entries, expected, source, dtype, show=mindspore_to_hf_name)

