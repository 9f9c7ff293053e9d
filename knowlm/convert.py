"""Hugging Face LLaMA checkpoints <-> knowlm model directories, streamed one tensor at a time.

Hugging Face stores LLaMA in the rotate-half layout that MindFormers also uses, so conversion is renaming only:
no q/k permutation (that is needed only for Meta's original ``.pth`` files) and no transposes, shapes equal.
``HF_TO_MINDSPORE`` is the single source of truth for names and ``HF_CONFIG_TO_KNOWLM`` for config keys; the
reverse directions are derived from them.

``convert_checkpoint`` (``knowlm convert``) reads ``.bin`` shards with ``torch.load(weights_only=True,
mmap=True)`` (a pickle that would run code is refused, nothing of it runs) and ``.safetensors`` with
``safe_open``; it checks every name, shape and dtype before writing, writes one MindSpore shard per input shard
with ``knowlm.ckpt_stream`` (so memory stays near one input shard), renames each file only when complete, and
re-reads what it wrote. ``export_checkpoint`` (``knowlm export``) writes the reverse as safetensors shards.
"""
import json
import re
import struct
import time
from dataclasses import dataclass
from math import prod
from pathlib import Path

from tqdm import tqdm

from knowlm import ckpt_stream
from knowlm.ckpt_stream import DTYPE_ALIASES, DTYPES
from knowlm.config import KnowLMConfig
from knowlm.errors import KnowLMError
from knowlm.pretrained import (CONFIG_NAME, TOKENIZER_NAME, WEIGHTS_INDEX_NAME, WEIGHTS_NAME, atomic_copy,
                               atomic_write, checkpoint_files, index_shards, load_config, prepare_output_dir,
                               write_json)

# Hugging Face name -> MindFormers name; "{}" is the layer index.
HF_TO_MINDSPORE = {
    "model.embed_tokens.weight": "model.tok_embeddings.embedding_weight",
    "model.layers.{}.self_attn.q_proj.weight": "model.layers.{}.attention.wq.weight",
    "model.layers.{}.self_attn.k_proj.weight": "model.layers.{}.attention.wk.weight",
    "model.layers.{}.self_attn.v_proj.weight": "model.layers.{}.attention.wv.weight",
    "model.layers.{}.self_attn.o_proj.weight": "model.layers.{}.attention.wo.weight",
    "model.layers.{}.mlp.gate_proj.weight": "model.layers.{}.feed_forward.w1.weight",
    "model.layers.{}.mlp.down_proj.weight": "model.layers.{}.feed_forward.w2.weight",
    "model.layers.{}.mlp.up_proj.weight": "model.layers.{}.feed_forward.w3.weight",
    "model.layers.{}.input_layernorm.weight": "model.layers.{}.attention_norm.weight",
    "model.layers.{}.post_attention_layernorm.weight": "model.layers.{}.ffn_norm.weight",
    "model.norm.weight": "model.norm_out.weight",
    "lm_head.weight": "lm_head.weight",
    # Rotary frequencies are recomputed from rope_theta; old checkpoints store them per layer.
    "model.layers.{}.self_attn.rotary_emb.inv_freq": None,
}
MINDSPORE_TO_HF = {ms: hf for hf, ms in HF_TO_MINDSPORE.items() if ms is not None}

# Shape of each MindFormers tensor in config terms (kv = n_kv_heads * head_dim, ffn = intermediate_size).
_SHAPES = {
    "model.tok_embeddings.embedding_weight": ("vocab", "hidden"),
    "model.layers.{}.attention.wq.weight": ("hidden", "hidden"),
    "model.layers.{}.attention.wk.weight": ("kv", "hidden"),
    "model.layers.{}.attention.wv.weight": ("kv", "hidden"),
    "model.layers.{}.attention.wo.weight": ("hidden", "hidden"),
    "model.layers.{}.feed_forward.w1.weight": ("ffn", "hidden"),
    "model.layers.{}.feed_forward.w2.weight": ("hidden", "ffn"),
    "model.layers.{}.feed_forward.w3.weight": ("ffn", "hidden"),
    "model.layers.{}.attention_norm.weight": ("hidden",),
    "model.layers.{}.ffn_norm.weight": ("hidden",),
    "model.norm_out.weight": ("hidden",),
    "lm_head.weight": ("vocab", "hidden"),
}

# Hugging Face config.json key -> KnowLMConfig key. Keys absent from config.json keep KnowLMConfig's defaults,
# which equal transformers' LlamaConfig defaults for all but the sizes, and those are required.
HF_CONFIG_TO_KNOWLM = {
    "hidden_size": "hidden_size",
    "num_hidden_layers": "num_layers",
    "num_attention_heads": "num_heads",
    "num_key_value_heads": "n_kv_heads",
    "intermediate_size": "intermediate_size",
    "vocab_size": "vocab_size",
    "rms_norm_eps": "rms_norm_eps",
    "rope_theta": "theta",
    "max_position_embeddings": "max_position_embedding",
    "tie_word_embeddings": "tie_word_embeddings",
    "bos_token_id": "bos_token_id",
    "eos_token_id": "eos_token_id",
    "pad_token_id": "pad_token_id",
}
_REQUIRED_HF_KEYS = ("hidden_size", "num_hidden_layers", "num_attention_heads", "intermediate_size", "vocab_size")
# Settings knowlm's LLaMA does not implement: key -> the only value accepted (an absent key is accepted).
_HF_SETTINGS = {"model_type": "llama", "hidden_act": "silu", "rope_scaling": None, "attention_bias": False,
                "mlp_bias": False}

HF_SAFETENSORS, HF_SAFETENSORS_INDEX = "model.safetensors", "model.safetensors.index.json"
HF_BIN, HF_BIN_INDEX = "pytorch_model.bin", "pytorch_model.bin.index.json"
_HF_WEIGHTS = {"safetensors": (HF_SAFETENSORS_INDEX, HF_SAFETENSORS), "bin": (HF_BIN_INDEX, HF_BIN)}
MINDSPORE_WEIGHTS = f"{Path(WEIGHTS_NAME).stem}*.ckpt*"     # every weight file of a knowlm directory
# safetensors dtype codes in torch's names (the unsupported ones only for messages).
_SAFETENSORS_DTYPES = {**{dtype.safetensors: name for name, dtype in DTYPES.items()}, "F64": "float64",
                       "I64": "int64", "I32": "int32", "I16": "int16", "I8": "int8", "U8": "uint8", "BOOL": "bool"}


def _compile(table):
    return [(re.compile("^" + re.escape(src).replace(r"\{\}", r"(\d+)") + "$"), dst) for src, dst in table.items()]


_HF_PATTERNS = _compile(HF_TO_MINDSPORE)
_MINDSPORE_PATTERNS = _compile(MINDSPORE_TO_HF)
_UNKNOWN = object()


def _lookup(name, patterns):
    for pattern, target in patterns:
        match = pattern.match(name)
        if match:
            return target.replace("{}", match.group(1)) if target and match.groups() else target
    return _UNKNOWN


def _rename(name, patterns, source):
    target = _lookup(name, patterns)
    if target is _UNKNOWN:
        raise KnowLMError(f"unknown {source} tensor name {name!r}; expected LLaMA names such as "
                          f"{next(iter(HF_TO_MINDSPORE if source == 'Hugging Face' else MINDSPORE_TO_HF))!r}")
    return target


def hf_to_mindspore_name(name: str):
    """The MindFormers name of Hugging Face tensor ``name``, or None for tensors dropped on purpose."""
    return _rename(name, _HF_PATTERNS, "Hugging Face")


def mindspore_to_hf_name(name: str) -> str:
    return _rename(name, _MINDSPORE_PATTERNS, "MindSpore")


def expected_shapes(config) -> dict:
    """Every MindFormers tensor a model of ``config`` has, with its shape (no model is built)."""
    head_dim = config.hidden_size // config.num_heads
    sizes = dict(vocab=config.vocab_size, hidden=config.hidden_size, ffn=config.intermediate_size,
                 kv=(config.n_kv_heads or config.num_heads) * head_dim)
    shapes = {}
    for template, dims in _SHAPES.items():
        for layer in (range(config.num_layers) if "{}" in template else [None]):
            shapes[template.replace("{}", str(layer))] = tuple(sizes[d] for d in dims)
    if config.tie_word_embeddings:
        del shapes["lm_head.weight"]        # MindFormers shares the embedding Parameter
    return shapes


def check_tensors(entries, expected: dict, source, dtype=None, show=lambda name: name):
    """Every expected tensor present once with its shape (and ``dtype``); else one line naming what is not.

    ``entries`` have ``name`` (MindFormers), ``shape``, ``dtype`` and ``path``; ``show`` turns a MindFormers
    name into the one the user's files use.
    """
    seen = {}
    for entry in entries:
        if entry.name in seen:
            raise KnowLMError(f"{entry.path}: tensor {show(entry.name)!r} is also in {seen[entry.name].path}")
        seen[entry.name] = entry
    unknown = [name for name in seen if name not in expected]
    if unknown:
        raise KnowLMError(f"{seen[unknown[0]].path}: unexpected tensor(s) {listing(map(show, unknown))} for a "
                          f"LLaMA of this config")
    missing = [name for name in expected if name not in seen]
    if missing:
        raise KnowLMError(f"{source}: missing tensor(s) {listing(map(show, missing))}")
    for name, entry in seen.items():
        if tuple(entry.shape) != expected[name]:
            raise KnowLMError(f"{entry.path}: tensor {show(name)!r} has shape {tuple(entry.shape)}, expected "
                              f"{expected[name]} from the config")
        if dtype and entry.dtype != dtype:
            raise KnowLMError(f"{entry.path}: tensor {show(name)!r} is {entry.dtype}, expected {dtype}")


def listing(names, most=8):
    names = list(names)
    shown = ", ".join(repr(n) for n in names[:most])
    return shown + (f" and {len(names) - most} more" if len(names) > most else "")


def resolve_dtype(dtype) -> str:
    if dtype not in DTYPE_ALIASES:
        raise KnowLMError(f"dtype {dtype!r}: expected one of fp32, fp16, bf16")
    return DTYPE_ALIASES[dtype]


# ---------------------------------------------------------------------------------------------- configs

def read_json(path: Path) -> dict:
    if not path.is_file():
        raise KnowLMError(f"{path}: not found")
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise KnowLMError(f"{path}: invalid JSON ({err})") from None


def knowlm_config_from_hf(hf: dict, dtype="float32", source="config.json", **overrides) -> KnowLMConfig:
    """The ``KnowLMConfig`` of a Hugging Face LLaMA ``config.json`` (a dict); unsupported settings refused."""
    for key, accepted in _HF_SETTINGS.items():
        if key in hf and hf[key] != accepted:
            raise KnowLMError(f"{source}: {key}={hf[key]!r} is not supported; knowlm runs LLaMA with "
                              f"{key}={accepted!r}")
    missing = [key for key in _REQUIRED_HF_KEYS if hf.get(key) is None]
    if missing:
        raise KnowLMError(f"{source}: missing {', '.join(missing)}; expected a Hugging Face LLaMA config.json")
    head_dim = hf["hidden_size"] // hf["num_attention_heads"]
    if hf.get("head_dim") not in (None, head_dim):
        raise KnowLMError(f"{source}: head_dim={hf['head_dim']} is not supported; knowlm uses hidden_size / "
                          f"num_attention_heads = {head_dim}")
    values = {dst: hf[src] for src, dst in HF_CONFIG_TO_KNOWLM.items() if hf.get(src) is not None}
    if isinstance(values.get("eos_token_id"), list):
        values["eos_token_id"] = values["eos_token_id"][0]
    if values.get("pad_token_id", 0) < 0:
        del values["pad_token_id"]          # some LLaMA configs say -1: knowlm pads with <unk> (id 0)
    values["seq_length"] = values.get("max_position_embedding", 2048)
    return KnowLMConfig(**{**values, "param_init_type": dtype, "compute_dtype": dtype, **overrides})


def hf_config_from_knowlm(config, dtype: str) -> dict:
    """The Hugging Face ``config.json`` of a knowlm model (``transformers.LlamaForCausalLM``)."""
    values = {src: getattr(config, dst) for src, dst in HF_CONFIG_TO_KNOWLM.items()}
    values["num_key_value_heads"] = config.n_kv_heads or config.num_heads
    return {"architectures": ["LlamaForCausalLM"], **_HF_SETTINGS, **values, "torch_dtype": dtype}


# ------------------------------------------------------------------------------- Hugging Face weight files

def hf_weight_files(hf_dir: Path, prefer: str = "safetensors") -> list:
    """The weight files of a Hugging Face directory: the index's shards or the single file, ``prefer``'s first."""
    order = [prefer] + [kind for kind in _HF_WEIGHTS if kind != prefer]
    for kind in order:
        index, single = (hf_dir / name for name in _HF_WEIGHTS[kind])
        if index.is_file():
            return index_shards(index)
        if single.is_file():
            return [single]
    names = ", ".join(name for kind in order for name in _HF_WEIGHTS[kind])
    raise KnowLMError(f"{hf_dir}: no Hugging Face weights; expected one of {names}")


@dataclass
class HFTensor:
    """A tensor of a Hugging Face file under its MindFormers ``name``: what the checks and the writer need."""
    name: str
    shape: tuple
    dtype: str
    path: str
    hf_name: str
    nbytes: int


class HFShard:
    """One Hugging Face weight file: every tensor's shape and dtype at once, its data only when asked.

    Both readers map the file instead of reading it, so the memory a shard costs is the pages touched.
    """

    def __init__(self, path: Path):
        self.path = path
        if path.suffix == ".safetensors":
            self._file = _open_safetensors(path)
            headers = {name: self._file.get_slice(name) for name in self._file.keys()}
            self.headers = {name: (tuple(s.get_shape()), _SAFETENSORS_DTYPES.get(s.get_dtype(), s.get_dtype()))
                            for name, s in headers.items()}
        else:
            self._file = _torch_load(path)
            for name, value in self._file.items():
                if not hasattr(value, "dtype"):
                    raise KnowLMError(f"{path}: {name!r} is a {type(value).__name__}, not a tensor; expected a "
                                      "Hugging Face state dict")
            self.headers = {name: (tuple(t.shape), str(t.dtype).removeprefix("torch."))
                            for name, t in self._file.items()}
        for name, (_, dtype) in self.headers.items():
            if dtype not in DTYPES:
                raise KnowLMError(f"{path}: tensor {name!r} has dtype {dtype}; supported: "
                                  f"{', '.join(DTYPES)} (quantized checkpoints cannot be converted)")

    def tensor(self, name):
        return self._file.get_tensor(name) if self.path.suffix == ".safetensors" else self._file[name]

    def nbytes(self, name):
        shape, dtype = self.headers[name]
        return prod(shape) * DTYPES[dtype].itemsize


def first_line(err):
    text = str(err).strip()
    return text.splitlines()[0] if text else type(err).__name__


def _torch_load(path):
    torch = import_torch()
    try:
        try:
            state = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
        except RuntimeError as err:
            if "mmap can only be used" not in str(err):
                raise
            # torch < 1.6's format cannot be mapped: such a file is read into memory whole.
            state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # pylint: disable=broad-except  (torch raises many types for bad files)
        if "Weights only load failed" in str(err):
            detail = re.search(r"WeightsUnpickler error: (.*?)(?: was not an allowed|\. |$)", str(err), re.M)
            raise KnowLMError(f"{path}: refused: the pickle asks to run code ("
                              f"{detail.group(1) if detail else 'not plain tensors'}); nothing of it was run. "
                              "Only checkpoints of plain tensors are converted") from None
        raise KnowLMError(f"{path}: not a readable PyTorch checkpoint, truncated or corrupt "
                          f"({first_line(err)})") from None
    if not isinstance(state, dict):
        raise KnowLMError(f"{path}: holds a {type(state).__name__}, expected a state dict of tensors")
    return state


def _open_safetensors(path):
    import_torch()
    from safetensors import SafetensorError, safe_open  # pylint: disable=import-outside-toplevel
    try:
        return safe_open(str(path), framework="pt")
    except (SafetensorError, OSError) as err:
        raise KnowLMError(f"{path}: not a readable safetensors file, truncated or corrupt "
                          f"({first_line(err)})") from None


def import_torch():
    try:
        import torch  # pylint: disable=import-outside-toplevel
    except ImportError:
        raise KnowLMError("reading Hugging Face weights and building the quickstart model need torch: "
                          "pip install 'knowlm[torch]'") from None
    return torch


def tensor_bytes(tensor, dtype: str):
    """The raw bytes of ``tensor`` cast to ``dtype`` (a view, without a copy, when nothing changes)."""
    torch = import_torch()
    flat = tensor.to(getattr(torch, dtype)).contiguous().reshape(-1)
    return flat.view(torch.uint8).numpy()


# ------------------------------------------------------------------------------------------- conversion

@dataclass
class Summary:
    """What a conversion wrote; ``str()`` is the one-line report the CLI prints."""
    action: str
    output: Path
    tensors: int
    parameters: int
    nbytes: int
    dtype: str
    seconds: float

    def __str__(self):
        return (f"{self.action} {self.tensors} tensors ({self.parameters:,} parameters, {_size(self.nbytes)}, "
                f"{self.dtype}) to {self.output} in {self.seconds:.1f} s")


def _size(nbytes):
    for unit, scale in (("GB", 1e9), ("MB", 1e6), ("KB", 1e3)):
        if nbytes >= scale:
            return f"{nbytes / scale:.2f} {unit}"
    return f"{nbytes} B"


def make_summary(action, output, entries, dtype, start):
    return Summary(action, Path(output), len(entries), sum(prod(e.shape) for e in entries),
                   sum(e.nbytes for e in entries), dtype, time.time() - start)


def progress_bar(total, desc):
    # disable=None: a bar on a terminal, nothing in logs and pipes.
    return tqdm(total=total, unit="B", unit_scale=True, unit_divisor=1024, desc=desc, disable=None)


def convert_checkpoint(hf_dir, output, dtype=None, force=False, check_finite=False, prefer="safetensors",
                       echo=None) -> Summary:
    """Convert the Hugging Face LLaMA in ``hf_dir`` to a knowlm model directory ``output``.

    ``output`` ending in ``.ckpt`` writes a single MindSpore checkpoint file instead (the legacy command's
    output). ``dtype`` (fp32/fp16/bf16) defaults to the checkpoint's ``torch_dtype``. ``echo`` (e.g. ``print``)
    receives the resolved arguments before the work starts.
    """
    start = time.time()
    hf_dir, output = Path(hf_dir), Path(output)
    if not hf_dir.is_dir():
        raise KnowLMError(f"{hf_dir}: not a directory; expected a Hugging Face model directory")
    hf = read_json(hf_dir / CONFIG_NAME)
    files = hf_weight_files(hf_dir, prefer)
    plan, source_dtype = _plan(files)
    dtype = resolve_dtype(dtype) if dtype else _default_dtype(hf, source_dtype)
    config = knowlm_config_from_hf(hf, dtype, source=str(hf_dir / CONFIG_NAME))
    expected = expected_shapes(config)
    if config.tie_word_embeddings:      # .bin files of tied models store the shared matrix twice
        plan = [[e for e in entries if e.name != "lm_head.weight"] for entries in plan]
    check_tensors([e for entries in plan for e in entries], expected, hf_dir, show=mindspore_to_hf_name)
    single_file = output.suffix == ".ckpt"
    tokenizer = None if single_file else _checked_tokenizer(hf_dir / TOKENIZER_NAME, config.vocab_size)
    if single_file:
        refuse_existing_file(output, force)
    else:
        prepare_output(output, hf_dir, force, MINDSPORE_WEIGHTS)
    if echo:
        echo(f"knowlm convert: {hf_dir} ({len(files)} {files[0].suffix[1:]} file(s), "
             f"{sum(map(len, plan))} tensors, {source_dtype}) -> {output} ({dtype})")

    plan = [entries for entries in plan if entries]
    if single_file:
        targets = [(output, [e for entries in plan for e in entries])]
    else:
        names = [WEIGHTS_NAME] if len(plan) == 1 else \
            [f"{Path(WEIGHTS_NAME).stem}-{i:05d}-of-{len(plan):05d}.ckpt" for i in range(1, len(plan) + 1)]
        targets = [(output / name, entries) for name, entries in zip(names, plan)]
    with progress_bar(sum(e.nbytes for entries in plan for e in entries), "convert") as bar:
        for path, entries in targets:
            atomic_write(path, lambda tmp, entries=entries: write_mindspore(tmp, entries, dtype, bar))
    written = validate_mindspore([path for path, _ in targets], expected, output, dtype, check_finite)
    if not single_file:
        if len(targets) > 1:
            weight_map = {e.name: Path(e.path).name for e in written}
            write_json(output / WEIGHTS_INDEX_NAME, {"metadata": {"total_size": sum(e.nbytes for e in written)},
                                                      "weight_map": weight_map})
        atomic_copy(tokenizer, output / TOKENIZER_NAME)
        values = config.to_dict()
        values["checkpoint_name_or_path"] = ""
        write_json(output / CONFIG_NAME, values)    # last: a directory with config.json is complete
    return make_summary("converted", output, written, dtype, start)


def _plan(files):
    """Per file, the tensors to convert (``HFTensor``) and the first one's dtype; unknown names refused."""
    plan, source_dtype = [], None
    for path in files:
        shard = HFShard(path)
        targets = {name: _lookup(name, _HF_PATTERNS) for name in shard.headers}
        unknown = [name for name, target in targets.items() if target is _UNKNOWN]
        if unknown:
            raise KnowLMError(f"{path}: unknown tensor name(s) {listing(unknown)}; expected LLaMA names such as "
                              f"{next(iter(HF_TO_MINDSPORE))!r}")
        plan.append([HFTensor(target, *shard.headers[name], str(path), name, shard.nbytes(name))
                     for name, target in targets.items() if target is not None])
        source_dtype = source_dtype or next((e.dtype for e in plan[-1]), None)
    return plan, source_dtype


def _default_dtype(hf, source_dtype):
    declared = hf.get("torch_dtype") or hf.get("dtype")
    return declared if declared in DTYPES else source_dtype


def _checked_tokenizer(path: Path, vocab_size: int) -> Path:
    import sentencepiece as spm  # pylint: disable=import-outside-toplevel
    if not path.is_file():
        raise KnowLMError(f"{path}: not found; the knowlm directory needs the SentencePiece model the weights "
                          "were trained with")
    try:
        pieces = spm.SentencePieceProcessor(model_file=str(path)).get_piece_size()
    except (RuntimeError, OSError) as err:
        raise KnowLMError(f"{path}: not a SentencePiece model ({first_line(err)})") from None
    if pieces > vocab_size:
        raise KnowLMError(f"{path}: {pieces} pieces, but config.json has vocab_size {vocab_size}; this "
                          "tokenizer is not the one of these weights")
    return path


def write_mindspore(tmp, entries, dtype, bar):
    """Write ``entries`` (planned HF tensors) to MindSpore file ``tmp``, one tensor at a time."""
    shard = None
    with open(tmp, "wb") as f:
        for entry in entries:
            if shard is None or entry.path != str(shard.path):
                shard = None                        # unmap the previous input file before mapping the next
                shard = HFShard(Path(entry.path))
            ckpt_stream.write_tensor(f, entry.name, entry.shape, dtype,
                                     tensor_bytes(shard.tensor(entry.hf_name), dtype))
            bar.update(entry.nbytes)


def validate_mindspore(files, expected, source, dtype=None, check_finite=False) -> list:
    """Re-read MindSpore checkpoint ``files`` (headers only) and check them against ``expected``; entries."""
    entries = [entry for path in files for entry in ckpt_stream.scan(path)]
    check_tensors(entries, expected, source, dtype)
    if check_finite:
        for entry in entries:
            if not entry.all_finite():
                raise KnowLMError(f"{entry.path}: tensor {entry.name!r} holds inf or nan values")
    return entries


def refuse_existing_file(path: Path, force):
    if path.exists() and not force:
        raise KnowLMError(f"{path}: already exists; pass force=True (--force) to overwrite it")
    path.parent.mkdir(parents=True, exist_ok=True)


def prepare_output(output_dir: Path, source_dir: Path, force, stale_weights, marker=CONFIG_NAME):
    """``prepare_output_dir`` for a conversion: never its input directory; an overwritten model's weight files
    (``stale_weights``, a glob) removed, since the new model may not replace them all."""
    if output_dir.resolve() == source_dir.resolve():
        raise KnowLMError(f"{output_dir}: is the input directory; choose another output directory")
    prepare_output_dir(output_dir, force, marker)
    for stale in output_dir.glob(stale_weights):
        stale.unlink()


# ----------------------------------------------------------------------------------------------- export

def export_checkpoint(model_dir, hf_dir, force=False, echo=None) -> Summary:
    """Write knowlm model directory ``model_dir`` as a Hugging Face LLaMA directory ``hf_dir`` (safetensors).

    One safetensors file per MindSpore shard, with ``model.safetensors.index.json`` when there are several; the
    bytes are copied unchanged, so a round trip is bit-identical.
    """
    start = time.time()
    model_dir, hf_dir = Path(model_dir), Path(hf_dir)
    config = load_config(model_dir)
    expected = expected_shapes(config)
    shards = [ckpt_stream.scan(path) for path in checkpoint_files(model_dir)]
    entries = [e for shard in shards for e in shard]
    check_tensors(entries, expected, model_dir, dtype=entries[0].dtype if entries else None)
    dtype = entries[0].dtype
    prepare_output(hf_dir, model_dir, force, "model*.safetensors*")
    if echo:
        echo(f"knowlm export: {model_dir} ({len(shards)} ckpt file(s), {len(entries)} tensors, {dtype}) "
             f"-> {hf_dir}")
    names = [HF_SAFETENSORS] if len(shards) == 1 else \
        [f"model-{i:05d}-of-{len(shards):05d}.safetensors" for i in range(1, len(shards) + 1)]
    with progress_bar(sum(e.nbytes for e in entries), "export") as bar:
        for name, shard in zip(names, shards):
            atomic_write(hf_dir / name, lambda tmp, shard=shard: _write_safetensors(tmp, shard, bar))
    validate_safetensors([hf_dir / name for name in names], expected, hf_dir, dtype)
    if len(names) > 1:
        write_json(hf_dir / HF_SAFETENSORS_INDEX, {
            "metadata": {"total_size": sum(e.nbytes for e in entries)},
            "weight_map": {mindspore_to_hf_name(e.name): name for name, shard in zip(names, shards) for e in shard}})
    if (model_dir / TOKENIZER_NAME).is_file():
        atomic_copy(model_dir / TOKENIZER_NAME, hf_dir / TOKENIZER_NAME)
    write_json(hf_dir / CONFIG_NAME, hf_config_from_knowlm(config, dtype))
    return make_summary("exported", hf_dir, entries, dtype, start)


def _write_safetensors(tmp, entries, bar):
    """safetensors: 8-byte header length, JSON header (names, dtypes, shapes, offsets), then the raw data."""
    header, offset = {}, 0
    for entry in entries:
        header[mindspore_to_hf_name(entry.name)] = {"dtype": DTYPES[entry.dtype].safetensors,
                                                    "shape": list(entry.shape),
                                                    "data_offsets": [offset, offset + entry.nbytes]}
        offset += entry.nbytes
    header["__metadata__"] = {"format": "pt"}       # transformers refuses files without it
    blob = json.dumps(header, separators=(",", ":")).encode()
    blob += b" " * (-len(blob) % 8)                 # data starts 8-byte aligned
    with open(tmp, "wb") as f:
        f.write(struct.pack("<Q", len(blob)) + blob)
        for entry in entries:
            entry.copy_to(f)
            bar.update(entry.nbytes)


def validate_safetensors(files, expected, source, dtype):
    entries = [HFTensor(hf_to_mindspore_name(name), shape, dtype_, str(path), name, 0)
               for path in files for name, (shape, dtype_) in HFShard(path).headers.items()]
    check_tensors(entries, expected, source, dtype, show=mindspore_to_hf_name)
