"""The three places of a LLaMA model that ROME and MEMIT read and write, as MindSpore cells over a
``KnowLMForCausalLM``'s own layers (built without a KV cache), so the numerics are the model's.

For a block ``l`` (MindFormers' names; Hugging Face's in brackets)::

    h   = x + attention(attention_norm(x))
    key = w3(ffn_norm(h)) * silu(w1(ffn_norm(h)))        # down_proj's input: the "key" of ROME's memory view
    out = w2(key)                                        # w2 [down_proj]: the matrix an edit rewrites
    y   = h + out                                        # the residual stream after block l

- ``Probe(model, layers)`` runs blocks ``0..max(layers)`` and returns ``y`` of the last and ``key``, ``out`` of
  each of ``layers``, at every position;
- ``EditLoss(model, l)`` runs the rest of the model from ``y + delta`` (``delta`` added at chosen positions), and
  returns EasyEdit's value loss; MindSpore differentiates it with respect to ``delta`` (not the weights).

Rows are right-padded: a causal model's positions never see the padding after them, so no padding mask is needed.
"""
import weakref

import mindspore as ms
import numpy as np
from mindspore import nn, ops

MASKED = -10000.0            # MindFormers' additive attention mask value


def _causal_mask(width):
    return ms.Tensor((1 - np.tril(np.ones((width, width), np.float32)))[None, None] * MASKED)


def rewritten_weight(model, layer):
    """The down-projection parameter of ``layer`` (``[hidden, intermediate]``: ``out = key @ W.T``)."""
    return model.model.layers[layer].feed_forward.w2.weight


class Probe(nn.Cell):
    """Blocks ``0..max(layers)`` of ``model`` on ``[rows, width]`` tokens: ``(residual after the last block,
    down_proj inputs, down_proj outputs)``, the last two stacked over ``layers`` (``[len(layers), rows, width, ·]``)."""

    def __init__(self, model, layers, width):
        super().__init__(auto_prefix=False)
        self.llama, self.layers, self.width = model.model, tuple(sorted(layers)), width
        self.mask = _causal_mask(width)

    def construct(self, tokens):
        llama = self.llama
        freqs = llama.freqs_mgr(self.width)
        x = llama.tok_embeddings(tokens)
        keys, outs = [], []
        for i in range(self.layers[-1] + 1):
            block = llama.layers[i]
            if i in self.layers:
                h = x + block.attention(block.attention_norm(x), freqs, self.mask)
                ffn = block.feed_forward
                normed = block.ffn_norm(h)
                key = ffn.mul(ffn.w3(normed), ffn.w1(normed))
                out = ffn.w2(key)
                x = h + out
                keys.append(key)
                outs.append(out)
            else:
                x = block(x, freqs, self.mask)
        return x, ops.stack(keys), ops.stack(outs)


class Tail(nn.Cell):
    """Blocks ``first..`` of ``model`` from a residual stream ``x`` (``[rows, width, hidden]``), the final norm, and
    the logits only at ``picks`` (flat ``row * width + position``): no full-width vocabulary projection."""

    def __init__(self, model, first, width):
        super().__init__(auto_prefix=False)
        self.model, self.llama, self.first, self.width = model, model.model, first, width
        self.mask = _causal_mask(width)

    def construct(self, x, picks):
        llama = self.llama
        freqs = llama.freqs_mgr(self.width)
        for i in range(self.first, llama.num_layers):
            x = llama.layers[i](x, freqs, self.mask)
        x = ops.gather(llama.norm_out(x).reshape((-1, x.shape[-1])), picks, 0)
        return self.model.lm_head(x)


class NextLogits(nn.Cell):
    """The whole model on ``[rows, width]`` tokens, logits at ``picks``: sampling a few short rows."""

    def __init__(self, model, width):
        super().__init__(auto_prefix=False)
        self.llama, self.tail = model.model, Tail(model, 0, width)

    def construct(self, tokens, picks):
        return self.tail(self.llama.tok_embeddings(tokens), picks)


def all_logits(model, rows: np.ndarray) -> np.ndarray:
    """``model``'s logits at every position of ``rows`` (``[n, seq_length]`` token ids; a model without KV cache)."""
    return model(ms.Tensor(rows.astype(np.int32)))[0].asnumpy().reshape(rows.shape[0], rows.shape[1], -1)


class EditLoss(nn.Cell):
    """EasyEdit's ``compute_v`` loss, less its weight decay (a function of ``delta`` alone, added by the caller), for
    a residual stream ``hidden`` (``Probe``'s first output) with ``delta`` added at the positions of ``where``
    (``[rows, width, 1]``, one 1 per row, at the subject's last token)::

        nll + kl_weight * KL(p || p_init)

    ``nll``: ``-sum(weights * log p(target))`` over ``picks`` (flat ``row * width + position`` indices) predicting
    ``targets``, ``weights`` carrying EasyEdit's mean over each prompt's target tokens and over prompts; the KL term
    is over the next-token distributions at ``kl_picks`` (the subject's last token of "{subject} is a"), ``kl_init``
    their log-probabilities before the edit. Returns ``(loss, nll, kl_picks' log-probabilities)``."""

    def __init__(self, model, layer, width):
        super().__init__(auto_prefix=False)
        self.tail = Tail(model, layer + 1, width)
        self.log_softmax = nn.LogSoftmax(-1)

    def construct(self, delta, hidden, where, picks, targets, weights, kl_picks, kl_init, kl_weight):
        log_probs = self.log_softmax(self.tail(hidden + where * delta, ops.concat((picks, kl_picks))))
        count = picks.shape[0]
        chosen = ops.gather_elements(log_probs[:count], 1, targets.reshape((-1, 1))).reshape((-1,))
        nll = -(chosen * weights).sum()
        kl_log_probs = log_probs[count:]
        kl = (ops.exp(kl_log_probs) * (kl_log_probs - kl_init)).sum() / kl_log_probs.shape[0]
        return nll + kl_weight * kl, nll, kl_log_probs


class Cells:
    """``Probe`` and ``EditLoss`` gradient cells of one model, kept by shape: GRAPH mode compiles each once, and a
    compiled graph keeps its memory (about 1 GB for SmolLM2's gradient at 24 x 32 tokens) for the process' life, so
    every ``Cells`` of a model shares them (``Cells.of``)."""

    _shared = weakref.WeakKeyDictionary()

    def __init__(self, model):
        self.model, self._cells = model, {}

    @classmethod
    def of(cls, model) -> "Cells":
        if model not in cls._shared:
            cls._shared[model] = cls(model)
        return cls._shared[model]

    def probe(self, layers, width):
        key = ("probe", tuple(sorted(layers)), width)
        if key not in self._cells:
            self._cells[key] = Probe(self.model, layers, width)
        return self._cells[key]

    def next_logits(self, width):
        key = ("next", width)
        if key not in self._cells:
            self._cells[key] = NextLogits(self.model, width)
        return self._cells[key]

    def loss_and_grad(self, layer, width):
        key = ("loss", layer, width)
        if key not in self._cells:
            self._cells[key] = ms.value_and_grad(EditLoss(self.model, layer, width), grad_position=0, has_aux=True)
        return self._cells[key]
