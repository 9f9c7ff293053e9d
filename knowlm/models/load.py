"""``load_model``: everything a user can name a model by, loaded with its tokenizer.

A knowlm model directory, a MindFormers yaml file, a registered pipeline name (``knowlm.models.registry``), or the
``tiny`` preset (random weights, for trying the tooling without weights).
"""
from pathlib import Path

import mindspore as ms
from mindformers.models.build_model import build_network
from mindformers.models.build_tokenizer import build_tokenizer
from mindformers.tools.register import MindFormerConfig

from knowlm.errors import KnowLMError
from knowlm.models.config import PRESETS, KnowLMConfig
from knowlm.models.llama import KnowLMForCausalLM
from knowlm.models.pipelines import PIPELINE_CONFIGS, config_path
from knowlm.tokenizer.spm import BUILTIN_TOKENIZER, KnowLMTokenizer

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
