"""``load_model``: everything a user can name a model by, loaded with its tokenizer.

A knowlm model directory, a real model a package ships (``smollm2``: ``knowlm.models.packaged``), a MindFormers yaml
file, a registered pipeline name (``knowlm.models.registry``), or the ``tiny`` preset (random weights, for trying the
tooling without weights). The tokenizer is the one beside the weights, checked against their config.
"""
from pathlib import Path

import mindspore as ms
from mindformers.models.build_model import build_network
from mindformers.models.build_tokenizer import build_tokenizer
from mindformers.tools.register import MindFormerConfig

from knowlm.checkpoints.model_dir import load_config
from knowlm.errors import KnowLMError
from knowlm.models.config import PRESETS, KnowLMConfig
from knowlm.models.llama import KnowLMForCausalLM
from knowlm.files import read_yaml
from knowlm.models.packaged import PACKAGED_MODELS, packaged_model_dir
from knowlm.models.pipelines import PIPELINE_CONFIGS, checkpoint_for, config_path
from knowlm.tokenizer.load import load_tokenizer
from knowlm.tokenizer.spm import BUILTIN_TOKENIZER, KnowLMTokenizer

# Presets that may be built with random weights: small enough that doing so by mistake costs nothing.
RANDOM_INIT_PRESETS = ("tiny",)


def load_model(spec, seed=0, **overrides):
    """``(model, tokenizer)`` for a model directory, yaml file, pipeline name or the ``tiny`` preset.

    ``overrides`` (``use_past``, ``batch_size``, ``seq_length``, ...) replace values of the model config.
    """
    path = Path(spec)
    if spec in PACKAGED_MODELS and not path.exists():
        path = packaged_model_dir(spec, echo=print)
        overrides.setdefault("seq_length", PACKAGED_MODELS[spec].seq_length)
    if path.is_dir():
        tokenizer = load_tokenizer(path, load_config(path))        # before the weights: a mismatch fails at once
        return KnowLMForCausalLM.from_pretrained(path, **overrides), tokenizer
    if spec in PIPELINE_CONFIGS:
        path = config_path(spec)
    if path.suffix in (".yaml", ".yml") and path.is_file():
        return _from_yaml(path, overrides)
    if spec in RANDOM_INIT_PRESETS:
        ms.set_seed(seed)
        model = KnowLMForCausalLM(KnowLMConfig.from_name(spec, **overrides))
        return model, KnowLMTokenizer(vocab_file=BUILTIN_TOKENIZER)
    if spec in PRESETS:
        raise KnowLMError(f"preset {spec!r} has no weights: convert the Hugging Face checkpoint with "
                          "`knowlm convert` and pass the output directory")
    if path.suffix in (".yaml", ".yml"):
        raise KnowLMError(f"{path}: not found; expected a predict yaml such as {config_path('knowlm_tiny')}")
    raise KnowLMError(f"model {spec!r}: not a model directory, packaged model ({', '.join(PACKAGED_MODELS)}), yaml "
                      f"file, pipeline name ({', '.join(PIPELINE_CONFIGS)}) or preset "
                      f"({', '.join(RANDOM_INIT_PRESETS)})")


def _from_yaml(path, overrides):
    """A predict yaml (a packaged one or the user's copy): weights from its ``checkpoint_name_or_path`` (for a
    pipeline's yaml, else ``$<NAME>_CHECKPOINT``), and the tokenizer, unless the yaml names one, beside them."""
    read_yaml(path, "a MindFormers predict yaml with model and processor sections")
    config = MindFormerConfig(str(path))
    model_config = config.model.model_config
    for key, value in overrides.items():
        model_config[key] = value
    if model_config.get("pipeline_name"):
        model_config.checkpoint_name_or_path = checkpoint_for(model_config.pipeline_name,
                                                              model_config.get("checkpoint_name_or_path"), path)
    tokenizer = config.processor.tokenizer
    weights = model_config.get("checkpoint_name_or_path")
    if not tokenizer.get("vocab_file") and weights:
        tokenizer.vocab_file = str(weights if Path(weights).is_dir() else Path(weights).parent)
    return build_network(config.model), build_tokenizer(tokenizer)
