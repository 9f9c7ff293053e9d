"""Fine-tuning (``knowlm finetune``): MindFormers' Trainer with a portable wrapper, progress and LoRA checkpoints.

MindFormers' default training wrapper checks for fp16 overflow with ``NPUGetFloatStatusV2`` (Ascend only); the
``KnowLMTrainOneStepCell`` registered here checks gradients with ``isfinite`` instead, which every device has,
and is otherwise MindFormers' ``MFTrainOneStepCell``. Checkpoints hold what a LoRA run changes (adapter weights,
optimizer moments, step counters), written under a temporary name and renamed when complete; ``resume`` loads
the newest and MindFormers skips the batches already seen, so an interrupted run ends where an uninterrupted one
does.
"""
import copy
import json
import logging
import os
import re
import time
from dataclasses import dataclass
from pathlib import Path
from unittest import mock

import mindspore as ms
from mindspore import ops
from mindspore.train import Callback
from mindformers.tools.logger import get_logger
from mindformers.tools.register import MindFormerConfig, MindFormerModuleType, MindFormerRegister
from mindformers.wrapper.wrapper import MFTrainOneStepCell
from tqdm import tqdm

from knowlm.errors import KnowLMError
from knowlm.pretrained import TOKENIZER_NAME

log = logging.getLogger("knowlm")
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


class TrainingProgress(Callback):
    """A progress bar with ETA, one log line per ``log_every`` steps, and a one-line summary at the end."""

    def __init__(self, total_steps, batch_size, seq_length, log_every=1, initial_step=0):
        super().__init__()
        self.total_steps = total_steps
        self.tokens_per_step = batch_size * seq_length
        self.batch_size = batch_size
        self.log_every = log_every
        self.initial_step = initial_step
        self.bar = None
        self.started = self.step_started = None
        self.losses = []

    def on_train_begin(self, run_context):
        self.started = time.perf_counter()
        self.bar = tqdm(total=self.total_steps, initial=self.initial_step, desc="finetune", unit="step")

    def on_train_step_begin(self, run_context):
        self.step_started = time.perf_counter()

    def on_train_step_end(self, run_context):
        params = run_context.original_args()
        seconds = time.perf_counter() - self.step_started
        loss, _, _, learning_rate = (float(x.asnumpy().reshape(-1)[0]) if hasattr(x, "asnumpy") else x
                                     for x in params.net_outputs[:4])
        self.losses.append(loss)
        self.bar.update(1)
        self.bar.set_postfix(loss=f"{loss:.4f}")
        step = params.cur_step_num + self.initial_step
        if step >= self.total_steps:
            run_context.request_stop()
        if step % self.log_every == 0:
            self.bar.write(f"step {step}/{self.total_steps} loss {loss:.4f} lr {learning_rate:.3e} "
                           f"step_time {seconds:.3f}s samples/s {self.batch_size / seconds:.2f} "
                           f"tokens/s {self.tokens_per_step / seconds:.0f}")

    def on_train_end(self, run_context):
        self.bar.close()
        if self.losses:
            print(f"finetune: {len(self.losses)} steps in {time.perf_counter() - self.started:.1f}s, "
                  f"loss {self.losses[0]:.4f} -> {self.losses[-1]:.4f}")


# MindFormers' resume parses "<prefix>_rank_<id>-<epoch>_<step in epoch>.ckpt".
CHECKPOINT_PATTERN = re.compile(r"^lora_rank_\d+-(\d+)_(\d+)\.ckpt$")


def latest_checkpoint(directory):
    """The newest complete LoRA checkpoint in ``directory`` (partial files never match), or None."""
    found = sorted((tuple(map(int, m.groups())), p) for p in Path(directory).glob("lora_rank_*.ckpt")
                   if (m := CHECKPOINT_PATTERN.match(p.name)))
    return found[-1][1] if found else None


def checkpoint_step(path) -> int:
    return int(ms.load_checkpoint(str(path), choice_func=lambda name: name == "step_num")["step_num"].asnumpy())


class LoRACheckpoint(Callback):
    """Every ``every`` steps (and at the end) save the trainable weights with optimizer and step state."""

    def __init__(self, directory, every, keep=3, initial_step=0):
        super().__init__()
        self.initial_step = initial_step
        self.directory = Path(directory)
        self.every = every
        self.keep = keep

    def _step(self, params):
        # After a resume MindSpore counts cur_step_num from 1 again.
        return params.cur_step_num + self.initial_step

    def _save(self, params):
        self.directory.mkdir(parents=True, exist_ok=True)
        network = params.train_network
        frozen = {p.name for p in network.get_parameters() if not p.requires_grad
                  and not p.name.startswith(("adam_", "global_step", "scale_sense"))}
        step = self._step(params)
        epoch, step_in_epoch = (step - 1) // params.batch_num + 1, (step - 1) % params.batch_num + 1
        final = self.directory / f"lora_rank_{_rank()}-{epoch}_{step_in_epoch}.ckpt"
        partial = final.with_suffix(".partial.ckpt")
        ms.save_checkpoint(network, str(partial), choice_func=lambda name: name not in frozen,
                           append_dict={"step_num": step, "epoch_num": epoch})
        os.replace(partial, final)
        while True:
            kept = sorted(self.directory.glob("lora_rank_*.ckpt"), key=os.path.getmtime)
            if len(kept) <= self.keep:
                break
            kept[0].unlink()

    def on_train_step_end(self, run_context):
        params = run_context.original_args()
        if self._step(params) % self.every == 0:
            self._save(params)

    def on_train_end(self, run_context):
        params = run_context.original_args()
        if self._step(params) % self.every:
            self._save(params)


def load_training_config(path, **overrides) -> MindFormerConfig:
    if not Path(path).is_file():
        raise KnowLMError(f"{path}: config not found; expected a finetune yaml such as "
                          "configs/tiny/finetune_lora.yaml")
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


@dataclass
class FinetuneResult:
    losses: list          # loss of every step run by this call
    network: object       # the trained network as the Trainer holds it (wrapped; LoRA-wrapped for pet_config)
    checkpoint: Path      # the newest checkpoint written

    @property
    def model(self):
        """The ``KnowLMForCausalLM`` inside ``network``."""
        from knowlm.model import KnowLMForCausalLM  # pylint: disable=import-outside-toplevel
        network = self.network
        while not isinstance(network, KnowLMForCausalLM):
            network = network.network
        return network


def finetune(config_path, data=None, base=None, output_dir=None, resume=False, max_steps=None, overrides=None,
             export_merged=None):
    """Run the fine-tuning described by the yaml ``config_path``.

    ``data`` (MindRecord from ``knowlm prepare-data``), ``base`` (model directory or checkpoint) and
    ``output_dir`` override the yaml's ``train_dataset.data_loader.dataset_dir``,
    ``model.model_config.checkpoint_name_or_path`` and ``output_dir``; ``overrides`` maps other dotted yaml keys
    to values. ``export_merged``: a folder to write the trained model to as a plain knowlm model directory
    (LoRA merged into the base).
    """
    from mindformers import Trainer  # pylint: disable=import-outside-toplevel
    from mindformers.core.context import build_context  # pylint: disable=import-outside-toplevel
    from mindformers.models.build_model import build_network  # pylint: disable=import-outside-toplevel
    from knowlm.launch import check_config, world_size  # pylint: disable=import-outside-toplevel
    config = training_config(config_path, data, base, output_dir, overrides)
    problems = check_config(config_path, devices=world_size(), config=config)
    if problems:
        raise KnowLMError("; ".join(problems))
    dataset_path = Path(config.train_dataset.data_loader.dataset_dir or "")
    if not dataset_path.is_file():
        raise KnowLMError(f"{config_path}: train_dataset.data_loader.dataset_dir {str(dataset_path)!r} is not a "
                          "file; make one with `knowlm prepare-data` and pass it with --data")
    # MindFormers' resume reads <load_checkpoint>/rank_<id>/<name>.
    checkpoints = Path(config.output_dir) / "checkpoints"
    start = latest_checkpoint(checkpoints / f"rank_{_rank()}") if resume else None
    if resume and start is None:
        raise KnowLMError(f"{checkpoints}: no checkpoint to resume from")
    knowlm_cfg = config.get("knowlm", {}) or {}
    # Read before training: the Trainer clears checkpoint_name_or_path, and LoRA wrapping consumes pet_config.
    base_dir = config.model.model_config.checkpoint_name_or_path
    pet_config = copy.deepcopy(config.model.model_config.get("pet_config"))
    if export_merged and not (Path(base_dir or "") / TOKENIZER_NAME).is_file():
        raise KnowLMError(f"--export-merged needs --base to be a knowlm model directory (with its tokenizer), "
                          f"got {base_dir!r}")
    batch_size = config.runner_config.batch_size
    data_parallel = config.parallel_config.data_parallel if config.get("use_parallel") else 1
    steps_per_epoch = _dataset_size(dataset_path) // (batch_size * data_parallel)
    total = steps_per_epoch * config.runner_config.epochs
    if max_steps:
        total = min(total, max_steps)
        config.runner_config.epochs = -(-total // steps_per_epoch)
        if config.get("lr_schedule") and config.lr_schedule.get("total_steps", -1) in (-1, None):
            # MindFormers would stretch the schedule to the end of the last, partly run epoch.
            config.lr_schedule.total_steps = total
    done = checkpoint_step(start) if start else 0
    progress = TrainingProgress(total, batch_size, config.model.model_config.seq_length,
                                log_every=knowlm_cfg.get("log_every", 1), initial_step=done)
    saver = LoRACheckpoint(checkpoints / f"rank_{_rank()}", every=knowlm_cfg.get("save_every", 50),
                           keep=knowlm_cfg.get("keep", 3), initial_step=done)
    if pet_config:
        _write_lora_config(pet_config, saver.directory)
    config.callbacks = []
    # As MindFormers' run_mindformer.py does: device, mode and, with use_parallel, communication and the
    # parallel context, which the Trainer itself does not set up.
    build_context(config)
    # Built here, not by the Trainer: its finetune() clears checkpoint_name_or_path, and the base weights must go
    # through knowlm's checked loader (model directories included). build_network adds LoRA from pet_config.
    ms.set_seed(config.seed or 0)      # the Trainer seeds too, but after the network (and LoRA's init) exists
    network = build_network(config.model)
    # The Trainer makes a new MindFormers logger (named after the output folder) at INFO and logs through it at
    # once: the caller's level (WARNING under the knowlm command) holds before and after.
    level, disabled = get_logger().getEffectiveLevel(), logging.root.manager.disable
    logging.disable(max(disabled, level - 1))
    try:
        trainer = Trainer(args=config, task="text_generation", model=network, callbacks=[progress, saver])
    finally:
        logging.disable(disabled)
    get_logger().setLevel(level)
    # MindFormers pprints its whole resolved config to stdout before training; knowlm logs it at DEBUG instead.
    with mock.patch("mindformers.trainer.base_trainer.pprint", lambda value: log.debug("%s", value)):
        if start is not None:
            trainer.finetune(finetune_checkpoint=str(checkpoints), resume_training=start.name)
        else:
            trainer.finetune()
    result = FinetuneResult(progress.losses, trainer.trainer.network, latest_checkpoint(saver.directory))
    if export_merged:
        export(result, base_dir, pet_config, export_merged)
    return result


def export(result, base, pet, output_dir):
    """Write the trained model as a plain model directory: LoRA merged into ``base``, or the full weights."""
    from knowlm.convert_lora import merge_lora  # pylint: disable=import-outside-toplevel
    from knowlm.pretrained import load_config, save_pretrained  # pylint: disable=import-outside-toplevel
    if pet:
        merge_lora(base, result.checkpoint, output_dir)
    else:
        save_pretrained(result.model, output_dir, Path(base) / TOKENIZER_NAME, config=load_config(base))


def _write_lora_config(pet, directory):
    """The run's effective pet_config (after --set) beside its checkpoints: what merge-lora reads by default."""
    from knowlm.convert_lora import ADAPTER_CONFIG  # pylint: disable=import-outside-toplevel
    from knowlm.pretrained import write_json  # pylint: disable=import-outside-toplevel
    Path(directory).mkdir(parents=True, exist_ok=True)
    write_json(Path(directory) / ADAPTER_CONFIG, {"pet_config": dict(pet)})


def _rank():
    # Rank-table launches set RANK_ID; msrun sets MS_NODE_ID.
    return int(os.environ.get("RANK_ID") or os.environ.get("MS_NODE_ID") or 0)


def _dataset_size(path):
    import mindspore.dataset as ds  # pylint: disable=import-outside-toplevel
    return ds.MindDataset(str(path), columns_list=["input_ids"], shuffle=False).get_dataset_size()
