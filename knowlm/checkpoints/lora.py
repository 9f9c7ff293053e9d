"""LoRA adapters on disk: merge a MindFormers LoRA checkpoint into its base, import a PEFT adapter, read and write
the settings (``adapter_config.json``). Attaching one to a model at run time: ``knowlm.models.lora``.

MindFormers' LoRA (``mindformers.pet.get_pet_model`` with ``LoraConfig``) replaces each targeted ``Linear`` by
mindpet's ``LoRADense``, adding two parameters beside the frozen weight ``<module>.weight`` of shape (out, in)::

    <module>.mindpet_delta_lora_a   (rank, in)      = PEFT's lora_A.weight
    <module>.mindpet_delta_lora_b   (out, rank)     = PEFT's lora_B.weight
    y = x W^T + (alpha / rank) * (x A^T) B^T,   so the merged weight is W + (alpha / rank) * B @ A.

LoRA names are derived from base names (``knowlm.checkpoints.names``), never listed twice. ``alpha`` and ``rank``
come from the run's settings (yaml ``model.model_config.pet_config`` or ``adapter_config.json``); a pet_config that
leaves one out used ``LoraConfig``'s default in training, so that default is what is read here.

A knowlm LoRA adapter directory holds ``adapter_config.json`` (PEFT's format: ``r``, ``lora_alpha``,
``lora_dropout``, ``target_modules`` as regular expressions over MindFormers' cell names) and
``adapter_model.ckpt``; a training run writes the same file beside its checkpoints.
"""
import inspect
import math
import re
import time
from pathlib import Path

import numpy as np
import yaml
from mindformers.pet import LoraConfig

from knowlm.checkpoints import stream
from knowlm.checkpoints.summary import make_summary, progress_bar
from knowlm.checkpoints.hf import HFShard, HFTensor, checked_cast, import_torch, write_mindspore
from knowlm.checkpoints.model_dir import checkpoint_files, load_config
from knowlm.checkpoints.names import (LORA_A, LORA_B, PROJECTION_WEIGHT, expected_shapes, hf_to_mindspore_name,
                                      listing, lora_name)
from knowlm.checkpoints.quant import INT8, PACKED, dequantize_q8_0, logical_shape, storage_of
from knowlm.errors import KnowLMError, first_line
from knowlm.tokenizer.load import tokenizer_files
from knowlm.files import (ADAPTER_CONFIG, ADAPTER_WEIGHTS, CONFIG_NAME, WEIGHTS_GLOB,
                          WEIGHTS_INDEX_NAME, atomic_copy, read_json, staged_output, write_json)

_PEFT_NAME = re.compile(r"^base_model\.model\.(.+)\.lora_([AB])\.weight$")
# PEFT features that change the computation beyond W + (alpha/r)·B·A: each must be off.
_PEFT_UNSUPPORTED = ("use_dora", "lora_bias", "modules_to_save", "layers_to_transform", "rank_pattern",
                     "alpha_pattern", "fan_in_fan_out", "layer_replication", "trainable_token_indices",
                     "target_parameters", "use_qalora", "use_bdlora", "alora_invocation_tokens")


def read_lora_settings(path) -> tuple:
    """``(rank, alpha, target_modules)`` from a run's yaml (``model.model_config.pet_config``) or a json file."""
    path = Path(path)
    try:
        values = yaml.safe_load(path.read_text(encoding="utf-8"))      # JSON is YAML too
    except (OSError, UnicodeDecodeError, yaml.YAMLError) as err:
        raise KnowLMError(f"{path}: not a readable yaml or json file ({first_line(err)})") from None
    values = values if isinstance(values, dict) else {}
    pet_config = _dig(values, "model", "model_config", "pet_config") or values.get("pet_config")
    if isinstance(pet_config, dict):       # a MindFormers run: what its pet_config leaves out, LoraConfig defaulted
        settings = {**_lora_config_defaults(), **pet_config}
        kind, rank = settings.get("pet_type"), settings.get("lora_rank")
    elif "r" in values or "lora_rank" in values:                        # adapter_config.json
        settings = values
        kind, rank = values.get("peft_type", "lora"), values.get("r", values.get("lora_rank"))
    else:
        raise KnowLMError(f"{path}: no LoRA settings; expected model.model_config.pet_config (lora_rank, "
                          f"lora_alpha) or an {ADAPTER_CONFIG} (r, lora_alpha)")
    if str(kind).lower() != "lora":
        raise KnowLMError(f"{path}: {kind!r} is not LoRA")
    return (*checked_rank_and_alpha(rank, settings.get("lora_alpha"), path), settings.get("target_modules"))


def checked_rank_and_alpha(rank, alpha, where) -> tuple:
    """``(int rank, float alpha)``; one line naming ``where`` unless rank is a positive integer and alpha a number."""
    try:
        rank, alpha = int(rank), float(alpha)
    except (TypeError, ValueError):
        raise KnowLMError(f"{where}: LoRA rank {rank!r} and lora_alpha {alpha!r}: expected numbers") from None
    if rank <= 0:
        raise KnowLMError(f"{where}: LoRA rank {rank}: expected a positive integer")
    return rank, alpha


def pet_settings(pet_config) -> tuple:
    """``(rank, alpha, target_modules, dropout)`` a MindFormers ``pet_config`` trains with (``LoraConfig``'s
    defaults for what it leaves out)."""
    settings = {**_lora_config_defaults(), **pet_config}
    return (settings.get("lora_rank"), settings.get("lora_alpha"), settings.get("target_modules"),
            settings.get("lora_dropout"))


def adapter_config(rank, alpha, target_modules, dropout=0.0, base=None) -> dict:
    """``adapter_config.json``'s values in PEFT's format: what ``merge-lora`` and ``read_lora_settings`` read."""
    return {"base_model_name_or_path": str(base or "none"), "bias": "none", "lora_alpha": float(alpha),
            "lora_dropout": float(dropout), "peft_type": "LORA", "r": int(rank), "target_modules": target_modules,
            "task_type": "CAUSAL_LM"}


def write_adapter_config(directory, rank, alpha, target_modules, dropout=0.0, base=None):
    return write_json(Path(directory) / ADAPTER_CONFIG, adapter_config(rank, alpha, target_modules, dropout, base))


def _dig(values, *keys):
    for key in keys:
        values = values.get(key) if isinstance(values, dict) else None
    return values


def _lora_config_defaults():
    return {name: p.default for name, p in inspect.signature(LoraConfig).parameters.items()}


def _as_tensor(entry):
    """``entry``'s values as a torch tensor: its own dtype, or float32 dequantized for a Q8_0 (uint8) tensor."""
    torch = import_torch()
    if entry.dtype == PACKED:
        packed = np.frombuffer(entry.read(), np.uint8).reshape(entry.shape)
        return torch.from_numpy(dequantize_q8_0(packed, where=f"{entry.path}: tensor {entry.name!r}"))
    return torch.frombuffer(bytearray(entry.read()), dtype=getattr(torch, entry.dtype)).reshape(entry.shape)


# ------------------------------------------------------------------------------------------------ merge

def merge_lora(base_dir, lora, output_dir, lora_config=None, force=False, echo=None):
    """Write base model directory ``base_dir`` with LoRA checkpoint ``lora`` merged in, as ``output_dir``.

    ``lora``: a ``.ckpt`` file (a MindFormers training checkpoint: frozen weights and optimizer state in it are
    ignored) or an adapter directory. ``lora_config``: the run's yaml or ``adapter_config.json``; by default the
    ``adapter_config.json`` beside ``lora``. Every weight is W + (alpha / rank) * B @ A, computed in float64 and
    rounded once to the base's dtype; a merged weight that overflows that dtype, or holds inf or nan (a diverged
    run), is refused. An int8 (Q8_0) base is merged from its dequantized values and written as float32, every 2-D
    weight dequantized, with ``param_init_type`` float32 in its config.json. The checksums of the base and LoRA
    files are checked before anything is written, and the result is published only when complete: a failure leaves
    ``output_dir`` as it was, or absent.
    """
    start = time.time()
    base_dir, lora, output_dir = Path(base_dir), Path(lora), Path(output_dir)
    expected = expected_shapes(load_config(base_dir))
    files = checkpoint_files(base_dir)
    shards = stream.validate(files, expected, base_dir)
    int8 = storage_of(shards) == INT8
    settings = Path(lora_config) if lora_config else (lora if lora.is_dir() else lora.parent) / ADAPTER_CONFIG
    if not settings.is_file():
        raise KnowLMError(f"{settings}: not found; pass lora_config (--lora-config): the run's yaml or "
                          f"{ADAPTER_CONFIG}, for LoRA's alpha and rank (they are not guessed)")
    rank, alpha, _ = read_lora_settings(settings)
    pairs = _lora_pairs(adapter_files(lora), expected, rank)
    copied = [WEIGHTS_INDEX_NAME] if (base_dir / WEIGHTS_INDEX_NAME).is_file() else []
    copied += [path.name for path in tokenizer_files(base_dir)]
    with staged_output(output_dir, [*(path.name for path in files), *copied, CONFIG_NAME], force,
                       source_dir=base_dir, stale=WEIGHTS_GLOB) as tmps:
        if echo:
            echo(f"knowlm merge-lora: {base_dir} + {lora} ({len(pairs)} LoRA pairs, rank {rank}, alpha {alpha:g}, "
                 f"scale {alpha / rank:g}) -> {output_dir}")
        with progress_bar(sum(e.nbytes for e in shards), "merge") as bar:
            for path, tmp in zip(files, tmps):
                entries = [e for e in shards if e.path == str(path)]
                _write_merged(tmp, entries, pairs, alpha / rank, bar, lora)
        written = stream.validate(tmps[:len(files)], expected, output_dir, checksum=False)
        for name, tmp in zip([*copied, CONFIG_NAME], tmps[len(files):]):
            if int8 and name in (CONFIG_NAME, WEIGHTS_INDEX_NAME):     # float32 now: config and byte count
                _write_float32(base_dir / name, tmp, written)
            else:
                atomic_copy(base_dir / name, tmp)
    return make_summary("merged", output_dir, written,
                        "float32 dequantized from int8" if int8 else written[0].dtype, start)


def _write_float32(source, tmp, written):
    values = read_json(source)
    if source.name == CONFIG_NAME:
        values.update(param_init_type="float32", embedding_init_type="float32", compute_dtype="float32")
    else:
        values.setdefault("metadata", {})["total_size"] = sum(e.nbytes for e in written)
    write_json(tmp, values)


def adapter_files(lora: Path) -> list:
    if lora.is_file():
        return [lora]
    if (lora / ADAPTER_WEIGHTS).is_file():
        return [lora / ADAPTER_WEIGHTS]
    found = sorted(lora.glob("*.ckpt"))
    if len(found) != 1:
        raise KnowLMError(f"{lora}: expected {ADAPTER_WEIGHTS} or a single .ckpt file, found "
                          f"{len(found)} .ckpt files")
    return found


def _lora_pairs(files, expected, rank) -> dict:
    """Base weight name -> (A, B) tensors, checked against the base's shapes and the configured rank."""
    found = {}
    for path in files:
        for entry in stream.verify(path):
            # Optimizer state (adam_m.<name>, accu_grads.<name>, ...) carries the same suffixes: network
            # parameters are the ones under model. / lm_head.
            if entry.name.endswith((LORA_A, LORA_B)) and entry.name.startswith(("model.", "lm_head.")):
                found[entry.name] = entry
    if not found:
        raise KnowLMError(f"{', '.join(map(str, files))}: no LoRA tensors (names ending in {LORA_A} / {LORA_B})")
    pairs = {}
    for name, entry in found.items():
        weight = name.removesuffix(LORA_A if name.endswith(LORA_A) else LORA_B) + "weight"
        if len(expected.get(weight, ())) != 2:
            raise KnowLMError(f"{entry.path}: LoRA tensor {name!r} has no base projection {weight!r} in this model")
        a, b = found.get(lora_name(weight, LORA_A)), found.get(lora_name(weight, LORA_B))
        if a is None or b is None:
            raise KnowLMError(f"{entry.path}: LoRA tensor {name!r} has no partner "
                              f"{lora_name(weight, LORA_A if a is None else LORA_B)!r}")
        out_features, in_features = expected[weight]
        if a.shape != (rank, in_features) or b.shape != (out_features, rank):
            raise KnowLMError(f"{entry.path}: LoRA pair of {weight!r} has shapes {a.shape} and {b.shape}, expected "
                              f"{(rank, in_features)} and {(out_features, rank)} for rank {rank} from the config")
        pairs[weight] = (_as_tensor(a), _as_tensor(b))
    return pairs


def _write_merged(tmp, entries, pairs, scale, bar, lora):
    torch = import_torch()
    with stream.writer(tmp) as f:
        for entry in entries:
            dtype = "float32" if entry.dtype == PACKED else entry.dtype       # Q8_0 bases come out float32
            if entry.name in pairs:
                a, b = pairs[entry.name]
                merged = _as_tensor(entry).double() + scale * (b.double() @ a.double())
                merged = checked_cast(merged, dtype, f"{lora}: {entry.name!r} with the LoRA merged in",
                                      check_finite=True, hint="merge into an fp32 base" if dtype != "float32"
                                      else "check the LoRA run")
            else:
                merged = _as_tensor(entry) if entry.dtype == PACKED else None
            data = entry.read() if merged is None else merged.contiguous().reshape(-1).view(torch.uint8).numpy()
            stream.write_tensor(f, entry.name, logical_shape(entry.shape, entry.dtype), dtype, data)
            bar.update(entry.nbytes)


# ----------------------------------------------------------------------------------------------- PEFT

def import_peft_adapter(adapter_dir, output_dir, force=False, echo=None):
    """Write PEFT LoRA adapter ``adapter_dir`` (``adapter_config.json`` + ``adapter_model.safetensors|.bin``)
    as a knowlm adapter directory in MindFormers' LoRA names; features beyond plain LoRA are refused by name."""
    start = time.time()
    adapter_dir, output_dir = Path(adapter_dir), Path(output_dir)
    config_path = adapter_dir / ADAPTER_CONFIG
    peft = read_json(config_path)
    if peft.get("peft_type") != "LORA":
        raise KnowLMError(f"{config_path}: peft_type {peft.get('peft_type')!r} is not supported; expected 'LORA'")
    for key in _PEFT_UNSUPPORTED:
        if peft.get(key) not in (None, False, {}, [], ""):
            raise KnowLMError(f"{config_path}: {key}={peft[key]!r} is not supported; MindFormers' LoRA computes "
                              "W + (alpha/r)·B·A only")
    if peft.get("bias", "none") != "none":
        raise KnowLMError(f"{config_path}: bias={peft['bias']!r} is not supported; expected 'none'")
    rank = int(peft["r"])
    # rsLoRA scales by alpha / sqrt(r); MindFormers by alpha / r: the same scale with alpha * sqrt(r).
    alpha = float(peft["lora_alpha"]) * (math.sqrt(rank) if peft.get("use_rslora") else 1.0)
    weights = next((adapter_dir / name for name in ("adapter_model.safetensors", "adapter_model.bin")
                    if (adapter_dir / name).is_file()), None)
    if weights is None:
        raise KnowLMError(f"{adapter_dir}: no adapter_model.safetensors or adapter_model.bin")
    entries = _peft_entries(HFShard(weights), rank)
    if echo:
        echo(f"knowlm import-peft: {adapter_dir} ({len(entries)} tensors, rank {rank}, alpha {alpha:g}) "
             f"-> {output_dir}")
    dtype = entries[0].dtype
    with staged_output(output_dir, [ADAPTER_WEIGHTS, ADAPTER_CONFIG], force, source_dir=adapter_dir,
                       marker=ADAPTER_CONFIG, stale=ADAPTER_WEIGHTS) as (weights_tmp, config_tmp):
        with progress_bar(sum(e.nbytes for e in entries), "import") as bar:
            write_mindspore(weights_tmp, entries, dtype, bar)
        written = stream.validate([weights_tmp], {e.name: e.shape for e in entries}, output_dir, checksum=False)
        cells = sorted({e.name.split(".")[-2] for e in entries})
        write_adapter_config(config_tmp.parent, rank, alpha, [f".*{cell}" for cell in cells],
                             dropout=peft.get("lora_dropout") or 0.0, base=peft.get("base_model_name_or_path"))
    return make_summary("imported", output_dir, written, dtype, start)


def _peft_entries(shard, rank) -> list:
    entries, unknown, parts = [], [], {}
    for name, (shape, dtype) in shard.headers.items():
        match = _PEFT_NAME.match(name)
        weight = _mindspore_weight(match.group(1) + ".weight") if match else None
        if weight is None or not PROJECTION_WEIGHT.match(weight):
            unknown.append(name)
            continue
        part = LORA_A if match.group(2) == "A" else LORA_B
        if shape[0 if part == LORA_A else 1] != rank:
            raise KnowLMError(f"{shard.path}: {name!r} has shape {shape}, which does not fit r={rank}")
        entries.append(HFTensor(lora_name(weight, part), shape, dtype, str(shard.path), name, shard.nbytes(name)))
        parts.setdefault(match.group(1), []).append(part)
    if unknown or not entries:
        raise KnowLMError(f"{shard.path}: tensor(s) {listing(unknown)} are not LoRA A/B matrices of LLaMA's "
                          "attention or MLP projections")
    unpaired = [module for module, found in parts.items() if len(found) != 2]
    if unpaired:
        raise KnowLMError(f"{shard.path}: LoRA module(s) {listing(unpaired)} lack lora_A or lora_B")
    return entries


def _mindspore_weight(hf_name):
    try:
        return hf_to_mindspore_name(hf_name)
    except KnowLMError:
        return None
