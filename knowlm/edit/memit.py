"""MEMIT (Meng et al. 2023, "Mass-Editing Memory in a Transformer"), as EasyEdit computes it
(``easyeditor/models/memit``): a batch of facts spread over the down-projections of a layer range.

1. For each request, the value ``z`` of the residual stream after the last layer of the range
   (``values.optimise_value`` at the layer output), with MEMIT's six context templates (the bare prompt and five
   sampled ones of up to 10 tokens).
2. For each layer ``l_i`` of the range in turn (``L`` layers), on the weights as already updated: keys ``K``
   (``[intermediate, n]``: the down-projection input at the subject's last token, the mean of the bare prompt's
   and of the five templates' mean), residuals ``R = Z - H`` (``H``: the current stream after the last layer at the
   bare prompt), and::

       delta W_i = (R / (L - i)) K^T (lambda C + K K^T)^-1          (float64; C: the second moment, lambda: 15000)

   applied before the next layer is computed.
"""
import mindspore as ms
import numpy as np

from knowlm.edit.context import ROW_MULTIPLE, Rows, subject_rows
from knowlm.edit.values import optimise_value
from knowlm.errors import KnowLMError


def memit_delta(keys, residuals, moment, update_weight, remaining) -> np.ndarray:
    """``(R / remaining) K^T (lambda C + K K^T)^-1`` (``[hidden, intermediate]``, float64); ``keys``
    ``[intermediate, n]``, ``residuals`` ``[hidden, n]``."""
    keys, residuals = np.asarray(keys, np.float64), np.asarray(residuals, np.float64)
    adjusted = np.linalg.solve(update_weight * np.asarray(moment, np.float64) + keys @ keys.T, keys)
    return (residuals / remaining) @ adjusted.T


def memit_updates(cells, tokenizer, requests, templates, hparams, moments, apply, where="requests") -> list:
    """Edit ``requests`` together; ``apply(layer, delta)`` writes each layer's update into the model before the
    next layer's keys are computed. Returns the ``Value`` of each request."""
    if len(templates) < 2:
        raise KnowLMError(f"{where}: MEMIT averages the bare prompt's key with sampled templates'; got none")
    last = hparams.layers[-1]
    values = [optimise_value(cells, tokenizer, request, templates, last, hparams, "layer", f"{where} {i}")
              for i, request in enumerate(requests)]
    zs = np.stack([value.target for value in values], 1).astype(np.float64)
    rows, lookups = [], []
    for i, request in enumerate(requests):
        found = subject_rows(tokenizer, request, templates, f"{where} {i}")
        rows += found[0]
        lookups += found[1]
    config = cells.model.config
    packed = Rows.pack(rows, lookups, config.seq_length, config.pad_token_id, where)
    for i, layer in enumerate(hparams.layers):
        keys, stream = _keys_and_stream(cells, packed, hparams.layers, layer, len(requests), len(templates))
        delta = memit_delta(keys, zs - stream, moments[layer], hparams.mom2_update_weight, len(hparams.layers) - i)
        if not np.isfinite(delta).all():
            raise KnowLMError(f"{where}: the MEMIT update of layer {layer} holds nan/inf; nothing is edited")
        apply(layer, delta)
    return values


def _keys_and_stream(cells, packed, layers, layer, n_requests, n_templates) -> tuple:
    """``K`` at ``layer`` (``[intermediate, n]``: per request, the bare prompt's key and the templates' mean key,
    averaged) and the stream after the range's last layer at each bare prompt (``[hidden, n]``)."""
    probe = cells.probe(layers, packed.tokens.shape[1])
    index = sorted(layers).index(layer)
    keys, stream = [], []
    for first in range(0, len(packed.lookups), ROW_MULTIPLE):
        hidden, found, _ = probe(ms.Tensor(packed.tokens[first:first + ROW_MULTIPLE]))
        hidden, found = hidden.asnumpy(), found.asnumpy()[index]
        for row in range(min(ROW_MULTIPLE, len(packed.lookups) - first)):
            position = packed.lookups[first + row]
            keys.append(found[row, position])
            stream.append(hidden[row, position])
    keys = np.asarray(keys, np.float64).reshape(n_requests, n_templates, -1)
    stream = np.asarray(stream, np.float64).reshape(n_requests, n_templates, -1)[:, 0]
    return ((keys[:, 0] + keys[:, 1:].mean(1)) / 2).T, stream.T

