"""KnowLM causal language model: MindFormers' ``LlamaForCausalLM`` made to run anywhere MindSpore runs.

Reference numerics: Hugging Face ``transformers``' ``modeling_llama.py`` (rotate-half RoPE, RMSNorm, GQA).
On Ascend nothing here changes MindFormers' behaviour. On CPU and GPU, ``KnowLMForCausalLM`` swaps, inside its
own instance only, the pieces of MindFormers' LLaMA that have Ascend-only kernels:

1. configuration (``portable_config``): fused ``RmsNorm`` off, sliced rotary embedding (the ``BatchMatMul``
   swap-mask form does not broadcast on CPU), no flash attention, float32 everywhere (bf16/fp16 lack CPU kernels);
2. KV cache (``use_past=True``): ``ApplyRotaryPosEmb``, ``ReshapeAndCache`` and ``PagedAttention`` are replaced
   by ``RotaryEmbeddingBSH``, ``KVCacheWrite`` and ``PagedAttentionReference`` (``knowlm.models.layers``);
3. decoding: greedy calls run knowlm's own loop (``knowlm.models.decoding``: same tokens, less Python per token;
   with knowlm's kernels, many decode steps per call); other calls run MindFormers' loop with the argmax on the
   host instead of ``mint.argmax`` and the sampling processors in numpy (``mint.topk``/``sort``/``cumsum`` have no
   CPU kernels); the final draw is numpy, so ``seed`` reproduces;
4. execution: GRAPH mode, because MindSpore's default asynchronous PYNATIVE dispatch is many times slower on CPU,
   with the generation graphs kept on disk (``knowlm.runtime.compile_cache``) so that only a model's first run
   compiles;
5. training: ``CrossEntropy`` instead of MindFormers' one-hot cross-entropy (built for sharding over devices);
   RMSNorm and the attention softmax with gradients whose sums over the hidden/key axis are matmuls;
6. knowlm's kernels on CPU (``knowlm.models.kernels``): with a KV cache, the whole model is one op for the tokens
   given (``Forward``): a prompt by chunks of its own tokens, not seq_length padded ones, and a decode step; greedy
   decoding runs many decode steps, argmax included, in one op; ``forward`` routes MindFormers' own generation loop
   through them. Their weights may stay bfloat16 or int8 (llama.cpp's Q8_0) as a model directory stores them.
   Without a KV cache (training), the attention's RoPE is one op forward and one backward.
"""
import contextlib
import copy

import mindspore as ms
import mindspore.common.dtype as mstype
import numpy as np
from mindspore import Parameter, ops
from mindspore.nn.utils import no_init_parameters
from mindformers.models.llama.llama import LlamaForCausalLM
from mindformers.models.llama.llama_layer import LlamaRMSNorm
from mindformers.tools.register import MindFormerModuleType, MindFormerRegister

from knowlm.checkpoints.model_dir import load_config, load_weights
from knowlm.checkpoints.names import is_kv_cache_parameter
from knowlm.errors import KnowLMError
from knowlm.models.config import KnowLMConfig
from knowlm.models.decoding import (greedy_config, greedy_search, picked_config, prefill as prefill_logits,
                                    step as step_logits)
from knowlm.models.kernels import (DecodeMatMul, decode_steps, forward_kernel, fuse_decode_layer, fuse_final_norm,
                                   fuse_rotary_embedding, kernel_library)
from knowlm.models.layers import (CrossEntropy, KnowLMRMSNorm, KVCacheWrite, PagedAttentionReference,
                                  RMSNormFunction, RotaryEmbeddingBSH, Softmax)
from knowlm.models.pipelines import checkpoint_for
from knowlm.runtime import compile_cache, on_ascend, use_graph_mode

_CPU_SAFE = dict(fused_rms_norm=False, use_rope_slice=True, use_flash_attention=False, is_dynamic=False,
                 compute_dtype="float32", param_init_type="float32", layernorm_compute_type="float32",
                 softmax_compute_type="float32", rotary_dtype="float32", embedding_init_type="float32",
                 residual_dtype="float32", disable_lazy_inline=True)



def portable_config(config: KnowLMConfig) -> KnowLMConfig:
    """A copy of ``config`` that avoids every Ascend-only kernel (on Ascend: ``config``, with int8 (Q8_0) storage
    built as float32 parameters: its weights are widened to them when loaded)."""
    if on_ascend():
        if str(config.param_init_type).lower() != "int8":
            return config
        config = copy.deepcopy(config)
        config.param_init_type = config.embedding_init_type = "float32"
        return type(config)(**config.to_dict())
    config = copy.deepcopy(config)
    for key, value in _CPU_SAFE.items():
        setattr(config, key, value)
    # LlamaConfig stores dtypes converted; rebuilding through __init__ keeps its conversions in one place.
    return type(config)(**config.to_dict())


def _use_row_sum_gradients(network: LlamaForCausalLM):
    """Every RMSNorm and attention softmax of the model takes knowlm's cells with matmul row sums."""
    for _, cell in network.cells_and_names():
        if type(cell) is LlamaRMSNorm and cell.self_define:
            cell.__class__ = KnowLMRMSNorm
            cell.function = RMSNormFunction(cell.eps)
    for layer in network.model.layers:
        layer.attention.softmax = Softmax()


def _use_portable_kv_cache(network: LlamaForCausalLM):
    """Swap the three Ascend-only KV-cache kernels of every layer for knowlm's portable cells."""
    for index, layer in enumerate(network.model.layers):
        attention = layer.attention.infer_attention
        manager = attention.paged_attention_mgr
        # Named per layer: the whole-model kernels gather every layer's cache into one ParameterTuple.
        prefix = f"model.layers.{index}.attention.infer_attention.paged_attention_mgr."
        num_blocks, block_size = manager.key_cache.shape[:2]
        slots = num_blocks * block_size
        # 2-D so that ScatterUpdate can write a Parameter in place.
        shape = (manager.n_kv_heads * (slots + 1), manager.head_dim)
        manager.key_cache = Parameter(ops.zeros(shape, mstype.float32), name=prefix + "key_cache",
                                      requires_grad=False)
        manager.value_cache = Parameter(ops.zeros(shape, mstype.float32), name=prefix + "value_cache",
                                        requires_grad=False)
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
        # In the network's __dict__, not among its cells: they hold the network's own layers.
        network.__dict__["forward_kernel"] = forward_kernel(network, library)
        network.__dict__["decode_steps"] = decode_steps(network, library)
    return library


def _runs_cpu_kernels(config) -> bool:
    """Whether a model of ``config`` will compute generation with knowlm's whole-model kernels only (so its weights
    may stay bfloat16 or Q8_0 as stored: nothing of MindFormers' computes with them)."""
    return config.use_past and not on_ascend() and ms.get_context("device_target") == "CPU" \
        and kernel_library() is not None


def weight_dtypes(network) -> tuple:
    """The distinct dtypes of ``network``'s weights (not its KV cache), e.g. ``("Float32", "UInt8")``."""
    return tuple(sorted({str(p.dtype) for p in network.get_parameters() if not is_kv_cache_parameter(p.name)}))


def padding_id(rows, preferred) -> int:
    """``preferred``, or the smallest id that ends none of ``rows`` if one ends with it."""
    ends = {int(ids[-1]) for ids in rows if len(ids)}
    return preferred if preferred not in ends else next(i for i in range(len(ends) + 1) if i not in ends)


def _rows_and_padding(input_ids, kwargs, default_pad):
    """One prompt, or rows of different lengths, right-padded with an id that ends none of them (and
    ``pad_token_id`` set to it); rows of one width as given (MindFormers' reading: trailing pad ids are padding)."""
    if isinstance(input_ids, np.ndarray) and input_ids.ndim == 2:
        return input_ids, kwargs
    rows = [list(row) for row in input_ids] if len(input_ids) and not np.isscalar(input_ids[0]) else [list(input_ids)]
    if len(rows) > 1 and len({len(row) for row in rows}) == 1:
        return input_ids, kwargs
    preferred = kwargs.get("pad_token_id", default_pad if default_pad is not None else 0)
    pad = padding_id(rows, preferred)
    width = max(len(row) for row in rows)
    return [row + [pad] * (width - len(row)) for row in rows], {**kwargs, "pad_token_id": pad}


def _argmax(logits, axis):
    # On the host: an eager ops.argmax launch per generated token costs far more on CPU than the copy.
    return ms.Tensor(np.argmax(logits.asnumpy(), axis).astype(np.int32))


@MindFormerRegister.register(MindFormerModuleType.MODELS)
class KnowLMForCausalLM(LlamaForCausalLM):
    """``LlamaForCausalLM`` for KnowLM checkpoints; see the module docstring for what differs off Ascend.

    Weights: ``config.checkpoint_name_or_path`` may be a ``.ckpt`` file or a knowlm model directory; they are
    checked name by name and shape by shape (``knowlm.checkpoints.model_dir.load_weights``). A model built from a
    registered pipeline name must have weights (``knowlm.models.registry``).
    """

    config_class = KnowLMConfig

    def __init__(self, config: KnowLMConfig = None):
        config = portable_config(config if config is not None else KnowLMConfig())
        if getattr(config, "pipeline_name", None):
            # Resolved before the (possibly 13B) parameters are allocated, so a missing path fails at once.
            config.checkpoint_name_or_path = checkpoint_for(config.pipeline_name, config.checkpoint_name_or_path)
        use_graph_mode()
        # Weights that a checkpoint is about to replace are not filled with random values first (seconds for a small
        # model, and a 13B model's float32 parameters would not fit in memory before its bf16/int8 weights replace
        # them): load_weights gives every one of them its value, or fails.
        skip_init = no_init_parameters() if config.checkpoint_name_or_path and not on_ascend() else \
            contextlib.nullcontext()
        with skip_init:
            # By keyword: MindFormers' lazy-inline decorator reads disable_lazy_inline only from a keyword config.
            super().__init__(config=config)
        # Attention masks follow positions, never token values: MindFormers' mask also hides every key whose token
        # is pad_token_id, i.e. a real <unk>, </s> or <|im_end|> inside a prompt. Right padding needs no mask of
        # its own (a real query never looks past itself; decode steps attend up to batch_valid_length).
        self.model.casual_mask.pad_token_id = -1
        # The same for the training loss: MindFormers drops every position whose *input* token is the pad id (the
        # prediction after a mid-sample <|im_end|> or <unk>); the labels' IGNORE_INDEX alone says what is learned.
        self.pad_token_id = -1
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
        # Once: the weights' storage is settled by loading, and generate keys its compile cache by it.
        self.__dict__["stored_dtypes"] = weight_dtypes(self)
        if self.stored_dtypes != ("Float32",) and self.__dict__.get("forward_kernel") is None:
            raise KnowLMError(f"weights stored as {', '.join(self.stored_dtypes)} run on knowlm's CPU kernels only "
                              "(use_past=True, a C++ compiler); convert the model with --dtype fp32 to run it here")

    def load_checkpoint(self, config):
        if config.checkpoint_name_or_path:
            # bf16 and Q8_0 weights stay as stored where knowlm's kernels do all the computing (they read them as
            # they are); anything of MindFormers' (training, Ascend, no compiler) gets them widened to float32.
            load_weights(self, config.checkpoint_name_or_path, keep_storage=_runs_cpu_kernels(config))
            # Loaded: MindFormers' LoRA wrapper calls load_checkpoint on this config again, with its own loader.
            self.config.checkpoint_name_or_path = ""

    @classmethod
    def from_pretrained(cls, pretrained_model_name_or_dir, **overrides):
        """Load a knowlm model directory (``config.json``, MindSpore checkpoint, ``tokenizer.model``).

        Keyword overrides (``use_past``, ``batch_size``, ``seq_length``, ...) replace config values.
        """
        config = load_config(pretrained_model_name_or_dir, **overrides)
        config.checkpoint_name_or_path = str(pretrained_model_name_or_dir)
        return cls(config)

    def forward(self, input_ids, valid_length_each_example, block_tables=None, slot_mapping=None, prefill=None,
                use_past=False, **kwargs):
        """MindFormers' model call inside its ``generate`` loop; with knowlm's ``Forward`` kernel, a prompt runs by
        chunks into the KV cache (``knowlm.models.decoding.prefill``) and a decode step is one kernel call."""
        forward = self.__dict__.get("forward_kernel")
        if forward is None or not use_past or block_tables is None:
            return super().forward(input_ids, valid_length_each_example, block_tables=block_tables,
                                   slot_mapping=slot_mapping, prefill=prefill, use_past=use_past, **kwargs)
        ids = np.reshape(input_ids, (-1, np.shape(input_ids)[-1]))
        valid = np.asarray(valid_length_each_example, np.int32)
        rows = np.arange(ids.shape[0])
        logits = prefill_logits(forward, ids, valid, block_tables) if prefill else \
            step_logits(forward, ids[rows, valid - 1], valid, block_tables)
        return ms.Tensor(logits), valid - 1 + rows * ids.shape[1]

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
                 pick=None, **kwargs):
        """MindFormers' ``generate``, where a row's length is known from the input, not guessed from its tokens.

        ``input_ids``: one prompt (a list of ids, or a batch of one), or rows of different lengths, padded here
        with an id that no row ends with (``padding_id``): every token of such a row is prompt, pad ids included.
        Rows of one width (what MindFormers' pipeline passes) keep MindFormers' reading: trailing ``pad_token_id``
        ids are padding, so ``knowlm.generate`` pads its batches with an id no prompt ends with.
        """
        input_ids, kwargs = _rows_and_padding(input_ids, kwargs, self.config.pad_token_id)
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
        if pick is not None:
            config = picked_config(self, generation_config, kwargs)
            # One decode step per call: other graphs, in another order, than the greedy loop's (its own cache).
            with compile_cache(self.config, self.kernel_library, graphs=(batch, "pick", self.stored_dtypes)):
                return greedy_search(self, np.reshape(input_ids, (batch, width)), config, streamer, pick)
        if on_ascend():
            return super().generate(input_ids, generation_config=generation_config,
                                    logits_processor=logits_processor, streamer=streamer, seed=seed, **kwargs)
        greedy = greedy_config(self, generation_config, logits_processor, kwargs)
        # knowlm's greedy loop and MindFormers' compile different graphs, and graphs over bf16 or Q8_0 weights
        # differ from float32 ones: part of the compile cache's key.
        with compile_cache(self.config, self.kernel_library, graphs=(batch, greedy is not None, self.stored_dtypes)):
            if greedy is not None:
                return greedy_search(self, np.reshape(input_ids, (batch, width)), greedy, streamer)
            return super().generate(input_ids, generation_config=generation_config,
                                    logits_processor=logits_processor, streamer=streamer, seed=seed, **kwargs)
