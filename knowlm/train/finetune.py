"""Fine-tuning (``knowlm finetune``): MindFormers' Trainer with a portable wrapper, progress and checkpoints.

MindFormers' default training wrapper checks for fp16 overflow with ``NPUGetFloatStatusV2`` (Ascend only); the
``KnowLMTrainOneStepCell`` registered here checks gradients with ``isfinite`` instead, which every device has,
and is otherwise MindFormers' ``MFTrainOneStepCell``. Checkpoints (``knowlm.train.callbacks``) are written
atomically; ``resume`` loads the newest and MindFormers skips the batches already seen, so an interrupted run ends
where an uninterrupted one does.
"""
import contextlib
import copy
import functools
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

from knowlm.checkpoints.lora import adapter_config, merge_lora, pet_settings
from knowlm.checkpoints.model_dir import load_config, save_pretrained
from knowlm.errors import KnowLMError, first_line
from knowlm.files import ADAPTER_CONFIG, CONFIG_NAME, read_json
from knowlm.models.llama import KnowLMForCausalLM
from knowlm.models import registry  # noqa: F401  (the yaml's type: names)
from knowlm.train.callbacks import (CHECKPOINT_GLOB, TrainingCheckpoint, TrainingProgress, checkpoint_step,
                                    latest_checkpoint)
from knowlm.tokenizer.load import tokenizer_files
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

    @property
    def adapter_settings(self):
        """``adapter_config.json``'s values for this run (None: full fine-tuning)."""
        base = Path(self.base).resolve() if self.base else None      # one base, however it was spelled
        return adapter_config(*pet_settings(self.pet_config), base=base) if self.pet_config else None


def finetune(config_path, data=None, base=None, output_dir=None, resume=False, max_steps=None, overrides=None,
             export_merged=None, force=False):
    """Run the fine-tuning described by the yaml ``config_path``.

    ``data`` (MindRecord from ``knowlm prepare-data``), ``base`` (model directory or checkpoint) and
    ``output_dir`` override the yaml's ``train_dataset.data_loader.dataset_dir``,
    ``model.model_config.checkpoint_name_or_path`` and ``output_dir``; ``overrides`` maps other dotted yaml keys
    to values. ``export_merged``: a folder to write the trained model to as a plain knowlm model directory
    (LoRA merged into the base). An output folder that holds another run's checkpoints is continued only with
    ``resume`` (and the same LoRA settings), replaced only with ``force``.
    """
    config = training_config(config_path, data, base, output_dir, overrides)
    problems = check_config(config_path, devices=world_size(), config=config)
    if problems:
        raise KnowLMError("; ".join(problems))
    run = _plan(config_path, config, resume, max_steps, export_merged, force)
    done = checkpoint_step(run.start) if run.start else 0
    knowlm_cfg = config.get("knowlm", {}) or {}
    progress = TrainingProgress(run.total, config.runner_config.batch_size, config.model.model_config.seq_length,
                                log_every=knowlm_cfg.get("log_every", 1), initial_step=done, out=sys.stdout)
    saver = TrainingCheckpoint(run.checkpoints, every=knowlm_cfg.get("save_every", 50), rank=_rank(),
                               keep=knowlm_cfg.get("keep", 3), initial_step=done, settings=run.adapter_settings)
    # MindFormers prints its whole resolved config and other notices to stdout while it builds and trains:
    # they go to the run's log file; knowlm's own lines to the caller's stdout (``progress.out``).
    with contextlib.redirect_stdout(_mindformers_log(Path(config.output_dir), _rank())):
        trainer = _trainer(config, [progress, saver])
        if run.start is not None:
            trainer.finetune(finetune_checkpoint=str(run.checkpoints.parent), resume_training=run.start.name)
        else:
            trainer.finetune()
    result = FinetuneResult(progress.losses, trainer.trainer.network, latest_checkpoint(saver.directory))
    if export_merged:
        export(result, run.base, run.pet_config, export_merged, force)
    return result


def _plan(config_path, config, resume, max_steps, export_merged, force) -> _Run:
    if max_steps is not None and (isinstance(max_steps, bool) or not isinstance(max_steps, int) or max_steps < 1):
        raise KnowLMError(f"--max-steps {max_steps}: expected an integer >= 1")
    dataset = Path(config.train_dataset.data_loader.dataset_dir or "")
    if not dataset.is_file():
        raise KnowLMError(f"{config_path}: train_dataset.data_loader.dataset_dir {str(dataset)!r} is not a "
                          "file; make one with `knowlm prepare-data` and pass it with --data")
    # Read before training: the Trainer clears checkpoint_name_or_path, and LoRA wrapping consumes pet_config.
    base = config.model.model_config.checkpoint_name_or_path or ""
    if export_merged and not Path(base, CONFIG_NAME).is_file():
        raise KnowLMError(f"--export-merged needs --base to be a knowlm model directory (with its tokenizer), "
                          f"got {base!r}")
    if export_merged:
        tokenizer_files(base)       # one line now, not after training, if it has none
    if export_merged and (Path(export_merged) / CONFIG_NAME).exists() and not force:
        raise KnowLMError(f"--export-merged {export_merged}: already holds a model ({CONFIG_NAME}); pass --force "
                          "to overwrite it")
    run = _Run(dataset, Path(config.output_dir) / "checkpoints" / f"rank_{_rank()}", None, 0, base,
               copy.deepcopy(config.model.model_config.get("pet_config")))
    run.start = _run_folder(run, resume, force)
    batch_size = config.runner_config.batch_size
    data_parallel = config.parallel_config.data_parallel if config.get("use_parallel") else 1
    samples, width = _dataset_shape(dataset)
    seq_length = config.model.model_config.seq_length
    if width != seq_length + 1:
        raise KnowLMError(f"{dataset}: samples of {width} tokens, for seq_length {width - 1}, but the model trains "
                          f"at seq_length {seq_length}; run prepare-data with --seq-length {seq_length}, or "
                          f"--set model.model_config.seq_length={width - 1}")
    steps_per_epoch = samples // (batch_size * data_parallel)
    if steps_per_epoch < 1:
        raise KnowLMError(f"{dataset}: fewer samples than one step takes (batch_size {batch_size} x data_parallel "
                          f"{data_parallel})")
    run.total = steps_per_epoch * config.runner_config.epochs
    if max_steps:
        run.total = min(run.total, max_steps)
        config.runner_config.epochs = -(-run.total // steps_per_epoch)
        if config.get("lr_schedule") and config.lr_schedule.get("total_steps", -1) in (-1, None):
            # MindFormers would stretch the schedule to the end of the last, partly run epoch.
            config.lr_schedule.total_steps = run.total
    return run


def _run_folder(run, resume, force):
    """The checkpoint to resume from (None: a fresh start); a folder of another run is refused, or with ``force``
    emptied of that run's files."""
    found = sorted(run.checkpoints.glob(CHECKPOINT_GLOB)) if run.checkpoints.is_dir() else []
    recorded = run.checkpoints / ADAPTER_CONFIG
    if resume:
        start = latest_checkpoint(run.checkpoints)
        if start is None:
            raise KnowLMError(f"{run.checkpoints}: no checkpoint to resume from")
        saved = read_json(recorded) if recorded.is_file() else None
        if saved != run.adapter_settings:
            raise KnowLMError(f"{run.checkpoints}: its run trained with other settings ({_settings(saved)}) than "
                              f"this one ({_settings(run.adapter_settings)}); resume with the same yaml and "
                              "--set values, or start a new run in another --output-dir")
        return start
    if found or recorded.exists():
        if not force:
            raise KnowLMError(f"{run.checkpoints.parent.parent}: holds checkpoints of an earlier run; pass --resume "
                              "to continue it, --force to start over, or choose another --output-dir")
        for path in [*found, recorded]:
            path.unlink(missing_ok=True)
    return None


def _settings(values):
    if values is None:
        return "full fine-tuning"
    return ", ".join(f"{key} {values[key]}" for key in ("r", "lora_alpha", "lora_dropout", "target_modules",
                                                       "base_model_name_or_path"))


def _trainer(config, callbacks):
    """MindFormers' Trainer over a network knowlm builds (base weights through knowlm's checked loader, model
    directories included; the Trainer's own finetune() would clear checkpoint_name_or_path first)."""
    config.callbacks = []
    # As MindFormers' run_mindformer.py does: device, mode and, with use_parallel, communication and the
    # parallel context, which the Trainer itself does not set up.
    build_context(config)
    ms.set_seed(config.seed or 0)      # the Trainer seeds too, but after the network (and LoRA's init) exists
    network = build_network(config.model)       # LoRA from pet_config
    # The Trainer makes a new MindFormers logger (named after the output folder) at INFO, on the stdout of the
    # moment (the run's log file), and logs through it at once: the caller's level holds before and after.
    level, disabled = get_logger().getEffectiveLevel(), logging.root.manager.disable
    logging.disable(max(disabled, level - 1))
    try:
        trainer = Trainer(args=config, task="text_generation", model=network, callbacks=callbacks)
    finally:
        logging.disable(disabled)
    get_logger().setLevel(level)
    return trainer


@functools.lru_cache(maxsize=None)
def _mindformers_log(output_dir, rank):
    """``<output_dir>/log/mindformers_rank_<rank>.log``, appended to, for what MindFormers prints. Open for the
    rest of the process: the Trainer's logger keeps writing to the stream it was made on."""
    path = output_dir / "log" / f"mindformers_rank_{rank}.log"
    path.parent.mkdir(parents=True, exist_ok=True)
    return open(path, "a", encoding="utf-8", buffering=1)  # pylint: disable=consider-using-with


def export(result, base, pet, output_dir, force=False):
    """Write the trained model as a plain model directory: LoRA merged into ``base``, or the full weights."""
    if pet:
        merge_lora(base, result.checkpoint, output_dir, force=force)
    else:
        save_pretrained(result.model, output_dir, base, config=load_config(base), force=force)


def _rank():
    # Rank-table launches set RANK_ID; msrun sets MS_NODE_ID.
    return int(os.environ.get("RANK_ID") or os.environ.get("MS_NODE_ID") or 0)


def _dataset_shape(path):
    """``(samples, tokens per sample)`` of a MindRecord from ``knowlm prepare-data``."""
    try:
        dataset = ds.MindDataset(str(path), columns_list=["input_ids"], shuffle=False)
        first = next(dataset.create_tuple_iterator(output_numpy=True, num_epochs=1))[0]
        return dataset.get_dataset_size(), int(first.shape[-1])
    except (RuntimeError, StopIteration) as err:
        raise KnowLMError(f"{path}: not a MindRecord of training samples from `knowlm prepare-data` "
                          f"({first_line(err)})") from None
