"""The knowlm model directory: ``config.json`` + MindSpore checkpoint + ``tokenizer.model``.

Layout (the names MindFormers' own ``from_pretrained`` uses)::

    config.json                         KnowLMConfig.to_dict()
    mindspore_model.ckpt                weights, or shards listed in mindspore_model.ckpt.index.json
    tokenizer.model                     SentencePiece model

Weights are checked before they are loaded: every parameter present once, shapes equal to the config's, so a
checkpoint for another vocabulary or size fails with one line instead of a silently wrong model.

``load_model`` accepts everything a user can name a model by: such a directory, a MindFormers yaml file, a
registered pipeline name, or the ``tiny`` preset (random weights, for trying the tooling without a download).
"""
import json
import os
import shutil
from pathlib import Path

import mindspore as ms
from mindformers.models.build_model import build_network
from mindformers.models.build_tokenizer import build_tokenizer
from mindformers.tools.register import MindFormerConfig

from knowlm.config import PRESETS, KnowLMConfig
from knowlm.errors import KnowLMError
from knowlm.model import KnowLMForCausalLM, is_kv_cache_parameter
from knowlm.registry import PIPELINE_CONFIGS, config_path
from knowlm.tokenizer import BUILTIN_TOKENIZER, KnowLMTokenizer

CONFIG_NAME = "config.json"
WEIGHTS_NAME = "mindspore_model.ckpt"
WEIGHTS_INDEX_NAME = "mindspore_model.ckpt.index.json"
TOKENIZER_NAME = "tokenizer.model"


def load_config(model_dir, **overrides) -> KnowLMConfig:
    path = Path(model_dir) / CONFIG_NAME
    if not path.is_file():
        raise KnowLMError(f"{path}: not found; expected a knowlm model directory "
                          f"({CONFIG_NAME}, {WEIGHTS_NAME}, {TOKENIZER_NAME})")
    try:
        values = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as err:
        raise KnowLMError(f"{path}: invalid JSON ({err})") from None
    return KnowLMConfig(**{**values, **overrides})


def index_shards(index: Path) -> list:
    """The shard files named by a ``{"weight_map": {tensor: file}}`` index (knowlm's and Hugging Face's)."""
    try:
        shards = sorted(set(json.loads(index.read_text(encoding="utf-8"))["weight_map"].values()))
    except (json.JSONDecodeError, KeyError, AttributeError, TypeError) as err:
        raise KnowLMError(f"{index}: expected JSON with a 'weight_map' of name -> shard file ({err})") from None
    missing = [name for name in shards if not (index.parent / name).is_file()]
    if missing:
        raise KnowLMError(f"{index}: lists shard(s) not in the directory: {', '.join(missing)}")
    return [index.parent / name for name in shards]


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
        raise KnowLMError(f"{path}: not a readable MindSpore checkpoint "
                          f"({str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__})") \
            from None


# Optimizer and loop state that MindSpore training checkpoints carry beside the weights.
_TRAINING_STATE = ("adam_", "global_step", "scale_sense", "current_iterator_step", "epoch_num", "step_num",
                   "loss_scale", "learning_rate", "last_overflow_iterator_step")


def load_weights(network, path):
    """Load checkpoint ``path`` into ``network`` after checking names and shapes against it."""
    expected = {p.name: p for p in network.get_parameters() if not is_kv_cache_parameter(p.name)}
    loaded = {}
    for file in checkpoint_files(path):
        for name, value in _read_checkpoint(file).items():
            if name in expected:
                loaded[name] = value
            elif not is_kv_cache_parameter(name) and not name.startswith(_TRAINING_STATE):
                raise KnowLMError(f"{path}: unexpected tensor {name!r}; this checkpoint is not for "
                                  f"{type(network).__name__} (first expected name: {next(iter(expected))!r})")
    missing = sorted(set(expected) - set(loaded))
    if missing:
        raise KnowLMError(f"{path}: {len(missing)} parameter(s) missing, e.g. {', '.join(missing[:3])}")
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


def atomic_write(path: Path, write):
    # The suffix stays last because mindspore.save_checkpoint appends ".ckpt" to any other name.
    tmp = path.with_suffix(".partial" + path.suffix)
    try:
        write(tmp)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)     # an interrupted write leaves nothing behind


def atomic_copy(source: Path, target: Path):
    atomic_write(target, lambda tmp: shutil.copyfile(source, tmp))


def write_json(path: Path, values: dict):
    atomic_write(path, lambda tmp: tmp.write_text(
        json.dumps(values, indent=2, ensure_ascii=False, default=str) + "\n", encoding="utf-8"))


def prepare_output_dir(output_dir, force: bool, marker: str = CONFIG_NAME) -> Path:
    """Create ``output_dir``; one holding a model (its ``marker`` file) is refused unless ``force``.

    With ``force`` the old marker goes first, so an interrupted overwrite never looks complete.
    """
    output_dir = Path(output_dir)
    if (output_dir / marker).exists():
        if not force:
            raise KnowLMError(f"{output_dir}: already holds a model; pass force=True (--force) to overwrite it")
        (output_dir / marker).unlink()
    output_dir.mkdir(parents=True, exist_ok=True)
    return output_dir


def save_pretrained(network, output_dir, tokenizer_file, force=False, config=None):
    """Write ``network`` (config + weights) and ``tokenizer_file`` as a knowlm model directory.

    ``config``: the config to write instead of the network's (a trained network carries its training run's
    ``seq_length`` and ``batch_size``, which would cap generation). Every file is written under a temporary name
    and renamed when complete; an existing directory with a config in it is refused unless ``force``.
    """
    output_dir = prepare_output_dir(output_dir, force)
    params = [{"name": p.name, "data": p} for p in network.get_parameters() if not is_kv_cache_parameter(p.name)]
    atomic_write(output_dir / WEIGHTS_NAME, lambda tmp: ms.save_checkpoint(params, str(tmp)))
    atomic_copy(tokenizer_file, output_dir / TOKENIZER_NAME)
    values = (config or network.config).to_dict()
    values["checkpoint_name_or_path"] = ""
    # The config is written last: a directory with config.json is a complete one.
    write_json(output_dir / CONFIG_NAME, values)
    return output_dir




# Presets that may be built with random weights: small enough that doing so by mistake costs nothing.
RANDOM_INIT_PRESETS = ("tiny",)


def load_model(spec, seed=0, **overrides):
    """``(model, tokenizer)`` for a model directory, yaml file, pipeline name or the ``tiny`` preset.

    ``overrides`` (``use_past``, ``batch_size``, ``seq_length``, ...) replace values of the model config.
    """
    path = Path(spec)
    if path.is_dir():
        return KnowLMForCausalLM.from_pretrained(path, **overrides), KnowLMTokenizer(vocab_file=path)
    if spec in PIPELINE_CONFIGS:
        path = config_path(spec)
    if path.suffix in (".yaml", ".yml") and path.is_file():
        config = MindFormerConfig(str(path))
        for key, value in overrides.items():
            config.model.model_config[key] = value
        return build_network(config.model), build_tokenizer(config.processor.tokenizer)
    if spec in RANDOM_INIT_PRESETS:
        ms.set_seed(seed)
        model = KnowLMForCausalLM(KnowLMConfig.from_name(spec, **overrides))
        return model, KnowLMTokenizer(vocab_file=BUILTIN_TOKENIZER)
    if spec in PRESETS:
        raise KnowLMError(f"preset {spec!r} has no weights: convert the Hugging Face checkpoint with "
                          "`knowlm convert` and pass the output directory")
    raise KnowLMError(f"model {spec!r}: not a model directory, yaml file, pipeline name "
                      f"({', '.join(PIPELINE_CONFIGS)}) or preset ({', '.join(RANDOM_INIT_PRESETS)})")
