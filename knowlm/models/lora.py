"""LoRA at run time: MindFormers' LoRA cells on a loaded model, and an adapter directory attached to its base."""
from pathlib import Path

import mindspore as ms
from mindformers.pet import LoraConfig, get_pet_model

from knowlm.checkpoints import stream
from knowlm.checkpoints.lora import adapter_files, read_lora_settings
from knowlm.checkpoints.names import LORA_A, LORA_B
from knowlm.errors import KnowLMError
from knowlm.files import ADAPTER_CONFIG
from knowlm.models.llama import KnowLMForCausalLM


def attach_lora(model, rank, alpha, target_modules):
    """MindFormers' ``get_pet_model`` for a model whose weights are loaded: LoRA cells (B = 0) on ``model``."""
    # PetModel reloads config.checkpoint_name_or_path with MindFormers' loader, which cannot read a knowlm
    # model directory; the base weights are already in place.
    model.config.checkpoint_name_or_path = ""
    return get_pet_model(model, LoraConfig(lora_rank=rank, lora_alpha=alpha, lora_dropout=0.0,
                                           target_modules=target_modules))


def load_lora_model(base_dir, adapter_dir, **overrides):
    """Base model directory ``base_dir`` with adapter ``adapter_dir`` attached (MindFormers ``PetModel``)."""
    adapter_dir = Path(adapter_dir)
    rank, alpha, targets = read_lora_settings(adapter_dir / ADAPTER_CONFIG)
    if not targets:
        raise KnowLMError(f"{adapter_dir / ADAPTER_CONFIG}: no target_modules")
    targets = targets if isinstance(targets, str) else "|".join(targets)
    pet = attach_lora(KnowLMForCausalLM.from_pretrained(base_dir, **overrides), rank, alpha, targets)
    params = {p.name: p for p in pet.get_parameters() if p.name.endswith((LORA_A, LORA_B))}
    files = adapter_files(adapter_dir)
    stream.validate(files, {name: tuple(p.shape) for name, p in params.items()}, adapter_dir)
    loaded = {}
    for file in files:
        for name, value in ms.load_checkpoint(str(file)).items():
            loaded[name] = ms.Parameter(value.astype(params[name].dtype), name=name)
    ms.load_param_into_net(pet, loaded, strict_load=True)
    return pet
