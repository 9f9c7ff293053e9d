"""The knowlm model directory: ``config.json`` + MindSpore checkpoint + ``tokenizer.model``.

Layout (the names MindFormers' own ``from_pretrained`` uses)::

    config.json                         KnowLMConfig.to_dict()
    mindspore_model.ckpt                weights, or shards listed in mindspore_model.ckpt.index.json
    tokenizer.model                     SentencePiece model

(The names are ``knowlm.files``'.) Weights are checked before they are loaded: each file whole (its CRC-32 against
MindSpore's trailer when it has one, its records' structure always: ``stream.verify``), so a damaged or truncated
file is named; then every parameter present once, shapes equal to the config's, so a checkpoint for another
vocabulary or size fails with one line instead of a silently wrong model. Only then are they loaded, one tensor at a
time from the file into its parameter (``load_weights``): memory peaks at the model plus one tensor.
"""
import logging
from dataclasses import dataclass
from pathlib import Path

import mindspore as ms
import numpy as np

from knowlm.checkpoints import stream
from knowlm.checkpoints.names import check_packed, is_kv_cache_parameter
from knowlm.checkpoints.quant import INT8, PACKED, dequantize_q8_0
from knowlm.errors import KnowLMError, first_line
from knowlm.files import (CONFIG_NAME, TOKENIZER_NAME, WEIGHTS_GLOB, WEIGHTS_INDEX_NAME, WEIGHTS_NAME, atomic_copy,
                          index_shards, read_json, staged_output, write_json)
from knowlm.models.config import KnowLMConfig
from knowlm.tokenizer.load import tokenizer_files

log = logging.getLogger("knowlm")


def load_config(model_dir, **overrides) -> KnowLMConfig:
    path = Path(model_dir) / CONFIG_NAME
    if not path.is_file():
        raise KnowLMError(f"{path}: not found; expected a knowlm model directory "
                          f"({CONFIG_NAME}, {WEIGHTS_NAME}, {TOKENIZER_NAME})")
    values = read_json(path)
    if not isinstance(values, dict):
        raise KnowLMError(f"{path}: expected a JSON object of model settings")
    return KnowLMConfig(**{**values, **overrides})


def checkpoint_files(path) -> list:
    """The checkpoint file(s) behind ``path``: a ``.ckpt`` file, or a model directory (single or sharded)."""
    path = Path(path)
    if path.is_file():
        return [path]
    if path.is_dir():
        index = path / WEIGHTS_INDEX_NAME
        if index.is_file():
            return index_shards(index)
        if (path / WEIGHTS_NAME).is_file():
            return [path / WEIGHTS_NAME]
        raise KnowLMError(f"{path}: no {WEIGHTS_NAME} or {WEIGHTS_INDEX_NAME} in this directory")
    raise KnowLMError(f"{path}: checkpoint not found; expected a .ckpt file or a knowlm model directory")


def _read_checkpoint(path: Path) -> dict:
    try:
        return ms.load_checkpoint(str(path))
    except (ValueError, RuntimeError, OSError, TypeError) as err:
        raise KnowLMError(f"{path}: not a readable MindSpore checkpoint ({first_line(err)})") from None


# Optimizer and loop state that MindSpore training checkpoints carry beside the weights.
_TRAINING_STATE = ("adam_", "global_step", "scale_sense", "current_iterator_step", "epoch_num", "step_num",
                   "loss_scale", "learning_rate", "last_overflow_iterator_step")
# The numpy type of a checkpoint dtype's stored bits (``stream.scan``'s dtype names): bfloat16, which numpy lacks,
# is read as its uint16 bits and given its type by MindSpore (``Tensor.view``), never through a float32 copy.
_STORED = {"float32": "float32", "float16": "float16", "bfloat16": "uint16", PACKED: "uint8", "Float64": "float64",
           "Int8": "int8", "Int16": "int16", "UInt16": "uint16", "Int32": "int32", "UInt32": "uint32",
           "Int64": "int64", "UInt64": "uint64", "Bool": "bool"}
_BY_MS_TYPE = {ckpt: name for name, ckpt in stream.CKPT_TYPES.items()}     # "Float32" -> "float32", ...


def load_weights(network, path, keep_storage=False):
    """Load checkpoint ``path`` into ``network`` after checking each file (``stream.verify``), then names and shapes
    against the network.

    One tensor at a time: every check is done on the files' headers before anything is loaded, then each tensor is
    read from its file into the buffer that becomes its parameter's (``Parameter.set_data`` swaps the parameter's
    buffer for it), so memory peaks at the model plus one tensor, not twice the model as with
    ``mindspore.load_checkpoint``, which is used only for a file holding records ``stream`` does not parse.

    A tensor whose dtype differs from its parameter's is cast to it (bf16 -> fp32); a Q8_0 one (uint8 of the packed
    shape, ``knowlm.checkpoints.quant``) is dequantized to it, so a MindFormers graph gets float weights (a parameter
    built as int8 by ``param_init_type: int8`` is replaced by a float32 one). ``keep_storage``: a 2-D weight stored
    as bfloat16 or Q8_0 whose parameter is float32 keeps the checkpoint's dtype and shape instead: its Parameter is
    replaced (same name, ``requires_grad=False``) in every cell that holds it (``replace_parameter``), values
    unchanged."""
    expected = {p.name: p for p in network.get_parameters() if not is_kv_cache_parameter(p.name)}
    files = checkpoint_files(path)
    headers = [_headers(file) for file in files]    # every file before any is loaded: a damaged last shard fails
    entries = [entry for file, found in zip(files, headers) for entry in _entries(file, found)]
    for entry, name in _check(network, path, files, entries, expected):
        # Popped: a parameter replaced by one of the checkpoint's dtype (keep_storage) is freed as soon as it is.
        _load(network, path, entry, expected.pop(name), keep_storage)


def _headers(file):
    """``stream.verify(file)``: its entries, or None for a file with records ``stream`` does not parse."""
    try:
        return stream.verify(file)
    except stream.UnsupportedRecord as err:
        log.warning("%s; reading it whole with mindspore.load_checkpoint", err)
        return None


@dataclass
class _Loaded:
    """A tensor ``mindspore.load_checkpoint`` read (the fallback), with a ``stream.Entry``'s name, shape, dtype."""
    name: str
    path: Path
    value: object

    @property
    def shape(self):
        return tuple(self.value.shape) if isinstance(self.value, ms.Tensor) else ()

    @property
    def dtype(self):
        kind = str(self.value.dtype) if isinstance(self.value, ms.Tensor) else type(self.value).__name__
        return _BY_MS_TYPE.get(kind, kind)


def _entries(file, headers):
    if headers is not None:
        return headers
    return [_Loaded(name, file, value) for name, value in _read_checkpoint(file).items()]


def _check(network, path, files, entries, expected) -> list:
    """(entry, name) for every weight of ``entries``, all checked against ``expected`` (name -> parameter): none
    unexpected, none missing or twice, shapes and dtypes those of the parameters."""
    found = {}
    for entry in entries:
        if entry.name in expected:
            if entry.name in found:
                raise KnowLMError(f"{entry.path}: tensor {entry.name!r} is also in {found[entry.name].path}")
            found[entry.name] = entry
        elif not is_kv_cache_parameter(entry.name) and not entry.name.startswith(_TRAINING_STATE):
            raise KnowLMError(f"{path}: unexpected tensor {entry.name!r}; this checkpoint is not for "
                              f"{type(network).__name__} (first expected name: {next(iter(expected))!r})")
    missing = sorted(set(expected) - set(found))
    if missing:
        raise KnowLMError(f"{_holder(path, files, missing[0])}: {len(missing)} parameter(s) missing, e.g. "
                          f"{', '.join(missing[:3])}")
    vocab = network.config.vocab_size
    for name, entry in found.items():
        want, shape = tuple(expected[name].shape), tuple(entry.shape)
        if entry.dtype not in _STORED:
            raise KnowLMError(f"{entry.path}: tensor {name!r} is {entry.dtype}, not a numeric tensor")
        if shape[:1] != want[:1] and ("embedding" in name or name.startswith("lm_head")):
            raise KnowLMError(f"{path}: vocabulary of {shape[0] if shape else 0} tokens in {name!r}, but the config "
                              f"has vocab_size {vocab}; use the tokenizer and config the weights came with")
        if entry.dtype == PACKED:
            check_packed(path, name, shape, want)
        elif shape != want:
            raise KnowLMError(f"{path}: {name!r} has shape {shape}, expected {want} "
                              "from the config; the checkpoint is for another model size")
    return [(entry, name) for name, entry in found.items()]


def _stored(entry):
    """The stored bits of ``entry`` as a numpy array of its shape (bfloat16 as uint16), read when called."""
    if isinstance(entry, _Loaded):
        value = entry.value.view(ms.uint16) if entry.dtype == "bfloat16" else entry.value
        return value.asnumpy()
    flat = entry.readinto(np.empty(entry.nbytes, np.uint8))
    return flat.view(_STORED[entry.dtype]).reshape(entry.shape)


def _tensor(array, dtype=None):
    """``array`` (stored bits, ``_stored``) as a MindSpore tensor of checkpoint ``dtype``, sharing its memory."""
    tensor = ms.from_numpy(array if array.flags.c_contiguous else array.copy())
    return tensor.view(ms.bfloat16) if dtype == "bfloat16" else tensor


def _load(network, path, entry, param, keep_storage):
    """Read ``entry`` and put it into ``param`` (a checked pair, ``_check``): cast, dequantized or kept."""
    stored, name, want = _stored(entry), param.name, tuple(param.shape)
    if keep_storage and len(want) == 2 and param.dtype == ms.float32 and entry.dtype in ("bfloat16", PACKED):
        # The checkpoint's own bits become the network's parameter.
        replace_parameter(network, param, ms.Parameter(_tensor(stored, entry.dtype), name=name, requires_grad=False))
        _free(param)
    elif entry.dtype == PACKED:
        float_type = param.dtype if param.dtype in (ms.float32, ms.float16, ms.bfloat16) else ms.float32
        values = _tensor(dequantize_q8_0(stored, want, where=f"{path}: {name!r}").astype(np.float32, copy=False))
        del stored
        if float_type != ms.float32:
            values = values.astype(float_type)
        if float_type == param.dtype:
            param.set_data(values)
        else:
            replace_parameter(network, param, ms.Parameter(values, name=name, requires_grad=param.requires_grad))
            _free(param)
    elif entry.dtype == "bfloat16" and param.dtype == ms.float32:
        # Widened exactly on the host: a bfloat16 is the high half of its float32.
        wide = stored.astype(np.uint32)
        del stored
        wide <<= 16
        param.set_data(_tensor(wide.view(np.float32)))
    else:
        param.set_data(_tensor(stored, entry.dtype))      # set_data casts to the parameter's dtype where they differ


def _free(param):
    """Let replaced Parameter ``param`` be freed when its last reference goes, not at the next garbage collection: a
    Parameter and its ParamInfo refer to each other (``param_info.obj``), a cycle only the collector breaks, so the
    float32 parameters ``keep_storage`` replaces would all stay alive until loading ends."""
    info = getattr(param, "param_info", None)
    if info is not None and getattr(info, "obj", None) is param:
        info.obj = None


def replace_parameter(network, old, new):
    """Every cell of ``network`` holding Parameter ``old`` holds ``new`` instead (``setattr`` on the cell: its owner,
    e.g. ``network.model.layers[3].attention.wq`` for ``model.layers.3.attention.wq.weight``, and any cell sharing
    it, such as a tied ``lm_head``), so ``network.get_parameters()`` and the cells' attributes see ``new``."""
    found = False
    for _, cell in network.cells_and_names():
        for attr, param in list(cell._params.items()):  # pylint: disable=protected-access  (no public map)
            if param is old:
                setattr(cell, attr, new)
                found = True
    if not found:
        raise KnowLMError(f"parameter {old.name!r} is held by no cell of {type(network).__name__}")


def _holder(path, files, name):
    """The file that should hold tensor ``name``: the only one, or the shard the index of model directory ``path``
    lists for it (``path`` itself when it lists none)."""
    if len(files) == 1:
        return files[0]
    try:
        shard = read_json(Path(path) / WEIGHTS_INDEX_NAME)["weight_map"][name]
    except (KnowLMError, KeyError, TypeError):
        return path
    return Path(path) / shard


def save_pretrained(network, output_dir, tokenizer_dir, force=False, config=None):
    """Write ``network`` (config + weights) and the tokenizer files of ``tokenizer_dir`` (a model directory, or a
    tokenizer file in one) as a knowlm model directory.

    ``config``: the config to write instead of the network's (a trained network carries its training run's
    ``seq_length`` and ``batch_size``, which would cap generation). Every file is written under a temporary name
    and renamed when complete; an existing directory with a config in it is refused unless ``force``.
    """
    params = [{"name": p.name, "data": p} for p in network.get_parameters() if not is_kv_cache_parameter(p.name)]
    values = (config or network.config).to_dict()
    values["checkpoint_name_or_path"] = ""
    # param_init_type records the weights' storage: int8 only when Q8_0 weights are written (a network loaded with
    # keep_storage), else the float type they were loaded as.
    if any(p["data"].dtype == ms.uint8 for p in params):
        values.update(param_init_type=INT8, embedding_init_type=INT8, compute_dtype="float32")
    elif values.get("param_init_type") == INT8:
        stored = str(params[0]["data"].dtype).lower() if params else "float32"
        values.update(param_init_type=stored, embedding_init_type=stored, compute_dtype=stored)
    # The config is written last: a directory with config.json is a complete one.
    tokenizer_dir = Path(tokenizer_dir)
    tokenizer = tokenizer_files(tokenizer_dir if tokenizer_dir.is_dir() else tokenizer_dir.parent)
    with staged_output(output_dir, [WEIGHTS_NAME, *(p.name for p in tokenizer), CONFIG_NAME], force,
                       stale=WEIGHTS_GLOB) as tmps:
        ms.save_checkpoint(params, str(tmps[0]), crc_check=True)
        for source, tmp in zip(tokenizer, tmps[1:]):
            atomic_copy(source, tmp)
        write_json(tmps[-1], values)
    return Path(output_dir)
