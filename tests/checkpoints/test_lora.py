"""LoRA adapters against PEFT and the unmerged model: merge, PEFT import, settings (fp32, CPU).

Tolerances: a merged LoRA equals the unmerged LoRA model to 1e-5; imported PEFT adapters equal PEFT's logits to 1e-4.
"""
import copy
import json
import os

import mindspore as ms
import numpy as np
import peft
import pytest
import torch
import yaml

from knowlm import KnowLMForCausalLM
from knowlm.checkpoints import stream
from knowlm.checkpoints.convert import convert_checkpoint
from knowlm.checkpoints.lora import import_peft_adapter, merge_lora
from knowlm.checkpoints.names import hf_to_mindspore_name
from knowlm.cli import main
from knowlm.files import WEIGHTS_NAME
from knowlm.models.lora import attach_lora, load_lora_model
from reference import IDS, hf_dir, hf_llama, hf_logits, knowlm_logits, one_line_error


# ----------------------------------------------------------------------------------------------- LoRA

def randomize_lora(pet, seed=1):
    rng = np.random.default_rng(seed)
    for param in pet.get_parameters():
        if "mindpet_delta_lora" in param.name:
            param.set_data(ms.Tensor(rng.normal(0, 0.05, param.shape).astype(np.float32)))


def test_merged_lora_checkpoint_reproduces_the_lora_model(tmp_path):
    # transformers' default initialisation: logits of order 0.1, so fp32 rounding stays far below 1e-5.
    model_dir = convert_checkpoint(hf_dir(tmp_path, hf_llama(initializer_range=0.02)), tmp_path / "base").output
    base = KnowLMForCausalLM.from_pretrained(model_dir, use_past=False)
    without_lora = knowlm_logits(base, IDS)
    lora = dict(lora_rank=4, lora_alpha=8, lora_dropout=0.0, target_modules=".*wq|.*wv|.*w1|.*w2")
    pet = attach_lora(base, lora["lora_rank"], lora["lora_alpha"], lora["target_modules"])
    randomize_lora(pet)
    expected = knowlm_logits(pet, IDS)
    assert np.abs(expected - without_lora).max() > 0.1     # the LoRA matters: the comparison below means something
    # A training checkpoint: frozen weights, LoRA weights and optimizer state for the LoRA weights.
    params = [{"name": p.name, "data": p} for p in pet.get_parameters() if not p.name.endswith("_cache")]
    params += [{"name": "adam_m." + p.name, "data": ms.Tensor(np.ones(p.shape, np.float32))}
               for p in pet.get_parameters() if "lora" in p.name]
    ms.save_checkpoint(params, str(tmp_path / "run.ckpt"), append_dict={"step_num": 3, "epoch_num": 1})
    run_yaml = tmp_path / "finetune_lora.yaml"      # scale alpha / rank = 2, read from the run's config
    run_yaml.write_text(yaml.safe_dump({"model": {"model_config": {"pet_config": {"pet_type": "lora", **lora}}}}))

    merged = merge_lora(model_dir, tmp_path / "run.ckpt", tmp_path / "merged", lora_config=run_yaml).output
    np.testing.assert_allclose(knowlm_logits(KnowLMForCausalLM.from_pretrained(merged, use_past=False), IDS),
                               expected, atol=1e-5, rtol=0)


def test_lora_merge_refuses_a_rank_that_does_not_fit_the_checkpoint_and_missing_settings(model_dir, tmp_path):
    lora = [{"name": f"model.layers.{i}.attention.wq.mindpet_delta_lora_{part}",
             "data": ms.Tensor(np.zeros(shape, np.float32))}
            for i in range(2) for part, shape in (("a", (4, 64)), ("b", (64, 4)))]
    ms.save_checkpoint(lora, str(tmp_path / "lora.ckpt"))
    one_line_error(lambda: merge_lora(model_dir, tmp_path / "lora.ckpt", tmp_path / "out"),
                   r"adapter_config.json: not found; pass lora_config \(--lora-config\)")
    (tmp_path / "adapter_config.json").write_text(json.dumps({"r": 8, "lora_alpha": 16}))
    one_line_error(lambda: merge_lora(model_dir, tmp_path / "lora.ckpt", tmp_path / "out"),
                   r"shapes \(4, 64\) and \(64, 4\), expected \(8, 64\) and \(64, 8\) for rank 8")


def _flip_byte(path):
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0x10
    path.write_bytes(bytes(data))


def test_lora_merge_refuses_damaged_files_and_a_diverged_lora_naming_the_file_and_writes_nothing(model_dir,
                                                                                                  tmp_path):
    def save_lora(path, value):
        ms.save_checkpoint([{"name": f"model.layers.{i}.attention.wq.mindpet_delta_lora_{part}",
                             "data": ms.Tensor(np.full(shape, value, np.float32))}
                            for i in range(2) for part, shape in (("a", (4, 64)), ("b", (64, 4)))],
                           str(path), crc_check=True)
        return path

    (tmp_path / "adapter_config.json").write_text(json.dumps({"r": 4, "lora_alpha": 8}))
    damaged_lora = save_lora(tmp_path / "damaged.ckpt", 0.01)
    _flip_byte(damaged_lora)
    one_line_error(lambda: merge_lora(model_dir, damaged_lora, tmp_path / "out"),
                   f"^{damaged_lora}: checksum mismatch: the file is damaged")
    diverged = save_lora(tmp_path / "diverged.ckpt", float("nan"))
    one_line_error(lambda: merge_lora(model_dir, diverged, tmp_path / "out"),
                   f"^{diverged}: 'model.layers.0.attention.wq.weight' with the LoRA merged in: holds 4096 inf or "
                   "nan values$")
    base = tmp_path / "base"
    base.mkdir()
    for path in model_dir.iterdir():
        (base / path.name).write_bytes(path.read_bytes())
    _flip_byte(base / WEIGHTS_NAME)
    one_line_error(lambda: merge_lora(base, save_lora(tmp_path / "good.ckpt", 0.01), tmp_path / "out"),
                   f"^{base / WEIGHTS_NAME}: checksum mismatch: the file is damaged")
    assert not (tmp_path / "out").exists()


@pytest.fixture(scope="module")
def peft_adapter(hf_model, tmp_path_factory):
    """A random PEFT LoRA on a copy of the conftest reference (the base of ``model_dir``): its directory, its
    logits and PEFT's own merge of it (``merge_and_unload``)."""
    torch.manual_seed(2)
    model = peft.get_peft_model(copy.deepcopy(hf_model), peft.LoraConfig(
        r=4, lora_alpha=16, lora_dropout=0.0, init_lora_weights=False,     # random B: the adapter changes logits
        target_modules=["q_proj", "v_proj", "gate_proj", "down_proj"])).eval()
    path = tmp_path_factory.mktemp("peft")
    model.save_pretrained(path / "safetensors")
    model.save_pretrained(path / "bin", safe_serialization=False)
    return path, hf_logits(model), model.merge_and_unload().state_dict()


def test_imported_peft_adapter_reproduces_peft_logits(model_dir, peft_adapter, tmp_path):
    path, expected, _ = peft_adapter
    adapter = import_peft_adapter(path / "safetensors", tmp_path / "adapter").output
    assert json.loads((adapter / "adapter_config.json").read_text())["target_modules"] == \
        [".*w1", ".*w2", ".*wq", ".*wv"]
    model = load_lora_model(model_dir, adapter, use_past=False)
    np.testing.assert_allclose(knowlm_logits(model, IDS), expected, atol=1e-4, rtol=0)


def test_cli_import_peft_then_merge_lora_equals_peft_merge_and_unload(model_dir, peft_adapter, tmp_path):
    path, _, peft_merged = peft_adapter
    assert main(["import-peft", str(path / "safetensors"), str(tmp_path / "adapter")]) == 0
    assert main(["merge-lora", str(model_dir), str(tmp_path / "adapter"), str(tmp_path / "merged")]) == 0
    merged = {e.name: e for e in stream.scan(tmp_path / "merged" / WEIGHTS_NAME)}
    for name, tensor in peft_merged.items():
        ours = np.frombuffer(merged[hf_to_mindspore_name(name)].read(), np.float32).reshape(tensor.shape)
        np.testing.assert_allclose(ours, tensor.numpy(), atol=1e-6, rtol=0, err_msg=name)


def test_peft_bin_adapter_imports_the_same_tensors_as_safetensors(peft_adapter, tmp_path):
    path, _, _ = peft_adapter
    read = [{e.name: e.read() for e in stream.scan(import_peft_adapter(path / fmt, tmp_path / fmt).output
                                                         / "adapter_model.ckpt")} for fmt in ("bin", "safetensors")]
    assert read[0] == read[1] and len(read[0]) == 16


@pytest.mark.parametrize("setting, message", [
    ({"use_dora": True}, "use_dora=True is not supported"),
    ({"modules_to_save": ["lm_head"]}, r"modules_to_save=\['lm_head'\] is not supported"),
    ({"peft_type": "IA3"}, "peft_type 'IA3' is not supported"),
])
def test_peft_features_beyond_plain_lora_are_refused(peft_adapter, tmp_path, setting, message):
    source = tmp_path / "peft"
    os.makedirs(source)
    for name in ("adapter_model.safetensors", "adapter_config.json"):
        (source / name).write_bytes((peft_adapter[0] / "safetensors" / name).read_bytes())
    config = json.loads((source / "adapter_config.json").read_text())
    (source / "adapter_config.json").write_text(json.dumps({**config, **setting}))
    one_line_error(lambda: import_peft_adapter(source, tmp_path / "out"), message)
