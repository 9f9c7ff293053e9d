"""Pipeline names: ``pipeline("text_generation", model="knowlm_13b_zhixi")`` and ``knowlm generate --model NAME``.

Each name points at a yaml in ``knowlm/configs/`` (``knowlm.models.registry`` adds them to MindFormers' table).
Those yaml files carry ``pipeline_name`` in their model config, and a model built from one must get real weights: from the yaml's ``checkpoint_name_or_path`` or, without
editing the yaml, from the environment variable named by ``checkpoint_variable(name)``.
"""
import os
from pathlib import Path

from knowlm.errors import KnowLMError
from knowlm.files import CONFIG_DIR


PIPELINE_CONFIGS = {
    "knowlm_13b_base": "knowlm_13b/predict_knowlm_13b_base.yaml",
    "knowlm_13b_zhixi": "knowlm_13b/predict_knowlm_13b_zhixi.yaml",
    "knowlm_13b_ie": "knowlm_13b/predict_knowlm_13b_ie.yaml",
    "knowlm_tiny": "tiny/predict_knowlm_tiny.yaml",
    "smollm2": "smollm2/predict_smollm2.yaml",
}
# Names whose weights knowlm can make itself when none are configured: packaged GGUF files (knowlm.models.packaged).
_PACKAGED = ("smollm2",)


def config_path(name: str) -> Path:
    if name not in PIPELINE_CONFIGS:
        raise KnowLMError(f"unknown pipeline name {name!r}; expected one of {', '.join(PIPELINE_CONFIGS)}")
    return CONFIG_DIR / PIPELINE_CONFIGS[name]


def checkpoint_variable(name: str) -> str:
    return f"{name.upper()}_CHECKPOINT"


def checkpoint_for(name: str, configured: str = None, yaml_path=None) -> str:
    """The weights for pipeline ``name``: the yaml's value, else ``$<NAME>_CHECKPOINT``, else for a packaged model
    its cached conversion; an error if none.
    ``yaml_path``: the yaml in use (a user's copy of the pipeline's), named in the error."""
    path = configured or os.environ.get(checkpoint_variable(name))
    if not path and name in _PACKAGED:
        from knowlm.models.packaged import packaged_model_dir     # converts the package's GGUF file once
        return str(packaged_model_dir(name))
    if not path:
        raise KnowLMError(
            f"pipeline model {name!r} has no checkpoint: convert the weights (knowlm convert) and either "
            f"export {checkpoint_variable(name)}=<model dir or .ckpt> or set "
            f"model.model_config.checkpoint_name_or_path in {yaml_path or config_path(name)}")
    return path


def checkpoint_dir(name: str) -> Path:
    """The directory of pipeline ``name``'s weights (``checkpoint_for``): where its tokenizer is, when its yaml names
    none."""
    weights = Path(checkpoint_for(name))
    return weights if weights.is_dir() else weights.parent


def pipeline_files() -> dict:
    """Pipeline name -> yaml path, as MindFormers' ``MindFormerBook`` table takes them."""
    return {name: str(config_path(name)) for name in PIPELINE_CONFIGS}
