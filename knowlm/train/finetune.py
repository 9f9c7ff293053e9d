"""Fine-tuning (``knowlm finetune``): MindFormers' Trainer with a portable wrapper, progress and checkpoints.

MindFormers' default training wrapper checks for fp16 overflow with ``NPUGetFloatStatusV2`` (Ascend only); the
``KnowLMTrainOneStepCell`` registered here checks gradients with ``isfinite`` instead, which every device has,
and is otherwise MindFormers' ``MFTrainOneStepCell``. Checkpoints (``knowlm.train.callbacks``) are written
atomically; ``resume`` loads the newest and MindFormers skips the batches already seen, so an interrupted run ends
where an uninterrupted one does.
"""
import contextlib
import copy
import logging
import os
import sys
from dataclasses import dataclass
from pathlib import Path

import mindspore as ms
import mindspore.dataset as ds
from mindspore import ops
from mindformers import Trainer
from mindformers.core.context import build_context
from mindformers.models.build_model import build_network
from mindformers.tools.logger import get_logger
from mindformers.tools.register import MindFormerModuleType, MindFormerRegister
from mindformers.wrapper.wrapper import MFTrainOneStepCell

from knowlm.checkpoints.lora import merge_lora, pet_settings, write_adapter_config
from knowlm.checkpoints.model_dir import load_config, save_pretrained
from knowlm.errors import KnowLMError
from knowlm.files import TOKENIZER_NAME
from knowlm.models.llama import KnowLMForCausalLM
from knowlm.models import registry  # noqa: F401  (the yaml's type: names)
from knowlm.train.callbacks import TrainingCheckpoint, TrainingProgress, checkpoint_step, latest_checkpoint
from knowlm.train.config import training_config
from knowlm.train.launch import check_config, world_size

_all_finite = ops.MultitypeFuncGraph("all_finite")


@_all_finite.register("Tensor")
def _tensor_all_finite(grad):
    return ops.isfinite(grad).all().astype(ms.float32)


@MindFormerRegister.register(MindFormerModuleType.WRAPPER)
class KnowLMTrainOneStepCell(MFTrainOneStepCell):
    """``MFTrainOneStepCell`` whose overflow check runs on any device: a step overflows if a gradient is not finite."""

    def get_overflow_status(self, status, compute_output):
        finite = self.hyper_map(_all_finite, compute_output)
        return ops.AddN()(finite) < len(compute_output)


@dataclass
class FinetuneResult:
    losses: list          # loss of every step run by this call
    network: object       # the trained network as the Trainer holds it (wrapped; LoRA-wrapped for pet_config)
    checkpoint: Path      # the newest checkpoint written

    @property
    def model(self):
        """The ``KnowLMForCausalLM`` inside ``network``."""
        network = self.network
        while not isinstance(network, KnowLMForCausalLM):
            network = network.network
        return network


@dataclass
class _Run:
    """What a run reads and writes, settled before anything is built."""
    dataset: Path
    checkpoints: Path     # <output_dir>/checkpoints/rank_<rank>: where MindFormers' resume looks
    start: Path           # the checkpoint a resume starts from, or None
    total: int            # the step the run ends at
    base: str             # the base model (directory or checkpoint), or ""
    pet_config: dict      # LoRA settings (None: full fine-tuning)


def finetune(config_path, data=None, base=None, output_dir=None, resume=False, max_steps=None, overrides=None,
             export_merged=None):
    """Run the fine-tuning described by the yaml ``config_path``.

    ``data`` (MindRecord from ``knowlm prepare-data``), ``base`` (model directory or checkpoint) and
    ``output_dir`` override the yaml's ``train_dataset.data_loader.dataset_dir``,
    ``model.model_config.checkpoint_name_or_path`` and ``output_dir``; ``overrides`` maps other dotted yaml keys
    to values. ``export_merged``: a folder to write the trained model to as a plain knowlm model directory
    (LoRA merged into the base).
    """
    config = training_config(config_path, data, base, output_dir, overrides)
    problems = check_config(config_path, devices=world_size(), config=config)
    if problems:
        raise KnowLMError("; ".join(problems))
    run = _plan(config_path, config, resume, max_steps, export_merged)
    done = checkpoint_step(run.start) if run.start else 0
    knowlm_cfg = config.get("knowlm", {}) or {}
    out = sys.stdout
    progress = TrainingProgress(run.total, config.runner_config.batch_size, config.model.model_config.seq_length,
                                log_every=knowlm_cfg.get("log_every", 1), initial_step=done, out=out)
    saver = TrainingCheckpoint(run.checkpoints, every=knowlm_cfg.get("save_every", 50), rank=_rank(),
                               keep=knowlm_cfg.get("keep", 3), initial_step=done)
    if run.pet_config:
        run.checkpoints.mkdir(parents=True, exist_ok=True)
        write_adapter_config(run.checkpoints, *pet_settings(run.pet_config), base=run.base)
    trainer = _trainer(config, [progress, saver])
    # MindFormers prints its whole resolved config and other notices to stdout while it trains; knowlm's own lines
    # go to the caller's stdout (``out``), MindFormers' to stderr.
    with contextlib.redirect_stdout(sys.stderr):
        if run.start is not None:
            trainer.finetune(finetune_checkpoint=str(run.checkpoints.parent), resume_training=run.start.name)
        else:
            trainer.finetune()
    result = FinetuneResult(progress.losses, trainer.trainer.network, latest_checkpoint(saver.directory))
    if export_merged:
        export(result, run.base, run.pet_config, export_merged)
    return result


def _plan(config_path, config, resume, max_steps, export_merged) -> _Run:
    dataset = Path(config.train_dataset.data_loader.dataset_dir or "")
    if not dataset.is_file():
        raise KnowLMError(f"{config_path}: train_dataset.data_loader.dataset_dir {str(dataset)!r} is not a "
                          "file; make one with `knowlm prepare-data` and pass it with --data")
    checkpoints = Path(config.output_dir) / "checkpoints" / f"rank_{_rank()}"
    start = latest_checkpoint(checkpoints) if resume else None
    if resume and start is None:
        raise KnowLMError(f"{checkpoints}: no checkpoint to resume from")
    # Read before training: the Trainer clears checkpoint_name_or_path, and LoRA wrapping consumes pet_config.
    base = config.model.model_config.checkpoint_name_or_path or ""
    if export_merged and not (Path(base) / TOKENIZER_NAME).is_file():
        raise KnowLMError(f"--export-merged needs --base to be a knowlm model directory (with its tokenizer), "
                          f"got {base!r}")
    batch_size = config.runner_config.batch_size
    data_parallel = config.parallel_config.data_parallel if config.get("use_parallel") else 1
    steps_per_epoch = _dataset_size(dataset) // (batch_size * data_parallel)
    total = steps_per_epoch * config.runner_config.epochs
    if max_steps:
        total = min(total, max_steps)
        config.runner_config.epochs = -(-total // steps_per_epoch)
        if config.get("lr_schedule") and config.lr_schedule.get("total_steps", -1) in (-1, None):
            # MindFormers would stretch the schedule to the end of the last, partly run epoch.
            config.lr_schedule.total_steps = total
    return _Run(dataset, checkpoints, start, total, base, copy.deepcopy(config.model.model_config.get("pet_config")))


def _trainer(config, callbacks):
    """MindFormers' Trainer over a network knowlm builds (base weights through knowlm's checked loader, model
    directories included; the Trainer's own finetune() would clear checkpoint_name_or_path first)."""
    config.callbacks = []
    # As MindFormers' run_mindformer.py does: device, mode and, with use_parallel, communication and the
    # parallel context, which the Trainer itself does not set up.
    build_context(config)
    ms.set_seed(config.seed or 0)      # the Trainer seeds too, but after the network (and LoRA's init) exists
    network = build_network(config.model)       # LoRA from pet_config
    # The Trainer makes a new MindFormers logger (named after the output folder) at INFO and logs through it at
    # once: the caller's level holds before and after.
    level, disabled = get_logger().getEffectiveLevel(), logging.root.manager.disable
    logging.disable(max(disabled, level - 1))
    try:
        trainer = Trainer(args=config, task="text_generation", model=network, callbacks=callbacks)
    finally:
        logging.disable(disabled)
    get_logger().setLevel(level)
    return trainer


def export(result, base, pet, output_dir):
    """Write the trained model as a plain model directory: LoRA merged into ``base``, or the full weights."""
    if pet:
        merge_lora(base, result.checkpoint, output_dir)
    else:
        save_pretrained(result.model, output_dir, Path(base) / TOKENIZER_NAME, config=load_config(base))


def _rank():
    # Rank-table launches set RANK_ID; msrun sets MS_NODE_ID.
    return int(os.environ.get("RANK_ID") or os.environ.get("MS_NODE_ID") or 0)


def _dataset_size(path):
    return ds.MindDataset(str(path), columns_list=["input_ids"], shuffle=False).get_dataset_size()
