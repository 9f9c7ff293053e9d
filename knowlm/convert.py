"""Hugging Face LLaMA <-> MindFormers LLaMA weight names.

Hugging Face stores LLaMA in the rotate-half layout that MindFormers also uses, so conversion is renaming only:
no q/k permutation (that is needed only for Meta's original ``.pth`` files) and no transposes, shapes equal.
The table is the single source of truth; the reverse direction is derived from it.
"""
import re

from knowlm.errors import KnowLMError

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


def _compile(table):
    return [(re.compile("^" + re.escape(src).replace(r"\{\}", r"(\d+)") + "$"), dst) for src, dst in table.items()]


_HF_PATTERNS = _compile(HF_TO_MINDSPORE)
_MINDSPORE_PATTERNS = _compile(MINDSPORE_TO_HF)


def _rename(name, patterns, source):
    for pattern, target in patterns:
        match = pattern.match(name)
        if match:
            if target is None or not match.groups():
                return target
            return target.replace("{}", match.group(1))
    raise KnowLMError(f"unknown {source} tensor name {name!r}; expected LLaMA names such as "
                      f"{next(iter(HF_TO_MINDSPORE if source == 'Hugging Face' else MINDSPORE_TO_HF))!r}")


def hf_to_mindspore_name(name: str):
    """The MindFormers name of Hugging Face tensor ``name``, or None for tensors dropped on purpose."""
    return _rename(name, _HF_PATTERNS, "Hugging Face")


def mindspore_to_hf_name(name: str) -> str:
    return _rename(name, _MINDSPORE_PATTERNS, "MindSpore")
