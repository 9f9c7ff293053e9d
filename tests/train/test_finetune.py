"""LoRA fine-tuning through MindFormers' Trainer on CPU: learning, frozen base, kill-and-resume, 2-rank msrun."""
import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import mindspore as ms
import numpy as np
import pytest

from knowlm import KnowLMTokenizer
from knowlm.files import CONFIG_DIR
from knowlm.train.data import prepare_data
from knowlm.train.callbacks import latest_checkpoint
from knowlm.train.finetune import finetune
from knowlm.cli import main
from reference import fails_with_one_line

TINY_LORA = CONFIG_DIR / "tiny" / "finetune_lora.yaml"
REPO = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def train_data(model_dir, tmp_path_factory):
    folder = tmp_path_factory.mktemp("data")
    # One answer for every question: a pattern a LoRA on a random base learns within a few dozen steps.
    records = [{"instruction": f"说出第{i}个城市", "input": "", "output": "知识图谱由实体和关系组成"}
               for i in range(16)]
    (folder / "d.jsonl").write_text("\n".join(json.dumps(r, ensure_ascii=False) for r in records), encoding="utf-8")
    return prepare_data(folder / "d.jsonl", KnowLMTokenizer(vocab_file=str(model_dir)), folder / "d.mindrecord",
                        seq_length=128) and folder / "d.mindrecord"


def lora_state(path):
    return {k: v.asnumpy() for k, v in ms.load_checkpoint(str(path)).items()}


def test_lora_lowers_loss_and_changes_only_lora_parameters(model_dir, train_data, tmp_path):
    result = finetune(TINY_LORA, data=train_data, base=model_dir, output_dir=tmp_path, max_steps=40,
                      overrides={"lr_schedule.learning_rate": 5.0e-3, "runner_config.epochs": 5})
    assert len(result.losses) == 40
    assert np.mean(result.losses[-8:]) < np.mean(result.losses[:8]) - 1.0
    trainable = [p.name for p in result.network.trainable_params()]
    assert len(trainable) == 2 * 7 * 2 and all("mindpet_delta_lora" in name for name in trainable)
    base = ms.load_checkpoint(str(model_dir / "mindspore_model.ckpt"))
    for param in result.network.get_parameters():
        if param.name in base:
            np.testing.assert_array_equal(param.asnumpy(), base[param.name].asnumpy(), err_msg=param.name)
    saved = lora_state(result.checkpoint)
    settings = json.loads((result.checkpoint.parent / "adapter_config.json").read_text())
    assert (settings["peft_type"], settings["r"], settings["lora_alpha"]) == ("LORA", 16, 32.0)
    assert not [name for name in saved if name in base]                       # the base is never re-saved
    assert any(np.abs(v).max() > 0 for k, v in saved.items() if k.endswith("lora_b"))  # B starts at zero


# `knowlm finetune` that kills itself (SIGKILL: no clean-up runs) right after its first checkpoint is in place: an
# interruption at a known step, whatever the machine's load.
DIE_AFTER_FIRST_CHECKPOINT = """
import os, signal, sys
from knowlm.cli import main
from knowlm.train.callbacks import TrainingCheckpoint
save = TrainingCheckpoint._save
def save_then_die(self, params):
    save(self, params)
    os.kill(os.getpid(), signal.SIGKILL)
TrainingCheckpoint._save = save_then_die
sys.exit(main(sys.argv[1:]))
"""


def _finetune(args, code=None):
    command = [sys.executable, *(["-c", code] if code else ["-m", "knowlm.cli"]), "finetune", *args]
    return subprocess.run(command, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, timeout=300,
                          check=False).returncode


def test_killed_run_resumes_to_the_same_weights_as_an_uninterrupted_one(model_dir, train_data, tmp_path):
    # Dropout draws from MindSpore's RNG, whose state a checkpoint does not hold: compare without it.
    common = ["--config", str(TINY_LORA), "--data", str(train_data), "--base", str(model_dir), "--max-steps", "12",
              "--set", "model.model_config.pet_config.lora_dropout=0.0", "--set", "knowlm.save_every=4"]
    assert _finetune([*common, "--output-dir", str(tmp_path / "straight")]) == 0
    assert _finetune([*common, "--output-dir", str(tmp_path / "killed")], DIE_AFTER_FIRST_CHECKPOINT) == -9
    checkpoints = tmp_path / "killed" / "checkpoints" / "rank_0"
    assert latest_checkpoint(checkpoints).name == "checkpoint_rank_0-1_4.ckpt"
    assert _finetune([*common, "--output-dir", str(tmp_path / "killed"), "--resume"]) == 0
    straight = lora_state(latest_checkpoint(tmp_path / "straight" / "checkpoints" / "rank_0"))
    resumed = lora_state(latest_checkpoint(checkpoints))
    # Named by epoch and step from the start of the run: 8 steps an epoch, so step 12 is in epoch 2.
    assert latest_checkpoint(checkpoints).name == "checkpoint_rank_0-2_12.ckpt" and straight.keys() == resumed.keys()
    for name, value in straight.items():
        np.testing.assert_array_equal(resumed[name], value, err_msg=name)


def test_a_used_output_folder_is_refused_resumed_only_with_its_settings_or_started_over(model_dir, train_data,
                                                                                      tmp_path, capsys):
    finetune(TINY_LORA, data=train_data, base=model_dir, output_dir=tmp_path, max_steps=2,
             overrides={"knowlm.save_every": 1})
    capsys.readouterr()         # the library call's own log
    folder = tmp_path / "checkpoints" / "rank_0"
    before = {path.name: path.read_bytes() for path in folder.iterdir()}
    assert sorted(before) == ["adapter_config.json", "checkpoint_rank_0-1_1.ckpt", "checkpoint_rank_0-1_2.ckpt"]
    argv = ["finetune", "--config", TINY_LORA, "--data", train_data, "--base", model_dir, "--output-dir", tmp_path,
            "--max-steps", "2"]
    fails_with_one_line(argv, capsys, f"{tmp_path}: holds checkpoints of an earlier run; pass --resume")
    fails_with_one_line([*argv, "--resume", "--set", "model.model_config.pet_config.lora_rank=8"], capsys,
                        "its run trained with other settings (r 16,", "this one (r 8,")
    assert {path.name: path.read_bytes() for path in folder.iterdir()} == before       # untouched
    # Over again: the earlier run's files go first (lora_dropout as an integer is what users type).
    assert main([str(arg) for arg in argv] + ["--force", "--set", "model.model_config.pet_config.lora_alpha=8",
                                              "--set", "model.model_config.pet_config.lora_dropout=0"]) == 0
    assert sorted(path.name for path in folder.iterdir()) == ["adapter_config.json", "checkpoint_rank_0-1_2.ckpt"]
    assert json.loads((folder / "adapter_config.json").read_text())["lora_alpha"] == 8.0


@pytest.mark.parametrize("extra, message", [
    ([], "LoRA (pet_config) adapts a base model and none is given; pass --base"),
    (["--base", "BASE", "--max-steps", "0"], "--max-steps 0: expected an integer >= 1"),
    (["--base", "BASE", "--max-steps", "-1"], "--max-steps -1: expected an integer >= 1"),
])
def test_a_run_that_cannot_be_what_was_asked_is_refused_before_it_starts(extra, message, model_dir, train_data,
                                                                         tmp_path, capsys):
    extra = [str(model_dir) if arg == "BASE" else arg for arg in extra]
    fails_with_one_line(["finetune", "--config", TINY_LORA, "--data", train_data, "--output-dir", tmp_path, *extra],
                        capsys, message)
    assert not (tmp_path / "checkpoints").exists()


def test_samples_prepared_for_another_seq_length_are_refused_by_name(model_dir, train_data, tmp_path, capsys):
    short = prepare_data(train_data.parent / "d.jsonl", KnowLMTokenizer(vocab_file=str(model_dir)),
                         tmp_path / "short.mindrecord", seq_length=64) and tmp_path / "short.mindrecord"
    fails_with_one_line(["finetune", "--config", TINY_LORA, "--data", short, "--base", model_dir, "--output-dir",
                         tmp_path / "run"], capsys, "samples of 65 tokens, for seq_length 64, but the model trains at "
                        "seq_length 128; run prepare-data with --seq-length 128")


def free_port():
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def test_msrun_data_parallel_on_cpu_ends_with_identical_weights_on_both_ranks(model_dir, train_data, tmp_path):
    env = dict(os.environ, OUTPUT_DIR=str(tmp_path / "launch"), MASTER_PORT=str(free_port()),
               PATH=f"{Path(sys.executable).parent}:{os.environ['PATH']}")
    run = subprocess.run(["bash", str(REPO / "scripts" / "run_distribute.sh"), "msrun", str(TINY_LORA), "2",
                          "finetune", "--data", str(train_data), "--base", str(model_dir),
                          "--output-dir", str(tmp_path / "dp"), "--max-steps", "4", "--set", "use_parallel=True",
                          "--set", "parallel_config.data_parallel=2"],
                         env=env, capture_output=True, text=True, timeout=400, check=False)
    assert run.returncode == 0, run.stdout[-2000:] + run.stderr[-2000:]
    ranks = [lora_state(latest_checkpoint(tmp_path / "dp" / "checkpoints" / f"rank_{r}")) for r in (0, 1)]
    names = [n for n in ranks[0] if "mindpet_delta_lora" in n and not n.startswith("adam")]
    assert len(names) == 28
    for name in names:
        np.testing.assert_array_equal(ranks[0][name], ranks[1][name], err_msg=name)
    assert sorted(p.name for p in (tmp_path / "launch" / "log").glob("worker_*.log")) == ["worker_0.log",
                                                                                          "worker_1.log"]


def test_export_merged_writes_base_plus_scaled_lora_delta(model_dir, train_data, tmp_path):
    from knowlm import KnowLMForCausalLM
    result = finetune(TINY_LORA, data=train_data, base=model_dir, output_dir=tmp_path / "run", max_steps=4,
                      overrides={"lr_schedule.learning_rate": 5.0e-3}, export_merged=tmp_path / "merged")
    merged = {p.name: p.asnumpy() for p in KnowLMForCausalLM.from_pretrained(tmp_path / "merged").get_parameters()}
    base = ms.load_checkpoint(str(model_dir / "mindspore_model.ckpt"))
    lora = lora_state(result.checkpoint)
    for weight in ("model.layers.0.attention.wq.weight", "model.layers.1.feed_forward.w2.weight"):
        stem = weight[:-len("weight")]
        delta = (32 / 16) * lora[stem + "mindpet_delta_lora_b"] @ lora[stem + "mindpet_delta_lora_a"]
        assert np.abs(delta).max() > 0
        np.testing.assert_allclose(merged[weight], base[weight].asnumpy() + delta, atol=1e-6)


def test_full_export_keeps_the_base_config_so_generation_is_not_capped_at_the_training_length(model_dir,
                                                                                             train_data, tmp_path):
    from knowlm import KnowLMForCausalLM
    from knowlm.checkpoints.model_dir import load_config
    result = finetune(CONFIG_DIR / "tiny" / "finetune_full.yaml", data=train_data, base=model_dir,
                      output_dir=tmp_path / "run", max_steps=2, export_merged=tmp_path / "full",
                      overrides={"model.model_config.seq_length": 128})
    assert result.model.config.seq_length == 128 and load_config(model_dir).seq_length == 256
    assert load_config(tmp_path / "full").to_dict() == {**load_config(model_dir).to_dict(), "checkpoint_name_or_path": ""}
    exported = {p.name: p.asnumpy() for p in KnowLMForCausalLM.from_pretrained(tmp_path / "full").get_parameters()}
    for param in result.model.trainable_params():
        np.testing.assert_array_equal(exported[param.name], param.asnumpy(), err_msg=param.name)


def test_full_finetuning_follows_torch_adamw_step_for_step(model_dir, train_data, tmp_path):
    # The reference: the same Hugging Face weights trained in torch on the same batches, in the same order, with
    # AdamW (betas 0.9/0.95, eps 1e-8, no decay), gradient clipping at norm 1 and a constant learning rate.
    import mindspore.dataset as ds
    import torch
    import transformers
    steps, batch, lr = 8, 2, 2.0e-3
    rows = list(ds.MindDataset(str(train_data), columns_list=["input_ids", "labels"], shuffle=False)
                .create_tuple_iterator(output_numpy=True))
    hf = transformers.LlamaForCausalLM.from_pretrained(model_dir.parent / "hf")
    optimizer = torch.optim.AdamW(hf.parameters(), lr=lr, betas=(0.9, 0.95), eps=1e-8, weight_decay=0.0)
    expected = []
    for step in range(steps):
        ids, labels = (torch.tensor(np.stack(column)).long() for column in zip(*rows[step * batch:(step + 1) * batch]))
        logits = hf(input_ids=ids[:, :-1]).logits
        loss = torch.nn.functional.cross_entropy(logits.flatten(0, 1), labels[:, 1:].flatten(), ignore_index=-100)
        optimizer.zero_grad()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(hf.parameters(), 1.0)
        optimizer.step()
        expected.append(loss.item())
    result = finetune(CONFIG_DIR / "tiny" / "finetune_full.yaml", data=train_data, base=model_dir,
                      output_dir=tmp_path, max_steps=steps, overrides={
                          "lr_schedule.learning_rate": lr, "lr_schedule.total_steps": 10 ** 9,
                          "lr_schedule.warmup_ratio": 0.0, "optimizer.betas": [0.9, 0.95],
                          "train_dataset.data_loader.shuffle": False, "model.model_config.seq_length": 128})
    np.testing.assert_allclose(result.losses, expected, rtol=1e-4)
    assert expected[-1] < expected[0] - 1.0
