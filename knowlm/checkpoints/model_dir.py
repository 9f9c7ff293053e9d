"""The knowlm model directory: ``config.json`` + MindSpore checkpoint + ``tokenizer.model``.

Layout (the names MindFormers' own ``from_pretrained`` uses)::

    config.json                         KnowLMConfig.to_dict()
    mindspore_model.ckpt                weights, or shards listed in mindspore_model.ckpt.index.json
    tokenizer.model                     SentencePiece model

(The names are ``knowlm.files``'.) Weights are checked before they are loaded: each file whole (its CRC-32 against
MindSpore's trailer when it has one, its records' structure always: ``stream.verify``), so a damaged or truncated
file is named; then every parameter present once, shapes equal to the config's, so a checkpoint for another
vocabulary or size fails with one line instead of a silently wrong model.
"""
from pathlib import Path

import mindspore as ms

from knowlm.checkpoints import stream
from knowlm.checkpoints.names import is_kv_cache_parameter
from knowlm.errors import KnowLMError, first_line
from knowlm.files import (CONFIG_NAME, TOKENIZER_NAME, WEIGHTS_GLOB, WEIGHTS_INDEX_NAME, WEIGHTS_NAME, atomic_copy,
                          index_shards, read_json, staged_output, write_json)
from knowlm.models.config import KnowLMConfig
from knowlm.tokenizer.load import tokenizer_files


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


def load_weights(network, path):
    """Load checkpoint ``path`` into ``network`` after checking each file (``stream.verify``), then names and shapes
    against the network."""
    expected = {p.name: p for p in network.get_parameters() if not is_kv_cache_parameter(p.name)}
    loaded = {}
    files = checkpoint_files(path)
    for file in files:              # every file before any is loaded: a damaged last shard fails at once
        stream.verify(file)
    for file in files:
        for name, value in _read_checkpoint(file).items():
            if name in expected:
                loaded[name] = value
            elif not is_kv_cache_parameter(name) and not name.startswith(_TRAINING_STATE):
                raise KnowLMError(f"{path}: unexpected tensor {name!r}; this checkpoint is not for "
                                  f"{type(network).__name__} (first expected name: {next(iter(expected))!r})")
    missing = sorted(set(expected) - set(loaded))
    if missing:
        raise KnowLMError(f"{_holder(path, files, missing[0])}: {len(missing)} parameter(s) missing, e.g. "
                          f"{', '.join(missing[:3])}")
    vocab = network.config.vocab_size
    for name, value in loaded.items():
        want = tuple(expected[name].shape)
        if tuple(value.shape) != want:
            if "embedding" in name or name.startswith("lm_head"):
                raise KnowLMError(f"{path}: vocabulary of {value.shape[0]} tokens in {name!r}, but the config "
                                  f"has vocab_size {vocab}; use the tokenizer and config the weights came with")
            raise KnowLMError(f"{path}: {name!r} has shape {tuple(value.shape)}, expected {want} "
                              "from the config; the checkpoint is for another model size")
        if value.dtype != expected[name].dtype:
            loaded[name] = ms.Parameter(ms.Tensor(value.asnumpy().astype(ms.dtype_to_nptype(expected[name].dtype))),
                                        name=name)
    # The KV cache is state, not weights: passed as itself so MindSpore does not warn that it was not loaded.
    loaded.update({p.name: p for p in network.get_parameters() if is_kv_cache_parameter(p.name)})
    ms.load_param_into_net(network, loaded, strict_load=True)


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
