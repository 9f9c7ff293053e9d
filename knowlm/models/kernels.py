"""knowlm's own CPU kernels (``csrc/decode.cpp``), built on first use as MindSpore AOT custom ops: the whole model for
any number of new tokens (``Forward``: a prompt, by chunks, into the KV cache, or a decode step), many greedy decode
steps of a whole model (``DecodeSteps``), a decoder layer for one new token per sequence, a matrix-vector product
(the lm_head), the final RMSNorm; and, for training, the attention's RoPE and its gradient.

A prompt's cost follows its tokens: the kernels compute only the tokens given and attend only to the positions in the
cache, with no intermediate that outlives its layer, where MindFormers' graphs compute seq_length positions and keep
every intermediate. Decoding multiplies one new token per sequence by every weight, so its speed is the memory
bandwidth at which the weights stream: the kernels stream them close to it, each layer is one op instead of ~50, and
``DecodeSteps`` runs many greedy steps per call (the README's benchmark section has the figures). The 2-D weights may
be float32, bfloat16 or llama.cpp's Q8_0 blocks (uint8 rows; ``knowlm.checkpoints.quant``): each is read as stored
and computed on in float32.

The library is compiled with the system's C++ compiler (``$CXX``, else ``c++``) into knowlm's cache folder, once
per source and machine; its threads: ``kernel_threads()``. Without a compiler, or with ``KNOWLM_CPU_KERNELS=0``, the
models keep MindSpore's ops: same tokens and training steps, slower, with prompts at seq_length and float32 weights.
"""
import ctypes
import functools
import hashlib
import logging
import os
import platform
import shutil
import subprocess
from pathlib import Path

import numpy as np
import mindspore.common.dtype as mstype
from mindspore import ParameterTuple, Tensor, nn, ops
from mindformers.models.llama.llama_layer import LlamaRMSNorm, LlamaSiLU
from mindformers.models.llama.llama_transformer import LLamaDecodeLayer
from mindformers.modules.layers import RotaryEmbedding

from knowlm.checkpoints.names import KV_CACHE_NAMES, LAYER_CELLS, PROJECTIONS
from knowlm.errors import KnowLMError
from knowlm.files import atomic_write, cache_dir

log = logging.getLogger("knowlm")

SOURCE = Path(__file__).resolve().parent / "csrc" / "decode.cpp"
# -ffp-contract=off: no fused multiply-adds, so that the RoPE kernels round as MindSpore's separate Mul and Add ops do
# (training takes the same steps with or without them); the bandwidth-bound products lose nothing by it.
FLAGS = ("-O3", "-march=native", "-ffp-contract=off", "-pthread", "-shared", "-fPIC", "-std=c++17")
# Up to this many rows (sequences decoding at once) the kernel beats MatMul on the benchmark's weight shapes; at 16
# rows it is sometimes slower.
GEMV_MAX_ROWS = 8
_FALLBACK = "so MindSpore's ops run instead (slower decoding and training)"


def _cpu_signature() -> str:
    # -march=native: a library built on one CPU may not run on another sharing the cache folder.
    cpuinfo = Path("/proc/cpuinfo")
    if cpuinfo.is_file():
        lines = cpuinfo.read_text(errors="replace").splitlines()
        return next((line for line in lines if line.startswith(("flags", "Features"))), "")
    return platform.processor()


def kernel_threads() -> int:
    """Threads of the kernels: ``OMP_NUM_THREADS`` as this process started with it (the knob torch and BLAS
    libraries follow), else every core it may run on. Read here, not in the library: MindSpore sets the variable to 1
    in the process's C environment once it runs a graph, which would leave the kernels on one thread."""
    threads = os.environ.get("OMP_NUM_THREADS", "")
    if threads.isdigit() and int(threads) > 0:
        return int(threads)
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1   # (macOS)


@functools.lru_cache(maxsize=None)
def kernel_library():
    """Path of the compiled kernel library, or None (switched off, or no working compiler: logged once). Loaded
    here once to set its threads; MindSpore's own loading of the same file shares that instance."""
    library = _build_library()
    if library is None:
        return None
    try:
        handle = ctypes.CDLL(str(library))
        handle.KnowLMSetThreads
    except (OSError, AttributeError) as error:      # a damaged or foreign file in the cache: built again
        log.warning("knowlm: %s does not load (%s); building it again", library, error)
        library.unlink(missing_ok=True)
        library = _build_library()
        if library is None:
            return None
        handle = ctypes.CDLL(str(library))
    handle.KnowLMSetThreads(kernel_threads())
    return library


def _build_library():
    if os.environ.get("KNOWLM_CPU_KERNELS", "1") == "0":
        return None
    compiler = os.environ.get("CXX", "c++")
    digest = hashlib.sha256(SOURCE.read_bytes())
    digest.update(" ".join((compiler,) + FLAGS + (platform.machine(), _cpu_signature())).encode())
    library = cache_dir() / "kernels" / f"decode-{digest.hexdigest()[:20]}.so"
    if library.is_file():
        return library
    if shutil.which(compiler) is None:
        log.warning("knowlm: no C++ compiler (%s), %s; set CXX to one", compiler, _FALLBACK)
        return None
    try:
        library.parent.mkdir(parents=True, exist_ok=True)
        # atomic_write: two processes may build the same library at once, each in a folder of its own.
        atomic_write(library, _compile)
    except _BuildFailed as error:
        log.warning("knowlm: building %s failed (%s), %s", SOURCE, error, _FALLBACK)
        return None
    except (OSError, KnowLMError) as error:      # KnowLMError: atomic_write's "cannot be written"
        log.warning("knowlm: cannot build %s in %s (%s), %s", SOURCE.name, library.parent, error, _FALLBACK)
        return None
    return library


class _BuildFailed(Exception):
    """The compiler's last line of output."""


def _compile(output):
    done = subprocess.run([os.environ.get("CXX", "c++"), *FLAGS, "-o", str(output), str(SOURCE)],
                          capture_output=True, text=True, check=False)
    if done.returncode != 0:
        raise _BuildFailed((done.stderr.strip().splitlines() or ["no message"])[-1])


class DecodeMatMul(nn.Cell):
    """``MatMul(transpose_b=True)`` that uses the kernel when ``x`` has few rows (shapes are static in GRAPH mode,
    so each compiled graph holds one of the two)."""

    def __init__(self, library):
        super().__init__()
        self.gemv = ops.Custom(f"{library}:KnowLMGemv", out_shape=lambda x, w: [x[0], w[0]],
                               out_dtype=lambda x, w: x, func_type="aot")
        self.matmul = ops.MatMul(transpose_b=True)

    def construct(self, x, weight):
        if x.shape[0] <= GEMV_MAX_ROWS:
            return self.gemv(x, weight)
        return self.matmul(x, weight)


def _aot(library, name):
    # knowlm's kernel `name` as a MindSpore op whose output has its first input's shape and dtype.
    return ops.Custom(f"{library}:{name}", out_shape=lambda x, *_: x, out_dtype=lambda x, *_: x, func_type="aot")


class RotaryFunction(nn.Cell):
    """Rotate-half RoPE of ``x`` (..., S, D) by ``cos``/``sin`` (S x D values) as one ``KnowLMRope`` op; its gradient
    is one ``KnowLMRopeGrad`` op (the rotation transposed)."""

    def __init__(self, library):
        super().__init__()
        self.forward = _aot(library, "KnowLMRope")
        self.backward = _aot(library, "KnowLMRopeGrad")

    def construct(self, x, cos, sin):
        return self.forward(x, cos, sin)

    def bprop(self, x, cos, sin, out, dout):
        return self.backward(dout, cos, sin), ops.zeros_like(cos), ops.zeros_like(sin)


class KernelRotaryEmbedding(RotaryEmbedding):
    """MindFormers' ``RotaryEmbedding`` (the attention's RoPE without a KV cache: training, and models built with
    ``use_past=False``) with query and key each one ``RotaryFunction``: its ~14 ops a layer forward and as many
    backward were a tenth of the benchmark's small LoRA step. Made by ``fuse_rotary_embedding``."""

    def construct(self, xq, xk, freqs_cis):
        cos, sin, _ = freqs_cis
        if cos.size != xq.shape[-2] * xq.shape[-1]:       # a table per sequence: MindFormers' ops broadcast it
            return super().construct(xq, xk, freqs_cis)
        return self.rotate(xq, cos, sin), self.rotate(xk, cos, sin)


def fuse_rotary_embedding(rotary, library) -> bool:
    """Make ``rotary`` (a float32 rotate-half ``RotaryEmbedding``) a ``KernelRotaryEmbedding``; False, and it left as
    it is, otherwise."""
    if type(rotary) is not RotaryEmbedding or not rotary.use_rope_slice or rotary.dtype != mstype.float32:
        return False
    rotary.__class__ = KernelRotaryEmbedding
    rotary.rotate = RotaryFunction(library)
    return True


class KernelRMSNorm(LlamaRMSNorm):
    """MindFormers' ``LlamaRMSNorm`` as one ``KnowLMRmsNorm`` op, forward only: a generation model's final norm (its
    ~8 MindSpore ops were a visible part of a small model's decode step). Made by ``fuse_final_norm``."""

    def construct(self, x):
        return self.kernel(x, self.weight, self.meta)


def fuse_final_norm(norm, library) -> bool:
    """Make ``norm`` (a float32 ``LlamaRMSNorm``) a ``KernelRMSNorm``; False, and the norm left as it is, otherwise."""
    if not isinstance(norm, LlamaRMSNorm) or norm.weight.dtype != mstype.float32:
        return False
    norm.__class__ = KernelRMSNorm
    norm.kernel = _aot(library, "KnowLMRmsNorm")
    norm.meta = Tensor(np.array([norm.eps], np.float32))
    return True


class FusedDecodeLayer(LLamaDecodeLayer):
    """MindFormers' decoder layer whose decode step (one new token per sequence) is one ``KnowLMDecodeLayer`` op;
    the prefill runs MindFormers' own ops. Made from a built layer by ``fuse_decode_layer``, which keeps its
    parameters and swaps its class."""

    def construct(self, x, freqs_cis, mask=None, batch_valid_length=None, block_tables=None, slot_mapping=None,
                  prefix_keys_values=None, q_seq_lens=None, kv_mask=None, seq_chunk=None, actual_seq_len=None):
        if x.ndim == 3 and x.shape[1] == 1 and prefix_keys_values is None:
            out = self.decode_kernel(x.reshape(x.shape[0], x.shape[2]), *self.kernel_inputs(), freqs_cis[0],
                                     freqs_cis[1], batch_valid_length, block_tables, slot_mapping, self.decode_meta)
            return out.reshape(x.shape)
        return super().construct(x, freqs_cis, mask, batch_valid_length, block_tables, slot_mapping,
                                 prefix_keys_values, q_seq_lens, kv_mask, seq_chunk, actual_seq_len)

    def kernel_inputs(self):
        """The layer's weights and KV cache in the order the kernels take them (``Layer`` in csrc/decode.cpp): the
        weight table's order, ``knowlm.checkpoints.names.LAYER_CELLS``."""
        cache = self.attention.infer_attention.paged_attention_mgr
        return tuple(_cell(self, path).weight for path in LAYER_CELLS) + \
            tuple(getattr(cache, name) for name in KV_CACHE_NAMES)


def fuse_decode_layer(layer, library) -> bool:
    """Make ``layer`` (a ``LLamaDecodeLayer`` with knowlm's portable KV cache) a ``FusedDecodeLayer``; False, and
    the layer left as it is, for a variant the kernel does not compute (biases, concatenated q/k/v or gate/up,
    another activation or norm)."""
    attention, ffn = layer.attention, layer.feed_forward
    linears = [_cell(layer, path) for path in PROJECTIONS]
    if type(layer) is not LLamaDecodeLayer or any(linear is None or linear.has_bias for linear in linears) \
            or not isinstance(getattr(ffn.w1, "activation", None), LlamaSiLU) \
            or any(linear.activation_flag for linear in linears if linear is not ffn.w1) \
            or not all(isinstance(norm, LlamaRMSNorm) for norm in (layer.attention_norm, layer.ffn_norm)):
        return False
    layer.__class__ = FusedDecodeLayer
    layer.decode_kernel = _aot(library, "KnowLMDecodeLayer")
    block_size = attention.infer_attention.paged_attention_mgr.paged_attention.block_size
    layer.decode_meta = Tensor(np.array([attention.n_head, layer.attention_norm.eps, block_size], np.float32))
    return True


def _cell(layer, path):
    # "attention.wq" -> layer.attention.wq (None where a variant has no such cell).
    for name in path.split("."):
        layer = getattr(layer, name, None)
    return layer


# Weight dtypes the model kernels read (2-D weights: float32, bfloat16, or uint8 rows of llama.cpp's Q8_0 blocks).
KERNEL_WEIGHT_DTYPES = (mstype.float32, mstype.bfloat16, mstype.uint8)


class _ModelKernel(nn.Cell):
    """A kernel over a whole network: its own graph, over the network's parameters and KV cache (the kernels'
    ``Model`` inputs: embedding, RoPE tables, final norm, lm_head, meta, then every layer's weights and cache).

    The parameters are gathered once, here, into one ``ParameterTuple``: a graph that gathered them in ``construct``
    (a loop over the layers) compiled for ~10 s, this one in well under a second. They are the network's own
    Parameter objects, so weights loaded into the network later are what the kernel reads."""

    def __init__(self, network, library, kernel, out_shape, out_dtype):
        super().__init__(auto_prefix=False)      # the network's parameters keep their names
        model = network.model
        self.cos, self.sin = model.freqs_mgr.freqs_cos, model.freqs_mgr.freqs_sin
        self.meta = Tensor(np.array([*model.layers[0].decode_meta.asnumpy(), model.norm_out.eps], np.float32))
        self.block_size = int(self.meta.asnumpy()[2])
        self.head = ParameterTuple((model.tok_embeddings.embedding_weight,))
        self.tail = ParameterTuple((model.norm_out.weight, network.lm_head.weight))
        self.layer_inputs = ParameterTuple([parameter for layer in model.layers for parameter in layer.kernel_inputs()])
        self.kernel = ops.Custom(f"{library}:{kernel}", out_shape=out_shape, out_dtype=out_dtype, func_type="aot")

    def model_inputs(self):
        return self.head + (self.cos, self.sin) + self.tail + (self.meta,) + self.layer_inputs


class Forward(_ModelKernel):
    """The whole model for up to ``tokens.shape[1]`` new tokens of each sequence as one ``KnowLMForward`` op: their
    keys and values go into the cache, the logits of each sequence's last new token come out (batch, vocab). A
    prompt is run ``CHUNK`` tokens per call (``knowlm.models.decoding.prefill``), so time and memory follow the
    prompt, not seq_length; a decode step is one call with one token per sequence. Made by ``forward_kernel``."""

    CHUNK = 256

    def __init__(self, network, library):
        vocab = network.lm_head.weight.shape[0]
        super().__init__(network, library, "KnowLMForward", lambda tokens, *_: [tokens[0], vocab],
                         lambda *_: mstype.float32)

    def construct(self, tokens, starts, counts, block_tables):
        return self.kernel(tokens, starts, counts, block_tables, *self.model_inputs())


class DecodeSteps(_ModelKernel):
    """Up to ``STEPS`` greedy decode steps of a network as one ``KnowLMDecodeSteps`` op: each step computes what a
    ``Forward`` call with one token per sequence does, with the same kernel functions, and takes the argmax. Saves
    MindSpore's graph entry and exit and the Python loop around each token. Made by ``decode_steps``."""

    STEPS = 32

    def __init__(self, network, library):
        super().__init__(network, library, "KnowLMDecodeSteps", lambda tokens, *_: [tokens[0], self.STEPS],
                         lambda tokens, *_: tokens)

    def construct(self, tokens, valid, steps, block_tables, eos):
        return self.kernel(tokens, valid, steps, block_tables, eos, *self.model_inputs())


def _whole_model_kernels(network) -> bool:
    # Every layer a FusedDecodeLayer, the final norm a KernelRMSNorm, an lm_head without bias or activation, weights
    # in a dtype the kernels read.
    model, head = network.model, network.lm_head
    return all(type(layer) is FusedDecodeLayer for layer in model.layers) and type(model.norm_out) is KernelRMSNorm \
        and not head.has_bias and not head.activation_flag and head.transpose_b \
        and head.weight.dtype in KERNEL_WEIGHT_DTYPES \
        and model.tok_embeddings.embedding_weight.dtype in KERNEL_WEIGHT_DTYPES \
        and model.freqs_mgr.freqs_cos.dtype == mstype.float32


def forward_kernel(network, library):
    """A ``Forward`` for ``network`` (see ``_whole_model_kernels``), else None."""
    return Forward(network, library) if library is not None and _whole_model_kernels(network) else None


def decode_steps(network, library):
    """A ``DecodeSteps`` for ``network`` (see ``_whole_model_kernels``), else None."""
    return DecodeSteps(network, library) if library is not None and _whole_model_kernels(network) else None
