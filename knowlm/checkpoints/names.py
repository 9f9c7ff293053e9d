"""THE weight table: every LLaMA tensor's Hugging Face name, MindFormers name and shape, in one place.

Every other list of names is derived from ``WEIGHTS``: the renaming maps both ways, the shapes a config implies,
the projections LoRA may target (and their LoRA tensors' names), the order in which knowlm's decode kernel takes a
layer's weights. Hugging Face stores LLaMA in the rotate-half layout MindFormers also uses, so a conversion renames
only: no q/k permutation, no transposes.
"""
import re

from knowlm.checkpoints.quant import PACKED, Q8_0_BLOCK, Q8_0_BYTES, stored_dtype, stored_shape
from knowlm.errors import KnowLMError

# (Hugging Face name, MindFormers name, shape in config terms); "{}" is the layer index. A layer's rows are in the
# order the layer uses its weights, which is the order knowlm's decode kernel takes them (``LAYER_CELLS``).
# kv = n_kv_heads * head_dim, ffn = intermediate_size. A MindFormers name of None: dropped on purpose.
WEIGHTS = (
    ("model.embed_tokens.weight", "model.tok_embeddings.embedding_weight", ("vocab", "hidden")),
    ("model.layers.{}.input_layernorm.weight", "model.layers.{}.attention_norm.weight", ("hidden",)),
    ("model.layers.{}.self_attn.q_proj.weight", "model.layers.{}.attention.wq.weight", ("hidden", "hidden")),
    ("model.layers.{}.self_attn.k_proj.weight", "model.layers.{}.attention.wk.weight", ("kv", "hidden")),
    ("model.layers.{}.self_attn.v_proj.weight", "model.layers.{}.attention.wv.weight", ("kv", "hidden")),
    ("model.layers.{}.self_attn.o_proj.weight", "model.layers.{}.attention.wo.weight", ("hidden", "hidden")),
    ("model.layers.{}.post_attention_layernorm.weight", "model.layers.{}.ffn_norm.weight", ("hidden",)),
    ("model.layers.{}.mlp.gate_proj.weight", "model.layers.{}.feed_forward.w1.weight", ("ffn", "hidden")),
    ("model.layers.{}.mlp.down_proj.weight", "model.layers.{}.feed_forward.w2.weight", ("hidden", "ffn")),
    ("model.layers.{}.mlp.up_proj.weight", "model.layers.{}.feed_forward.w3.weight", ("ffn", "hidden")),
    ("model.norm.weight", "model.norm_out.weight", ("hidden",)),
    ("lm_head.weight", "lm_head.weight", ("vocab", "hidden")),
    # Rotary frequencies are recomputed from rope_theta; old checkpoints store them per layer.
    ("model.layers.{}.self_attn.rotary_emb.inv_freq", None, None),
)
HF_TO_MINDSPORE = {hf: ms for hf, ms, _ in WEIGHTS}
MINDSPORE_TO_HF = {ms: hf for hf, ms, _ in WEIGHTS if ms is not None}
SHAPES = {ms: dims for _, ms, dims in WEIGHTS if ms is not None}

_LAYER = "model.layers.{}."
# A decoder layer's weight cells, relative to the layer ("attention.wq", "ffn_norm", ...), in the table's order.
LAYER_CELLS = tuple(ms[len(_LAYER):].removesuffix(".weight") for ms in SHAPES if ms.startswith(_LAYER))
# Its linear projections (2-D weights): what LoRA may target.
PROJECTIONS = tuple(cell for cell in LAYER_CELLS if len(SHAPES[f"{_LAYER}{cell}.weight"]) == 2)
PROJECTION_NAMES = tuple(cell.rsplit(".", 1)[-1] for cell in PROJECTIONS)         # wq, wk, ..., w3
PROJECTION_WEIGHT = re.compile(r"^model\.layers\.\d+\.(" + "|".join(map(re.escape, PROJECTIONS)) + r")\.weight$")

# MindFormers' LoRA (mindpet's LoRADense) adds two parameters beside a projection's weight W (out, in):
#   <cell>.mindpet_delta_lora_a (rank, in) = PEFT's lora_A.weight, <cell>.mindpet_delta_lora_b (out, rank) = lora_B.
LORA_A, LORA_B = "mindpet_delta_lora_a", "mindpet_delta_lora_b"

# The preallocated KV cache of each layer: state a model holds, never weights a checkpoint carries.
KV_CACHE_NAMES = ("key_cache", "value_cache")


def lora_name(weight_name: str, part: str) -> str:
    """``model.layers.0.attention.wq.weight`` -> ``model.layers.0.attention.wq.mindpet_delta_lora_a``."""
    return weight_name.removesuffix("weight") + part


def is_kv_cache_parameter(name: str) -> bool:
    return name.endswith(KV_CACHE_NAMES)


def _compile(table):
    return [(re.compile("^" + re.escape(src).replace(r"\{\}", r"(\d+)") + "$"), dst) for src, dst in table.items()]


_PATTERNS = {"Hugging Face": _compile(HF_TO_MINDSPORE), "MindSpore": _compile(MINDSPORE_TO_HF)}
UNKNOWN = object()


def lookup(name, source="Hugging Face"):
    """The other side's name of ``source`` tensor ``name``: None if dropped on purpose, ``UNKNOWN`` if not LLaMA's."""
    for pattern, target in _PATTERNS[source]:
        match = pattern.match(name)
        if match:
            return target.replace("{}", match.group(1)) if target and match.groups() else target
    return UNKNOWN


def hf_to_mindspore_name(name: str):
    """The MindFormers name of Hugging Face tensor ``name``, or None for tensors dropped on purpose."""
    return _rename(name, "Hugging Face")


def mindspore_to_hf_name(name: str) -> str:
    return _rename(name, "MindSpore")


def _rename(name, source):
    target = lookup(name, source)
    if target is UNKNOWN:
        example = next(iter(HF_TO_MINDSPORE if source == "Hugging Face" else MINDSPORE_TO_HF))
        raise KnowLMError(f"unknown {source} tensor name {name!r}; expected LLaMA names such as {example!r}")
    return target


def expected_shapes(config) -> dict:
    """Every MindFormers tensor a model of ``config`` has, with its shape (no model is built)."""
    head_dim = config.hidden_size // config.num_heads
    sizes = dict(vocab=config.vocab_size, hidden=config.hidden_size, ffn=config.intermediate_size,
                 kv=(config.n_kv_heads or config.num_heads) * head_dim)
    shapes = {}
    for template, dims in SHAPES.items():
        for layer in (range(config.num_layers) if "{}" in template else [None]):
            shapes[template.replace("{}", str(layer))] = tuple(sizes[d] for d in dims)
    if config.tie_word_embeddings:
        del shapes["lm_head.weight"]        # MindFormers shares the embedding Parameter
    return shapes


def listing(names, most=8):
    """``'a', 'b' and 3 more``: names for a one-line message."""
    names = list(names)
    shown = ", ".join(repr(n) for n in names[:most])
    return shown + (f" and {len(names) - most} more" if len(names) > most else "")


def check_tensors(entries, expected: dict, source, dtype=None, show=lambda name: name):
    """Every expected tensor present once with its shape (and ``dtype``); else one line naming what is not.

    ``entries`` have ``name`` (MindFormers), ``shape``, ``dtype`` and ``path``; ``show`` turns a MindFormers
    name into the one the user's files use. A uint8 entry is a Q8_0 weight (``knowlm.checkpoints.quant``): its shape
    must be the packed form of the expected one. ``dtype`` ``int8``: 2-D weights uint8 (Q8_0), 1-D ones float32.
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
        if entry.dtype == PACKED:
            check_packed(entry.path, show(name), entry.shape, expected[name])
        elif tuple(entry.shape) != expected[name]:
            raise KnowLMError(f"{entry.path}: tensor {show(name)!r} has shape {tuple(entry.shape)}, expected "
                              f"{expected[name]} from the config")
        if dtype and entry.dtype != stored_dtype(expected[name], dtype):
            raise KnowLMError(f"{entry.path}: tensor {show(name)!r} is {entry.dtype}, expected "
                              f"{stored_dtype(expected[name], dtype)}")


def check_packed(path, name, shape, logical):
    """A uint8 tensor ``name`` of ``shape`` is Q8_0 of a weight of shape ``logical``; else one line."""
    logical = tuple(logical)
    if len(logical) != 2 or logical[1] % Q8_0_BLOCK:
        raise KnowLMError(f"{path}: tensor {name!r} is uint8, but its config shape {logical} is not one that int8 "
                          f"(Q8_0) stores (2-D, rows a multiple of {Q8_0_BLOCK} values)")
    want = stored_shape(logical, PACKED)
    if tuple(shape) != want:
        raise KnowLMError(f"{path}: tensor {name!r} is uint8 of shape {tuple(shape)}, expected {want}: Q8_0 of the "
                          f"config's {logical} ({want[1] // Q8_0_BYTES} blocks of {Q8_0_BYTES} bytes a row)")
