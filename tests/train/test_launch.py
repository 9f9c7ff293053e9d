"""Launch checks: check-config, the HCCL rank table, and the rank-table launcher's per-rank environment."""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from knowlm import KnowLMError
from knowlm.cli import main
from knowlm.files import CONFIG_DIR
from knowlm.train.launch import check_config, parse_devices, rank_table

REPO = Path(__file__).resolve().parents[2]
LORA_13B = CONFIG_DIR / "knowlm_13b" / "finetune_lora.yaml"
TINY_LORA = CONFIG_DIR / "tiny" / "finetune_lora.yaml"
DEVICE_IPS = [f"192.98.{i % 4}.{10 + i}" for i in range(8)]


@pytest.fixture
def paths(tmp_path):
    """The paths a run reads, as check-config wants them to exist: training data and a base model."""
    (tmp_path / "train.mindrecord").write_bytes(b"")
    (tmp_path / "base").mkdir()
    return {"data": tmp_path / "train.mindrecord", "base": tmp_path / "base"}


def test_13b_lora_yaml_fits_eight_devices_and_not_sixteen(paths):
    assert check_config(LORA_13B, devices=8, **paths) == []
    assert "= 8, but 16 device(s) will run it" in check_config(LORA_13B, devices=16, **paths)[0]


@pytest.mark.parametrize("yaml", [LORA_13B, CONFIG_DIR / "knowlm_13b" / "run_knowlm_13b.yaml"])
def test_a_lora_run_without_base_model_or_data_is_not_ready(yaml, paths):
    problems = check_config(yaml, devices=8)
    assert len(problems) == 2
    assert "LoRA (pet_config) adapts a base model and none is given; pass --base" in problems[0]
    assert "no training data; pass --data" in problems[1]
    assert len(check_config(yaml, devices=8, data=paths["data"])) == 1
    assert check_config(yaml, devices=8, **paths) == []


def test_13b_lora_yaml_carries_the_zhixi_recipe():
    import yaml
    pet = yaml.safe_load(LORA_13B.read_text())["model"]["model_config"]["pet_config"]
    assert (pet["lora_rank"], pet["lora_alpha"], pet["lora_dropout"]) == (16, 32, 0.05)
    assert set(pet["target_modules"].replace(".*", "").split("|")) == {"wq", "wk", "wv", "wo", "w1", "w2", "w3"}


@pytest.mark.parametrize("overrides, problem", [
    ({"model.model_config.pet_config.target_modules": ".*query|.*value"}, "matches no layer"),
    ({"model.model_config.pad_token_id": 1000}, "pad_token_id 1000 is not a token of the 1000-token vocabulary"),
    ({"model.model_config.checkpoint_name_or_path": "/nonexistent/model"}, "'/nonexistent/model' does not exist"),
    ({"train_dataset.data_loader.dataset_dir": "/nonexistent/train.mindrecord"}, "does not exist"),
])
def test_check_config_names_each_problem(overrides, problem, paths):
    problems = check_config(TINY_LORA, devices=1, overrides=overrides, **paths)
    assert len(problems) == 1 and problem in problems[0]


@pytest.mark.parametrize("key, value, message", [
    ("runner_config.epoch", "3", "--set runner_config.epoch: "),          # a typo of epochs
    ("optimiser.betas", "[0.9, 0.95]", "--set optimiser.betas: "),
    ("model.model_config.pet_config.lora_rank", "0", "pet_config.lora_rank 0: expected an integer >= 1"),
    ("model.model_config.pet_config.lora_dropout", "1.5", "pet_config.lora_dropout 1.5: expected a number in [0, 1)"),
])
def test_a_set_key_the_yaml_lacks_or_a_lora_value_out_of_range_is_refused(key, value, message, paths, capsys):
    argv = ["check-config", str(TINY_LORA), "--data", str(paths["data"]), "--base", str(paths["base"])]
    assert main([*argv, "--set", f"{key}={value}"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and message in err


def test_lora_numbers_written_as_integers_are_what_mindformers_expects(paths):
    from knowlm.train.config import training_config
    config = training_config(TINY_LORA, overrides={"model.model_config.pet_config.lora_dropout": 0,
                                                   "model.model_config.n_kv_heads": 2}, **paths)
    assert isinstance(config.model.model_config.pet_config.lora_dropout, float)
    assert config.model.model_config.n_kv_heads == 2          # a model setting the yaml leaves at its default


def test_check_config_cli_fails_with_one_line(capsys):
    assert main(["check-config", str(TINY_LORA), "--devices", "2"]) == 2
    assert capsys.readouterr().err.count("\n") == 1


def test_rank_table_is_valid_hccl_json(tmp_path):
    out = tmp_path / "hccl_8p.json"
    assert main(["rank-table", "--devices", "0-8", "--output", str(out), "--server-ip", "10.0.0.5",
                 "--device-ips", ",".join(DEVICE_IPS)]) == 0
    table = json.loads(out.read_text())
    assert (table["version"], table["server_count"], table["status"]) == ("1.0", "1", "completed")
    devices = table["server_list"][0]["device"]
    assert table["server_list"][0]["server_id"] == "10.0.0.5"
    assert [(d["device_id"], d["rank_id"], d["device_ip"]) for d in devices] == \
        [(str(i), str(i), DEVICE_IPS[i]) for i in range(8)]
    with pytest.raises(KnowLMError, match="already exists; pass --force"):
        rank_table(range(8), out, device_ips=DEVICE_IPS)


@pytest.mark.parametrize("kwargs, message", [
    (dict(device_ids=[0, 0], device_ips=DEVICE_IPS[:2]), "distinct device ids"),
    (dict(device_ids=range(4), device_ips=DEVICE_IPS[:3]), "3 device IPs for 4 devices"),
    (dict(device_ids=range(2), device_ips=["1.2.3", "1.2.3.4"]), "'1.2.3' is not an IP address"),
])
def test_rank_table_refuses_bad_input(tmp_path, kwargs, message):
    with pytest.raises(KnowLMError, match=message):
        rank_table(output=tmp_path / "t.json", server_ip="10.0.0.5", **kwargs)


def test_devices_parse_as_launcher_ranges():
    assert parse_devices("0-8") == list(range(8)) and parse_devices("4,5") == [4, 5]
    with pytest.raises(KnowLMError, match="expected START-END"):
        parse_devices("a-b")


def test_launchers_find_a_config_by_the_name_mindformers_page_gives(tmp_path, paths):
    env = dict(os.environ, DRY_RUN="1", OUTPUT_DIR=str(tmp_path / "out"),
               PATH=f"{Path(sys.executable).parent}:{os.environ['PATH']}")
    run = subprocess.run(["bash", str(REPO / "scripts" / "run_distribute.sh"), "msrun", "run_knowlm_13b.yaml", "8",
                          "finetune", "--data", str(paths["data"]), "--base", str(paths["base"])],
                         env=env, capture_output=True, text=True, timeout=120, check=False, cwd=tmp_path)
    assert run.returncode == 0, run.stderr[-2000:]
    assert f"finetune --config {CONFIG_DIR / 'knowlm_13b' / 'run_knowlm_13b.yaml'} --data" in run.stdout
    run = subprocess.run(["bash", str(REPO / "scripts" / "run_standalone.sh"), "no_such.yaml", "0", "finetune"],
                         env=env, capture_output=True, text=True, timeout=120, check=False, cwd=tmp_path)
    assert run.returncode == 2 and run.stderr.count("\n") == 1 and "no_such.yaml: config not found" in run.stderr


def test_rank_table_launch_sets_each_ranks_environment(tmp_path, paths):
    table = tmp_path / "hccl_4p.json"
    rank_table(range(4, 8), table, server_ip="10.0.0.5", device_ips=DEVICE_IPS[:4])
    env = dict(os.environ, DRY_RUN="1", OUTPUT_DIR=str(tmp_path / "out"),
               PATH=f"{Path(sys.executable).parent}:{os.environ['PATH']}")
    run = subprocess.run(["bash", str(REPO / "scripts" / "run_distribute.sh"), str(table), str(TINY_LORA), "[4,8]",
                          "finetune", "--set", "use_parallel=True", "--set", "parallel_config.data_parallel=4",
                          "--data", str(paths["data"]), "--base", str(paths["base"])],
                         env=env, capture_output=True, text=True, timeout=120, check=False)
    assert run.returncode == 0, run.stderr[-2000:]
    lines = [line for line in run.stdout.splitlines() if line.startswith("rank ")]
    assert lines == [f"rank {r}: RANK_TABLE_FILE={table} RANK_SIZE=4 RANK_ID={r} DEVICE_ID={r + 4} knowlm finetune "
                     f"--config {TINY_LORA} --set use_parallel=True --set parallel_config.data_parallel=4 "
                     f"--data {paths['data']} --base {paths['base']}" for r in range(4)]


def test_launcher_refuses_a_layout_that_does_not_fit(tmp_path, paths):
    table = tmp_path / "hccl_2p.json"
    rank_table(range(2), table, server_ip="10.0.0.5", device_ips=DEVICE_IPS[:2])
    run = subprocess.run(["bash", str(REPO / "scripts" / "run_distribute.sh"), str(table), str(TINY_LORA), "[0,2]",
                          "finetune", "--data", str(paths["data"]), "--base", str(paths["base"])], env=dict(os.environ, DRY_RUN="1", OUTPUT_DIR=str(tmp_path / "out"),
                                                PATH=f"{Path(sys.executable).parent}:{os.environ['PATH']}"),
                         capture_output=True, text=True, timeout=120, check=False)
    assert run.returncode == 2 and "but 2 device(s) will run it" in run.stderr
