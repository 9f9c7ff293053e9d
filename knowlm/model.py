"""KnowLM causal language model: MindFormers' ``LlamaForCausalLM`` made to run anywhere MindSpore runs.

Reference numerics: Hugging Face ``transformers``' ``modeling_llama.py`` (rotate-half RoPE, RMSNorm, GQA).
On Ascend nothing here changes MindFormers' behaviour. On CPU and GPU, ``KnowLMForCausalLM`` swaps, inside its
own instance only, the pieces of MindFormers' LLaMA that have Ascend-only kernels:

1. configuration: fused ``RmsNorm`` off, sliced rotary embedding (the ``BatchMatMul`` swap-mask form does not
   broadcast on CPU), no flash attention, float32 everywhere (bf16/fp16 lack CPU kernels);
2. KV cache (``use_past=True``): ``ApplyRotaryPosEmb``, ``ReshapeAndCache`` and ``PagedAttention`` are replaced
   by ``RotaryEmbeddingBSH``, ``KVCacheWrite`` and ``PagedAttentionReference`` below, written in plain
   MindSpore ops on a preallocated cache so that they compile in GRAPH mode;
3. decoding: greedy calls run knowlm's own loop (``knowlm.generate.greedy_search``: same tokens, 1-2 ms less Python
   per token; with knowlm's kernels, many decode steps per call); other calls run MindFormers' loop with the argmax
   on the host instead of ``mint.argmax`` and the sampling processors in numpy (``mint.topk``/``sort``/``cumsum``
   have no CPU kernels); the final draw is numpy, so ``seed`` reproduces;
4. execution: GRAPH mode, because MindSpore's default asynchronous PYNATIVE dispatch is 10-40x slower on CPU,
   with the generation graphs kept on disk (``compile_cache``) so that only a model's first run compiles;
5. training: ``CrossEntropy`` below instead of MindFormers' one-hot cross-entropy (built for sharding over
   devices), which costs 15% of a LoRA step on CPU; RMSNorm and the attention softmax with gradients whose sums
   over the hidden/key axis are matmuls (``_row_sums``): the benchmark's small LoRA step 715 -> 635 ms;
6. knowlm's kernels on CPU (``knowlm.cpu_ops``): a decode step (one new token per sequence) runs each decoder layer
   as one op instead of ~50, the final norm and the lm_head at close to the memory bandwidth, and greedy decoding
   runs many such steps, argmax included, in one op (``DecodeSteps``); without a KV cache
   (training), the attention's RoPE is one op forward and one backward (small LoRA step ~640 -> ~595 ms).
"""
import contextlib
import copy
import functools
import hashlib
import json
import logging
import os
import sys
from importlib.metadata import version
from pathlib import Path

import mindspore as ms
import mindspore.common.dtype as mstype
import numpy as np
from mindspore import Parameter, nn, ops
from mindformers.models.llama.llama import LlamaForCausalLM
from mindformers.models.llama.llama_layer import LlamaRMSNorm
from mindformers.tools.register import MindFormerModuleType, MindFormerRegister

from knowlm.config import KnowLMConfig
from knowlm.cpu_ops import (DecodeMatMul, decode_steps, fuse_decode_layer, fuse_final_norm, fuse_rotary_embedding,
                            kernel_library)
from knowlm.errors import KnowLMError
from knowlm.generate import greedy_config, greedy_search
from knowlm.registry import checkpoint_for

log = logging.getLogger("knowlm")

_CPU_SAFE = dict(fused_rms_norm=False, use_rope_slice=True, use_flash_attention=False, is_dynamic=False,
                 compute_dtype="float32", param_init_type="float32", layernorm_compute_type="float32",
                 softmax_compute_type="float32", rotary_dtype="float32", embedding_init_type="float32",
                 residual_dtype="float32", disable_lazy_inline=True)


def on_ascend() -> bool:
    return ms.get_context("device_target") == "Ascend"


def portable_config(config: KnowLMConfig) -> KnowLMConfig:
    """A copy of ``config`` that avoids every Ascend-only kernel (identity on Ascend)."""
    if on_ascend():
        return config
    config = copy.deepcopy(config)
    for key, value in _CPU_SAFE.items():
        setattr(config, key, value)
    # LlamaConfig stores dtypes converted; rebuilding through __init__ keeps its conversions in one place.
    return type(config)(**config.to_dict())


def cache_dir() -> Path:
    """knowlm's cache folder: ``$KNOWLM_CACHE_DIR``, else ``$XDG_CACHE_HOME/knowlm`` (``~/.cache/knowlm``)."""
    if os.environ.get("KNOWLM_CACHE_DIR"):
        return Path(os.environ["KNOWLM_CACHE_DIR"])
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "knowlm"


@contextlib.contextmanager
def compile_cache(config, kernels=None):
    """Within the block, MindSpore keeps the graphs it compiles on disk, and a later process running the same model
    loads them instead of compiling (first generate call of the benchmark's small model: 5.2 s cold, 1.0 s cached).

    Used around generation only: training graphs carry the run's hyperparameters as constants and cannot be saved
    (PyExecute nodes). MindSpore re-reads the switch for each graph but takes the folder once per process, and it
    checks a cached graph against the network's parameters and its entry script's own imports, not against installed
    packages: the folder is therefore named after the MindSpore/MindFormers versions, knowlm's source, the model
    config and the kernel library its graphs call (``kernels``, see ``knowlm.cpu_ops``), so that a change to any of
    them compiles afresh. A ``MS_COMPILER_CACHE_ENABLE`` set by the user
    (``0`` turns caching off) is obeyed as it is.
    """
    if "MS_COMPILER_CACHE_ENABLE" in os.environ or not (sys.argv and os.path.isfile(sys.argv[0])):
        yield       # the user decides; or `python -c`/a REPL: MindSpore's cache needs an entry script to parse
        return
    ours = {"MS_COMPILER_CACHE_ENABLE": "1"}
    if "MS_COMPILER_CACHE_PATH" not in os.environ:
        digest = hashlib.sha256(_code_digest().encode())
        digest.update(json.dumps({key: value for key, value in config.to_dict().items()
                                  if key != "checkpoint_name_or_path"}, sort_keys=True, default=str).encode())
        digest.update(str(kernels).encode())
        ours["MS_COMPILER_CACHE_PATH"] = str(cache_dir() / "graphs" / digest.hexdigest()[:20])
    os.environ.update(ours)
    try:
        yield
    finally:        # nothing leaks into later training graphs or child processes
        for name in ours:
            os.environ.pop(name, None)


@functools.lru_cache(maxsize=None)
def _code_digest():
    # Once per process: generate runs once per batch of `knowlm extract`.
    digest = hashlib.sha256(json.dumps([version("mindspore"), version("mindformers")]).encode())
    package = Path(__file__).parent
    for path in sorted(package.glob("*.py")) + sorted(package.glob("csrc/*")):
        digest.update(path.read_bytes())
    return digest.hexdigest()


def use_graph_mode():
    if not on_ascend() and ms.get_context("mode") != ms.GRAPH_MODE:
        log.info("knowlm: switching MindSpore to GRAPH mode on %s (PYNATIVE dispatch is 10-40x slower here)",
                 ms.get_context("device_target"))
        ms.set_context(mode=ms.GRAPH_MODE)


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
    block with no transpose (three transposes of the whole cache per layer cost 4 ms of a 75 ms step in the
    benchmark's large config). Each head has one extra slot at its end: padding tokens (slot -1) are written there,
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
    # Sum over the last axis as a product with a column of ones: MindSpore's CPU ReduceSum over the last axis reads
    # ~1 GB/s, a MatMul is at full speed.
    return ops.matmul(x, ops.ones((x.shape[-1], 1), x.dtype))


class Softmax(nn.Cell):
    """Softmax over the last axis, its gradient ``y * (dy - sum(dy * y))`` summed by ``_row_sums`` (MindSpore's own
    gradient took 4 ms a layer of a 2 x 256 LoRA step on the benchmark's small config, this one 1 ms)."""

    def construct(self, x):
        return ops.softmax(x, -1)

    def bprop(self, x, out, dout):
        return (out * (dout - _row_sums(dout * out)),)


class RMSNormFunction(nn.Cell):
    """``x / sqrt(mean(x^2) + eps) * weight`` with its gradient written out, every sum over the hidden axis done by
    ``_row_sums``: MindFormers' RMSNorm spent ~2 ms a norm of that LoRA step in ReduceMean and its gradient."""

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


def _use_row_sum_gradients(network: LlamaForCausalLM):
    """Every RMSNorm and attention softmax of the model takes the cells above."""
    for _, cell in network.cells_and_names():
        if type(cell) is LlamaRMSNorm and cell.self_define:
            cell.__class__ = KnowLMRMSNorm
            cell.function = RMSNormFunction(cell.eps)
    for layer in network.model.layers:
        layer.attention.softmax = Softmax()


def _use_portable_kv_cache(network: LlamaForCausalLM):
    """Swap the three Ascend-only KV-cache kernels of every layer for the cells above."""
    for layer in network.model.layers:
        attention = layer.attention.infer_attention
        manager = attention.paged_attention_mgr
        num_blocks, block_size = manager.key_cache.shape[:2]
        slots = num_blocks * block_size
        # 2-D so that ScatterUpdate can write a Parameter in place.
        shape = (manager.n_kv_heads * (slots + 1), manager.head_dim)
        manager.key_cache = Parameter(ops.zeros(shape, mstype.float32), name="key_cache", requires_grad=False)
        manager.value_cache = Parameter(ops.zeros(shape, mstype.float32), name="value_cache", requires_grad=False)
        manager.reshape_and_cache = KVCacheWrite(manager.n_kv_heads, manager.head_dim, trash_slot=slots)
        manager.paged_attention = PagedAttentionReference(manager.n_heads, manager.n_kv_heads, manager.head_dim,
                                                          block_size, manager.scale_value, rows_per_head=slots + 1)
        attention.rotary_embedding = RotaryEmbeddingBSH(attention.n_head, attention.n_kv_head, attention.head_dim)


def _use_cpu_kernels(network: LlamaForCausalLM):
    """knowlm's kernels: the attention's RoPE without a KV cache (training) as one op with its gradient; with a KV
    cache, decode steps with each layer as one op, the final norm as one op and the lm_head as a matrix-vector
    product. Returns the kernel library (None: MindSpore's ops stay)."""
    library = kernel_library()
    if library is None:
        return None
    for layer in network.model.layers:
        rotary = getattr(layer.attention, "apply_rotary_emb", None)
        if rotary is not None:
            fuse_rotary_embedding(rotary, library)
    if network.config.use_past:
        network.lm_head.matmul = DecodeMatMul(library)
        fuse_final_norm(network.model.norm_out, library)
        for layer in network.model.layers:
            fuse_decode_layer(layer, library)
        # In the network's __dict__, not among its cells: it holds the network's own layers.
        network.__dict__["decode_steps"] = decode_steps(network, library)
    return library


def _argmax(logits, axis):
    # On the host: an eager ops.argmax launch costs ~2.5 ms per generated token on CPU, the copy far less.
    return ms.Tensor(np.argmax(logits.asnumpy(), axis).astype(np.int32))


def is_kv_cache_parameter(name: str) -> bool:
    return name.endswith(("key_cache", "value_cache"))


@MindFormerRegister.register(MindFormerModuleType.MODELS)
class KnowLMForCausalLM(LlamaForCausalLM):
    """``LlamaForCausalLM`` for KnowLM checkpoints; see the module docstring for what differs off Ascend.

    Weights: ``config.checkpoint_name_or_path`` may be a ``.ckpt`` file or a knowlm model directory; they are
    checked name by name and shape by shape (``knowlm.pretrained.load_weights``). A model built from a
    registered pipeline name must have weights (``knowlm.registry``).
    """

    config_class = KnowLMConfig

    def __init__(self, config: KnowLMConfig = None):
        config = portable_config(config if config is not None else KnowLMConfig())
        if getattr(config, "pipeline_name", None):
            # Resolved before the (possibly 13B) parameters are allocated, so a missing path fails at once.
            config.checkpoint_name_or_path = checkpoint_for(config.pipeline_name, config.checkpoint_name_or_path)
        use_graph_mode()
        # By keyword: MindFormers' lazy-inline decorator reads disable_lazy_inline only from a keyword config.
        super().__init__(config=config)
        self.kernel_library = None
        if not on_ascend():
            self.argmax = _argmax
            if not config.calculate_per_token_loss:
                self.loss = CrossEntropy()
            _use_row_sum_gradients(self)
            if config.use_past:
                _use_portable_kv_cache(self)
            if ms.get_context("device_target") == "CPU":
                self.kernel_library = _use_cpu_kernels(self)

    def load_checkpoint(self, config):
        # Imported here: knowlm.pretrained builds models, so it imports this module.
        from knowlm.pretrained import load_weights  # pylint: disable=import-outside-toplevel
        if config.checkpoint_name_or_path:
            load_weights(self, config.checkpoint_name_or_path)
            # Loaded: MindFormers' LoRA wrapper calls load_checkpoint on this config again, with its own loader.
            self.config.checkpoint_name_or_path = ""

    @classmethod
    def from_pretrained(cls, pretrained_model_name_or_dir, **overrides):
        """Load a knowlm model directory (``config.json``, MindSpore checkpoint, ``tokenizer.model``).

        Keyword overrides (``use_past``, ``batch_size``, ``seq_length``, ...) replace config values.
        """
        from knowlm.pretrained import load_config  # pylint: disable=import-outside-toplevel
        config = load_config(pretrained_model_name_or_dir, **overrides)
        config.checkpoint_name_or_path = str(pretrained_model_name_or_dir)
        return cls(config)

    def get_logits_processor(self, generation_config, input_ids_seq_length, logits_processor):
        return self._host_side(super().get_logits_processor(generation_config, input_ids_seq_length,
                                                            logits_processor))

    def get_logits_warper(self, generation_config):
        return self._host_side(super().get_logits_warper(generation_config))

    @staticmethod
    def _host_side(processors):
        if not on_ascend():
            processors.use_numpy = True
            for processor in processors:
                processor.use_numpy = True
        return processors

    def generate(self, input_ids, generation_config=None, logits_processor=None, streamer=None, seed=None,
                 **kwargs):
        shape = np.shape(input_ids)              # (length,) or (batch, padded length)
        batch, width = (1, shape[0]) if len(shape) == 1 else shape[:2]
        if width >= self.config.seq_length:
            raise KnowLMError(f"prompt is {width} tokens; the model's seq_length is "
                              f"{self.config.seq_length}, so at most {self.config.seq_length - 1} prompt tokens "
                              "leave room to generate: shorten the prompt or raise seq_length")
        # MindSpore's predict fast path reruns the graph last compiled for phase "prefill"/"increment" whatever the
        # input shape: after a change of batch size it must look the graphs up again (they stay cached by shape).
        if getattr(self, "_batch_size", None) != batch:
            self._batch_size = batch
            for phase in ("prefill", "increment"):
                self.phase_cache.pop(phase, None)
        with contextlib.nullcontext() if on_ascend() else compile_cache(self.config, self.kernel_library):
            greedy = None if on_ascend() else greedy_config(self, generation_config, logits_processor, kwargs)
            if greedy is not None:
                return greedy_search(self, np.reshape(input_ids, (batch, width)), greedy, streamer)
            return super().generate(input_ids, generation_config=generation_config,
                                    logits_processor=logits_processor, streamer=streamer, seed=seed, **kwargs)
