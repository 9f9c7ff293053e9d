"""What a training run reports and keeps: progress with ETA, and checkpoints of the weights it trains.

A checkpoint holds what a run changes (the trainable weights: LoRA adapters, or all weights in full fine-tuning),
the optimizer's moments and the step counters, written atomically; the base weights are never written again.
"""
import re
import sys
import time
from pathlib import Path

import mindspore as ms
from mindspore.train import Callback
from tqdm import tqdm

from knowlm.checkpoints.stream import verify
from knowlm.files import ADAPTER_CONFIG, atomic_write, write_json

# MindFormers' resume finds "<prefix>_rank_<device rank>-<epoch>_<step>.ckpt" in "rank_<device rank>/" (and reads
# the step from the file); knowlm's step counts from the start of the run, not of the epoch.
CHECKPOINT_PREFIX = "checkpoint"
CHECKPOINT_GLOB = f"{CHECKPOINT_PREFIX}_rank_*.ckpt"
CHECKPOINT_PATTERN = re.compile(rf"^{CHECKPOINT_PREFIX}_rank_\d+-(\d+)_(\d+)\.ckpt$")


class TrainingProgress(Callback):
    """A progress bar with ETA, one log line per ``log_every`` steps, and a one-line summary at the end, written to
    ``out`` (the caller's standard output: MindFormers' own prints are sent elsewhere while it trains)."""

    def __init__(self, total_steps, batch_size, seq_length, log_every=1, initial_step=0, out=None):
        super().__init__()
        self.total_steps = total_steps
        self.tokens_per_step = batch_size * seq_length
        self.batch_size = batch_size
        self.log_every = log_every
        self.initial_step = initial_step
        self.out = out or sys.stdout
        self.bar = None
        self.started = self.step_started = None
        self.losses = []

    def on_train_begin(self, run_context):
        self.started = time.perf_counter()
        self.bar = tqdm(total=self.total_steps, initial=self.initial_step, desc="finetune", unit="step",
                        disable=None)  # a bar on terminals only; the log lines below go everywhere

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
                           f"tokens/s {self.tokens_per_step / seconds:.0f}", file=self.out)

    def on_train_end(self, run_context):
        self.bar.close()
        if self.losses:
            print(f"finetune: {len(self.losses)} steps in {time.perf_counter() - self.started:.1f}s, "
                  f"loss {self.losses[0]:.4f} -> {self.losses[-1]:.4f}", file=self.out, flush=True)


def checkpoints(directory) -> list:
    """The complete checkpoints in ``directory`` (partial files never match), oldest step first."""
    found = [(int(m.group(2)), path) for path in Path(directory).glob(CHECKPOINT_GLOB)
             if (m := CHECKPOINT_PATTERN.match(path.name))]
    return [path for _, path in sorted(found)]


def latest_checkpoint(directory):
    """The newest complete checkpoint in ``directory``, or None."""
    found = checkpoints(directory)
    return found[-1] if found else None


def checkpoint_step(path) -> int:
    verify(path)        # a damaged checkpoint is named here, not by MindSpore's "no permission" on resume
    return int(ms.load_checkpoint(str(path), choice_func=lambda name: name == "step_num")["step_num"].asnumpy())


class TrainingCheckpoint(Callback):
    """Every ``every`` steps (and at the end) save the trainable weights with optimizer and step state; the newest
    ``keep`` stay. ``settings``: the run's ``adapter_config.json`` values (LoRA), written with the first
    checkpoint, so that a run that fails before it leaves nothing behind."""

    def __init__(self, directory, every, rank=0, keep=3, initial_step=0, settings=None):
        super().__init__()
        self.initial_step = initial_step
        self.directory = Path(directory)
        self.every = every
        self.rank = rank
        self.keep = keep
        self.settings = settings

    def _step(self, params):
        # After a resume MindSpore counts cur_step_num from 1 again.
        return params.cur_step_num + self.initial_step

    def _save(self, params):
        self.directory.mkdir(parents=True, exist_ok=True)
        if self.settings is not None and not (self.directory / ADAPTER_CONFIG).is_file():
            write_json(self.directory / ADAPTER_CONFIG, self.settings)
        network = params.train_network
        frozen = {p.name for p in network.get_parameters() if not p.requires_grad
                  and not p.name.startswith(("adam_", "global_step", "scale_sense"))}
        step = self._step(params)
        epoch = (step - 1) // params.batch_num + 1
        atomic_write(self.directory / f"{CHECKPOINT_PREFIX}_rank_{self.rank}-{epoch}_{step}.ckpt",
                     lambda tmp: ms.save_checkpoint(network, str(tmp), choice_func=lambda name: name not in frozen,
                                                    append_dict={"step_num": step, "epoch_num": epoch},
                                                    crc_check=True))
        for old in checkpoints(self.directory)[:-self.keep]:
            old.unlink()

    def on_train_step_end(self, run_context):
        params = run_context.original_args()
        if self._step(params) % self.every == 0:
            self._save(params)

    def on_train_end(self, run_context):
        params = run_context.original_args()
        if self._step(params) % self.every:
            self._save(params)
