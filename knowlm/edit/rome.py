"""ROME (Meng et al. 2022, "Locating and Editing Factual Associations in GPT"), as EasyEdit computes it
(``easyeditor/models/rome``): one rank-one update of one layer's down-projection ``W`` (``[hidden, intermediate]``,
``out = W k``) per fact.

- key direction ``u``: the mean ``k_bar`` of the down-projection inputs at the subject's last token over the context
  templates; with ``mom2_adjustment``, ``C^-1 k_bar`` (``C``: the inputs' second moment over a corpus); normalised;
- value ``v*``: ``values.optimise_value`` at the block's MLP output;
- update: ``W += v u^T`` with ``v = (v* - W k*) / (k* . u)``, ``k*`` the key of the bare prompt, so that
  ``W_new k* = v*`` exactly.
"""
import numpy as np

from knowlm.edit.trace import rewritten_weight
from knowlm.edit.values import optimise_value
from knowlm.errors import KnowLMError


def rome_delta(weight, key_mean, key_star, value, inverse_moment=None) -> np.ndarray:
    """``v u^T`` (``[hidden, intermediate]``, float64) for ``weight`` (``[hidden, intermediate]``); every vector a
    1-D array; ``inverse_moment``: ``C^-1`` or None (``mom2_adjustment`` off)."""
    u = np.asarray(key_mean, np.float64)
    if inverse_moment is not None:
        u = np.asarray(inverse_moment, np.float64) @ u
    u = u / np.linalg.norm(u)
    key_star = np.asarray(key_star, np.float64)
    v = (np.asarray(value, np.float64) - np.asarray(weight, np.float64) @ key_star) / (key_star @ u)
    return np.outer(v, u)


def rome_update(cells, tokenizer, request, templates, hparams, moments=None, where="request") -> tuple:
    """``(layer, delta W, Value)`` of one request on the model's current weights (nothing is changed)."""
    layer = hparams.layers[0]
    value = optimise_value(cells, tokenizer, request, templates, layer, hparams, "mlp", where)
    rewriting = value.keys[:len(templates)]          # the last row is "{subject} is a", not a template
    inverse = np.linalg.inv(moments[layer]) if hparams.mom2_adjustment else None
    weight = rewritten_weight(cells.model, layer).asnumpy()
    delta = rome_delta(weight, rewriting.mean(0), value.keys[0], value.target, inverse)
    if not np.isfinite(delta).all():
        raise KnowLMError(f"{where}: the ROME update of layer {layer} holds nan/inf; nothing is edited")
    return layer, delta, value
