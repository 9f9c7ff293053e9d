"""A training run's yaml: the packaged or user's MindFormers config with the command line's paths and overrides."""
from pathlib import Path

from mindformers.tools.register import MindFormerConfig

from knowlm.errors import KnowLMError


def load_training_config(path, **overrides) -> MindFormerConfig:
    """The yaml ``path`` with ``overrides`` (dotted key -> value; None: left as it is) applied."""
    if not Path(path).is_file():
        raise KnowLMError(f"{path}: config not found; expected a finetune yaml such as "
                          "knowlm/configs/tiny/finetune_lora.yaml")
    config = MindFormerConfig(str(path))
    for dotted, value in overrides.items():
        if value is None:
            continue
        node = config
        *parents, last = dotted.split(".")
        for key in parents:
            if not isinstance(node, dict) or key not in node:
                raise KnowLMError(f"{path}: no section {key!r} for the override {dotted}={value!r}")
            node = node[key]
        node[last] = value
    return config


def training_config(config_path, data=None, base=None, output_dir=None, overrides=None) -> MindFormerConfig:
    """The yaml ``config_path`` with the command line's data, base model, output folder and overrides applied."""
    paths = {"train_dataset.data_loader.dataset_dir": data, "model.model_config.checkpoint_name_or_path": base,
             "output_dir": output_dir}
    # MindFormers type-checks paths as str; explicit overrides win over the path options.
    return load_training_config(config_path, **{**{k: None if v is None else str(v) for k, v in paths.items()},
                                                **(overrides or {})})
