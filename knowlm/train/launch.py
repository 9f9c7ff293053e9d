"""Launch checks and distributed set-up: ``knowlm check-config`` and ``knowlm rank-table``.

The launchers in ``scripts/`` call ``check-config`` before starting any process, so a yaml whose parallel layout
does not multiply to the device count (MindFormers' old KnowLM config: 16 on 8 cards), whose LoRA targets match
no layer, or whose paths do not exist stops with one line instead of minutes into a multi-card start.
"""
import ipaddress
import json
import os
import re
import shutil
import socket
import subprocess
from pathlib import Path

from knowlm.checkpoints.lora import checked_rank_and_alpha, pet_settings
from knowlm.checkpoints.names import PROJECTION_NAMES, PROJECTIONS
from knowlm.errors import KnowLMError
from knowlm.files import CONFIG_NAME, atomic_write, read_json, refuse_existing
from knowlm.train.config import training_config


def world_size() -> int:
    """Processes in this run: msrun sets MS_WORKER_NUM, a rank-table launch RANK_SIZE."""
    return int(os.environ.get("MS_WORKER_NUM") or os.environ.get("RANK_SIZE") or 1)


def check_config(path, devices=None, config=None, **shaping):
    """Problems of the yaml ``path`` as one-line strings (empty: ready to launch on ``devices``).

    ``shaping`` (data, base, output_dir, overrides) is applied as ``knowlm finetune`` applies it; a ``config``
    already shaped may be passed instead.
    """
    config = config if config is not None else training_config(path, **shaping)
    problems = []
    parallel = config.get("parallel_config") or {}
    layout = {key: int(parallel.get(key, 1) or 1) for key in ("data_parallel", "model_parallel", "pipeline_stage")}
    product = layout["data_parallel"] * layout["model_parallel"] * layout["pipeline_stage"]
    if devices is not None and product != devices:
        problems.append(f"{path}: parallel_config data_parallel x model_parallel x pipeline_stage = "
                        f"{' x '.join(map(str, layout.values()))} = {product}, but {devices} device(s) will run it")
    if devices is not None and devices > 1 and not config.get("use_parallel"):
        problems.append(f"{path}: use_parallel is False but {devices} devices will run it")
    model_config = config.model.model_config
    pet = model_config.get("pet_config")
    if pet:
        targets = re.compile(str(pet.get("target_modules", "")))
        names = [f"model.layers.0.{cell}" for cell in PROJECTIONS]
        if not any(targets.fullmatch(name) or targets.match(name) for name in names):
            problems.append(f"{path}: pet_config.target_modules {pet.get('target_modules')!r} matches no layer; "
                            f"expected a regex over {', '.join(PROJECTION_NAMES)} such as '.*wq|.*wv'")
        try:
            checked_rank_and_alpha(*pet_settings(pet)[:2], f"{path}: pet_config")
        except KnowLMError as err:
            problems.append(str(err))
    vocab, pad = int(model_config.get("vocab_size", 32000)), int(model_config.get("pad_token_id", 0))
    if not 0 <= pad < vocab:
        problems.append(f"{path}: pad_token_id {pad} is not a token of the {vocab}-token vocabulary")
    checkpoint = model_config.get("checkpoint_name_or_path")
    if pet and not checkpoint:
        problems.append(f"{path}: LoRA (pet_config) adapts a base model and none is given; pass --base MODEL_DIR "
                        "or set model.model_config.checkpoint_name_or_path")
    if checkpoint and not Path(checkpoint).exists():
        problems.append(f"{path}: model.model_config.checkpoint_name_or_path {checkpoint!r} does not exist")
    tokenizer_dir = Path(checkpoint) if checkpoint and Path(checkpoint).is_dir() else None
    if tokenizer_dir is not None and (tokenizer_dir / CONFIG_NAME).is_file():
        saved_vocab = read_json(tokenizer_dir / CONFIG_NAME).get("vocab_size")
        if saved_vocab is not None and saved_vocab != vocab:
            problems.append(f"{path}: vocab_size {vocab}, but the weights in {checkpoint} have {saved_vocab}")
    dataset = (config.get("train_dataset") or {}).get("data_loader", {}).get("dataset_dir")
    if config.get("run_mode") in ("finetune", "train") and not dataset:
        problems.append(f"{path}: no training data; pass --data FILE.mindrecord (from knowlm prepare-data) or set "
                        "train_dataset.data_loader.dataset_dir")
    elif config.get("run_mode") in ("finetune", "train") and not Path(dataset).is_file():
        problems.append(f"{path}: train_dataset.data_loader.dataset_dir {dataset!r} does not exist")
    return problems


def _device_ips_from_hccn(device_ids):
    if shutil.which("hccn_tool") is None:
        raise KnowLMError("hccn_tool not found (it comes with the Ascend driver); pass --device-ips "
                          "<ip,ip,...> with one address per device")
    ips = []
    for device in device_ids:
        out = subprocess.run(["hccn_tool", "-i", str(device), "-ip", "-g"], capture_output=True, text=True,
                             check=False).stdout
        match = re.search(r"ipaddr:\s*(\S+)", out)
        if not match:
            raise KnowLMError(f"hccn_tool -i {device} -ip -g: no ipaddr in its output; is the NPU configured?")
        ips.append(match.group(1))
    return ips


def rank_table(device_ids, output, server_ip=None, device_ips=None, force=False):
    """Write the HCCL rank-table JSON (version 1.0, one server) for ``device_ids``; returns its dict.

    Device IPs come from ``hccn_tool`` on an Ascend host, or from ``device_ips``.
    """
    output = refuse_existing(output, force)
    device_ids = list(device_ids)
    if len(set(device_ids)) != len(device_ids) or any(d < 0 or d > 15 for d in device_ids):
        raise KnowLMError(f"devices {device_ids}: expected distinct device ids between 0 and 15")
    ips = list(device_ips) if device_ips else _device_ips_from_hccn(device_ids)
    if len(ips) != len(device_ids):
        raise KnowLMError(f"{len(ips)} device IPs for {len(device_ids)} devices; expected one per device")
    server_ip = server_ip or socket.gethostbyname(socket.gethostname())
    for address in [server_ip, *ips]:
        try:
            ipaddress.ip_address(address)
        except ValueError:
            raise KnowLMError(f"{address!r} is not an IP address") from None
    table = {"version": "1.0", "server_count": "1",
             "server_list": [{"server_id": server_ip, "host_nic_ip": "reserve",
                              "device": [{"device_id": str(d), "device_ip": ip, "rank_id": str(rank)}
                                         for rank, (d, ip) in enumerate(zip(device_ids, ips))]}],
             "status": "completed"}
    atomic_write(output, lambda tmp: tmp.write_text(json.dumps(table, indent=2) + "\n", encoding="utf-8"))
    return table


def parse_devices(text: str) -> list:
    """``"0-8"`` (start inclusive, end exclusive, as the launchers' [START,END]) or ``"0,1,4"``."""
    try:
        if "-" in text:
            start, end = map(int, text.split("-"))
            return list(range(start, end))
        return [int(part) for part in text.split(",")]
    except ValueError:
        raise KnowLMError(f"devices {text!r}: expected START-END (end exclusive) or a comma list") from None
