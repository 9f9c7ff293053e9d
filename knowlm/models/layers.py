"""The layers ``KnowLMForCausalLM`` puts in place of MindFormers' off Ascend: each computes what the replaced one does.

KV cache: ``RotaryEmbeddingBSH``, ``KVCacheWrite`` and ``PagedAttentionReference`` stand for ``ApplyRotaryPosEmb``,
``ReshapeAndCache`` and ``PagedAttention`` (Ascend-only kernels), written in plain MindSpore ops on a preallocated
cache so that they compile in GRAPH mode. Training: ``CrossEntropy``, ``Softmax`` and ``RMSNormFunction`` give the
same values with gradients whose sums over the last axis are matmuls (``_row_sums``), which MindSpore's CPU runs far
faster than the ``ReduceSum``s of autodiff.
"""
import mindspore.common.dtype as mstype
from mindspore import nn, ops
from mindformers.models.llama.llama_layer import LlamaRMSNorm


class RotaryEmbeddingBSH(nn.Cell):
    """Rotate-half RoPE on ``(B, S, heads * D)`` query/key, as ``ApplyRotaryPosEmb`` computes on Ascend.

    ``freqs_cis`` comes from MindFormers' ``FreqsMgr``: cos/sin of shape ``(B * S, D)`` in prefill (the table
    tiled per batch row) and ``(B, D)`` in a decode step (gathered at each row's position).
    """

    def __init__(self, n_head, n_kv_head, head_dim):
        super().__init__()
        self.n_head = n_head
        self.n_kv_head = n_kv_head
        self.head_dim = head_dim
        self.half = head_dim // 2

    def _rotate(self, x, n_head, cos, sin):
        bs, seq, _ = x.shape
        x = x.reshape(bs * seq, n_head, self.head_dim)
        rotated = ops.cat((-x[:, :, self.half:], x[:, :, :self.half]), -1)
        cos = cos.reshape(bs * seq, 1, self.head_dim)
        sin = sin.reshape(bs * seq, 1, self.head_dim)
        return (x * cos + rotated * sin).reshape(bs, seq, n_head * self.head_dim)

    def construct(self, query, key, freqs_cis, batch_valid_length):
        cos, sin, _ = freqs_cis
        return self._rotate(query, self.n_head, cos, sin), self._rotate(key, self.n_kv_head, cos, sin)


def _cache_rows(slots, n_kv_head, rows_per_head):
    """Rows of the head-major flat cache that hold ``slots`` (any shape), one set per kv head:
    shape ``(n_kv_head,) + slots.shape``."""
    heads = ops.arange(n_kv_head, dtype=slots.dtype).reshape((n_kv_head,) + (1,) * slots.ndim)
    return heads * rows_per_head + slots


class KVCacheWrite(nn.Cell):
    """``ReshapeAndCache``: write each token's key/value into its slot of the cache, in place.

    The cache is ``(kv_heads * (slots + 1), D)``, head-major, so that a decode step reads each head's keys as one
    block with no transpose (three transposes of the whole cache per layer were a measurable part of a decode step).
    Each head has one extra slot at its end: padding tokens (slot -1) are written there,
    so one ``ScatterUpdate`` serves prompts of any length without a data-dependent shape.
    """

    def __init__(self, n_kv_head, head_dim, trash_slot):
        super().__init__()
        self.n_kv_head = n_kv_head
        self.head_dim = head_dim
        self.trash_slot = trash_slot
        self.scatter = ops.ScatterUpdate()

    def construct(self, key, value, key_cache, value_cache, slot_mapping):
        n_tokens = slot_mapping.shape[0]
        slots = ops.select(slot_mapping < 0, ops.full_like(slot_mapping, self.trash_slot), slot_mapping)
        rows = _cache_rows(slots, self.n_kv_head, self.trash_slot + 1)                  # (kv_heads, n_tokens)
        key = key.reshape(n_tokens, self.n_kv_head, self.head_dim).transpose(1, 0, 2)
        value = value.reshape(n_tokens, self.n_kv_head, self.head_dim).transpose(1, 0, 2)
        return ops.depend(self.scatter(key_cache, rows, key), self.scatter(value_cache, rows, value))


class PagedAttentionReference(nn.Cell):
    """``PagedAttention`` for one new token per sequence: gather the sequence's cache blocks and attend.

    query ``(B, 1, heads * D)``; ``block_tables`` ``(B, max_blocks)`` (-1 = unused); keys at positions
    ``>= batch_valid_length`` are masked out. Batched over ``(heads, B)``, the cache's own order.
    """

    def __init__(self, n_head, n_kv_head, head_dim, block_size, scale, rows_per_head):
        super().__init__()
        self.n_head = n_head
        self.n_kv_head = n_kv_head
        self.head_dim = head_dim
        self.block_size = block_size
        self.scale = scale
        self.rows_per_head = rows_per_head
        self.n_rep = n_head // n_kv_head
        self.scores = ops.BatchMatMul(transpose_b=True)

    def _gather(self, cache, rows):
        states = ops.gather(cache, rows, 0)                           # (kv_heads, B, T, D)
        if self.n_rep > 1:
            states = ops.repeat_interleave(states, self.n_rep, 0)     # (heads, B, T, D)
        return states

    def construct(self, query, key_cache, value_cache, block_tables, batch_valid_length):
        bs, max_blocks = block_tables.shape
        length = max_blocks * self.block_size
        blocks = ops.maximum(block_tables, 0).reshape(bs, max_blocks, 1)
        slots = (blocks * self.block_size + ops.arange(self.block_size, dtype=blocks.dtype)).reshape(bs, length)
        rows = _cache_rows(slots, self.n_kv_head, self.rows_per_head)                      # (kv_heads, B, T)
        key = self._gather(key_cache, rows)
        value = self._gather(value_cache, rows)
        query = query.reshape(bs, self.n_head, 1, self.head_dim).transpose(1, 0, 2, 3)  # (heads, B, 1, D)
        scores = self.scores(query, key) * self.scale                                      # (heads, B, 1, T)
        visible = ops.arange(length, dtype=mstype.int32).reshape(1, 1, 1, length) \
            < batch_valid_length.reshape(1, bs, 1, 1)
        scores = ops.select(visible, scores, ops.full_like(scores, -1.0e9))
        context = ops.matmul(ops.softmax(scores, -1), value)                                # (heads, B, 1, D)
        return context.transpose(1, 2, 0, 3).reshape(bs, 1, self.n_head * self.head_dim)


class CrossEntropy(nn.Cell):
    """Mean next-token cross-entropy over positions whose ``input_mask`` is 1: MindFormers' loss, same inputs.

    logits ``(N, vocab)``, label ``(N,)``, input_mask ``(N,)``; one fused log-softmax instead of materialising a
    one-hot label matrix.
    """

    def construct(self, logits, label, input_mask):
        log_probs = ops.log_softmax(logits.astype(mstype.float32), -1)
        picked = ops.gather_elements(log_probs, 1, label.reshape(-1, 1)).reshape(-1)
        mask = input_mask.reshape(-1)
        return -(picked * mask).sum() / (mask.sum() + 1.0e-8)


def _row_sums(x):
    # Sum over the last axis as a product with a column of ones: MindSpore's CPU ReduceSum over the last axis is
    # slow, a MatMul runs at full speed.
    return ops.matmul(x, ops.ones((x.shape[-1], 1), x.dtype))


class Softmax(nn.Cell):
    """Softmax over the last axis, its gradient ``y * (dy - sum(dy * y))`` summed by ``_row_sums``."""

    def construct(self, x):
        return ops.softmax(x, -1)

    def bprop(self, x, out, dout):
        return (out * (dout - _row_sums(dout * out)),)


class RMSNormFunction(nn.Cell):
    """``x / sqrt(mean(x^2) + eps) * weight`` with its gradient written out, every sum over the hidden axis done by
    ``_row_sums`` (MindFormers' RMSNorm spends its time in ReduceMean and its gradient)."""

    def __init__(self, eps):
        super().__init__()
        self.eps = eps

    def _inverse_rms(self, x):
        return ops.rsqrt(_row_sums(x * x) / x.shape[-1] + self.eps)

    def construct(self, x, weight):
        return x * self._inverse_rms(x) * weight

    def bprop(self, x, weight, out, dout):
        inverse = self._inverse_rms(x)
        scaled = dout * weight
        dx = scaled * inverse - x * (inverse * inverse * inverse) * (_row_sums(scaled * x) / x.shape[-1])
        rows = (dout * x * inverse).reshape(-1, x.shape[-1])
        dweight = ops.matmul(ops.ones((1, rows.shape[0]), rows.dtype), rows).reshape(weight.shape)
        return dx, dweight


class KnowLMRMSNorm(LlamaRMSNorm):
    """MindFormers' ``LlamaRMSNorm`` computed by ``RMSNormFunction`` (same parameter, same result)."""

    def construct(self, x):
        return self.function(x.astype(self.compute_type), self.weight.astype(self.compute_type)).astype(x.dtype)

