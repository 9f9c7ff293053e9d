"""A training run's yaml: the packaged or user's MindFormers config with the command line's paths and overrides."""

from mindformers.tools.register import MindFormerConfig

from knowlm.errors import KnowLMError
from knowlm.files import read_yaml
from knowlm.models.config import KnowLMConfig


def load_training_config(path, **overrides) -> MindFormerConfig:
    """The yaml ``path`` with ``overrides`` (dotted key -> value; None: left as it is) applied.

    An override names a key the yaml has (or, under ``model.model_config``, a model setting): a typo is refused,
    not added as a new key nobody reads.
    """
    read_yaml(path, "a finetune yaml such as knowlm/configs/tiny/finetune_lora.yaml")
    config = MindFormerConfig(str(path))
    model_keys = set(KnowLMConfig().to_dict())
    for dotted, value in overrides.items():
        if value is None:
            continue
        node = config
        *parents, last = dotted.split(".")
        for key in parents:
            if not isinstance(node, dict) or key not in node:
                raise KnowLMError(f"--set {dotted}: {path} has no section {key!r}")
            node = node[key]
        if not isinstance(node, dict) or (last not in node and not (parents == ["model", "model_config"]
                                                                    and last in model_keys)):
            raise KnowLMError(f"--set {dotted}: {path} has no key {last!r} in "
                              f"{'.'.join(parents) or 'its top level'}")
        node[last] = value
    _normalize_pet_config(config, path)
    return config


def _normalize_pet_config(config, path):
    """LoRA numbers as MindFormers' ``LoraConfig`` types them (it rejects ``lora_dropout: 0``, an int)."""
    pet = ((config.get("model") or {}).get("model_config") or {}).get("pet_config")
    if not pet:
        return
    for key, kind, valid, expected in (("lora_rank", int, lambda v: v >= 1, "an integer >= 1"),
                                       ("lora_alpha", float, lambda v: v > 0, "a number > 0"),
                                       ("lora_dropout", float, lambda v: 0 <= v < 1, "a number in [0, 1)")):
        if key not in pet:
            continue
        value = pet[key]
        try:
            number = kind(value)
        except (TypeError, ValueError):
            number = None
        if isinstance(value, bool) or number is None or number != value or not valid(number):
            raise KnowLMError(f"{path}: model.model_config.pet_config.{key} {value!r}: expected {expected}")
        pet[key] = int(number) if key == "lora_alpha" and number.is_integer() else number


def training_config(config_path, data=None, base=None, output_dir=None, overrides=None) -> MindFormerConfig:
    """The yaml ``config_path`` with the command line's data, base model, output folder and overrides applied."""
    paths = {"train_dataset.data_loader.dataset_dir": data, "model.model_config.checkpoint_name_or_path": base,
             "output_dir": output_dir}
    # MindFormers type-checks paths as str; explicit overrides win over the path options.
    return load_training_config(config_path, **{**{k: None if v is None else str(v) for k, v in paths.items()},
                                                **(overrides or {})})
