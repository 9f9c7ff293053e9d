"""knowlm's decode kernels (knowlm/csrc/decode.cpp) against numpy and MindFormers' ops, and their fallbacks."""
import ctypes
import logging
import os
import subprocess
import sys

import mindspore as ms
import numpy as np
import pytest
import torch
import transformers
from mindformers.models.llama.llama_layer import LlamaRMSNorm
from mindformers.modules.layers import RotaryEmbedding
from mindspore import nn, ops

from reference import TINY_HF, hf_greedy, save_hf_checkpoint
from knowlm import KnowLMConfig, KnowLMForCausalLM
from knowlm.checkpoints import convert
from knowlm.models.kernels import (GEMV_MAX_ROWS, DecodeMatMul, FusedDecodeLayer, KernelRMSNorm, KernelRotaryEmbedding,
                            fuse_final_norm, fuse_rotary_embedding, kernel_library, kernel_threads)


class Product(nn.Cell):
    def __init__(self, op):
        super().__init__()
        self.op = op

    def construct(self, x, weight):
        return self.op(x, weight)


@pytest.fixture
def fresh_library(monkeypatch, tmp_path):
    """``kernel_library`` rebuilt under the test's environment (and cached again afterwards as before)."""
    monkeypatch.setenv("KNOWLM_CACHE_DIR", str(tmp_path / "cache"))
    kernel_library.cache_clear()
    yield monkeypatch
    kernel_library.cache_clear()


# Row counts up to GEMV_MAX_ROWS; widths not multiples of the kernel's 16 lanes, output sizes not multiples of its
# 8-row groups, next to the model's own (512 wide); rows short enough to be read one at a time, and longer ones.
@pytest.mark.parametrize("rows", [1, 3, GEMV_MAX_ROWS])
@pytest.mark.parametrize("n_out, width", [(37, 40), (64, 512), (1001, 24), (37, 1100), (64, 2048)])
def test_kernel_equals_numpy_product(rows, n_out, width):
    rng = np.random.default_rng(rows * n_out)
    x, weight = rng.standard_normal((rows, width), np.float32), rng.standard_normal((n_out, width), np.float32)
    got = Product(DecodeMatMul(kernel_library()).gemv)(ms.Tensor(x), ms.Tensor(weight)).asnumpy()
    expected = x.astype(np.float64) @ weight.astype(np.float64).T
    assert got.shape == (rows, n_out)
    assert np.abs(got - expected).max() <= 1e-5 * np.abs(expected).max()


def test_final_norm_kernel_equals_mindformers_rmsnorm():
    rng = np.random.default_rng(5)
    x, weight = rng.standard_normal((2, 3, 72), np.float32), rng.standard_normal(72).astype(np.float32)
    norms = [LlamaRMSNorm(72, eps=1e-5, fused_kernel=False) for _ in range(2)]
    for norm in norms:
        norm.weight.set_data(ms.Tensor(weight))
    assert fuse_final_norm(norms[1], kernel_library()) and isinstance(norms[1], KernelRMSNorm)
    expected, got = (norm(ms.Tensor(x)).asnumpy() for norm in norms)
    assert got.shape == x.shape and np.abs(got - expected).max() <= 1e-5 * np.abs(expected).max()


class RopeLoss(nn.Cell):
    """sum(RoPE(q) * rq) + sum(RoPE(k) * rk): its gradients are RoPE's vector-Jacobian products."""

    def __init__(self, rotary, cos, sin):
        super().__init__()
        self.rotary = rotary
        self.freqs = (cos, sin, cos)        # the third, a swap mask, is unused by the rotate-half form

    def construct(self, q, k, rq, rk):
        q, k = self.rotary(q, k, self.freqs)
        return (q * rq).sum() + (k * rk).sum()


@pytest.mark.parametrize("tables", [1, 2])        # one cos/sin table for all sequences (the kernel), one each
def test_rope_kernel_and_its_gradient_equal_mindformers_rotary_embedding(tables):
    rng = np.random.default_rng(6)
    angles = rng.uniform(0, 6, (tables, 1, 5, 8)).astype(np.float32)
    cos, sin = ms.Tensor(np.cos(angles)), ms.Tensor(np.sin(angles))
    inputs = [ms.Tensor(rng.standard_normal(shape, np.float32)) for shape in [(2, 4, 5, 8), (2, 2, 5, 8)] * 2]
    rotaries = [RotaryEmbedding(8, ms.float32, use_rope_slice=True) for _ in range(2)]
    assert fuse_rotary_embedding(rotaries[1], kernel_library()) and isinstance(rotaries[1], KernelRotaryEmbedding)
    results = []
    for rotary in rotaries:
        loss = RopeLoss(rotary, cos, sin)
        gradients = ops.GradOperation(get_all=True)(loss)(*inputs)[:2]
        results.append([out.asnumpy() for out in rotary(*inputs[:2], (cos, sin, cos)) + gradients])
    assert all(np.array_equal(got, expected) for got, expected in zip(results[1], results[0]))   # rounded alike


def test_models_without_kv_cache_use_the_rope_kernel(model_dir):
    model = KnowLMForCausalLM.from_pretrained(model_dir, use_past=False)
    assert all(isinstance(layer.attention.apply_rotary_emb, KernelRotaryEmbedding) for layer in model.model.layers)


def test_kernels_run_on_the_threads_knowlm_asks_for_not_on_mindspores_omp_setting():
    # MindSpore sets OMP_NUM_THREADS=1 in its C environment once it runs a graph; the kernels read their threads
    # from the library instance knowlm loaded, which must be the one MindSpore calls.
    library = kernel_library()
    x = np.ones((1, 64), np.float32)
    Product(DecodeMatMul(library).gemv)(ms.Tensor(x), ms.Tensor(np.ones((64, 64), np.float32))).asnumpy()
    assert ctypes.CDLL(str(library)).KnowLMThreads() == kernel_threads()


@pytest.mark.parametrize("omp, expected", [("3", 3), (None, len(os.sched_getaffinity(0))),
                                           ("0", len(os.sched_getaffinity(0)))])
def test_kernel_threads_follow_omp_num_threads_else_every_core(monkeypatch, omp, expected):
    if omp is None:
        monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    else:
        monkeypatch.setenv("OMP_NUM_THREADS", omp)
    assert kernel_threads() == expected


def test_more_rows_than_the_kernel_takes_use_matmul():
    rng = np.random.default_rng(0)
    x, weight = rng.standard_normal((GEMV_MAX_ROWS + 1, 40), np.float32), rng.standard_normal((24, 40), np.float32)
    got = Product(DecodeMatMul(kernel_library()))(ms.Tensor(x), ms.Tensor(weight)).asnumpy()
    assert np.allclose(got, x @ weight.T, rtol=1e-5, atol=1e-5)


def test_kernel_can_be_switched_off(fresh_library):
    fresh_library.setenv("KNOWLM_CPU_KERNELS", "0")
    assert kernel_library() is None


@pytest.mark.parametrize("compiler, message", [("/nonexistent/c++", "no C++ compiler"),
                                               ("false", "failed")])
def test_without_a_working_compiler_decoding_falls_back_with_one_warning(fresh_library, caplog, tmp_path, compiler,
                                                                         message):
    fresh_library.setenv("CXX", compiler)
    with caplog.at_level(logging.WARNING, logger="knowlm"):
        assert kernel_library() is None
    assert len(caplog.records) == 1 and message in caplog.records[0].getMessage()
    assert not [path for path in (tmp_path / "cache").rglob("*") if path.is_file()]     # no partial library left


def test_a_damaged_library_in_the_cache_is_built_again(fresh_library, tmp_path):
    library = kernel_library()
    library.unlink()            # a new file: this process keeps the one it loaded mapped
    library.write_bytes(b"\x7fELF but not a library")
    # A later process finds the damaged file.
    code = "from knowlm.models.kernels import kernel_library; print(kernel_library())"
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=False,
                          env={**os.environ, "KNOWLM_CACHE_DIR": str(tmp_path / "cache")})
    assert done.returncode == 0 and done.stdout.splitlines()[-1] == str(library), done.stderr[-2000:]
    assert "does not load" in done.stderr and "building it again" in done.stderr
    assert library.read_bytes().startswith(b"\x7fELF") and library.stat().st_size > 1000


def test_unwritable_cache_folder_falls_back_with_one_warning(fresh_library, caplog, tmp_path):
    (tmp_path / "file").write_text("not a folder")
    fresh_library.setenv("KNOWLM_CACHE_DIR", str(tmp_path / "file"))
    with caplog.at_level(logging.WARNING, logger="knowlm"):
        assert kernel_library() is None
    assert len(caplog.records) == 1 and "cannot build" in caplog.records[0].getMessage()
    assert (tmp_path / "file").read_text() == "not a folder"


def test_decode_model_uses_the_kernel_and_generates_as_with_matmul(model_dir, fresh_library):
    prompts = [[1, 17, 250, 31, 999, 5, 42], [1, 600, 7, 7, 300, 0, 0]]     # right-padded batch
    fast = KnowLMForCausalLM.from_pretrained(model_dir, use_past=True)
    assert fast.kernel_library is not None and isinstance(fast.lm_head.matmul, DecodeMatMul)
    assert all(isinstance(layer, FusedDecodeLayer) for layer in fast.model.layers)
    assert isinstance(fast.model.norm_out, KernelRMSNorm)
    fresh_library.setenv("KNOWLM_CPU_KERNELS", "0")
    kernel_library.cache_clear()
    reference = KnowLMForCausalLM.from_pretrained(model_dir, use_past=True)
    assert reference.kernel_library is None
    assert not any(isinstance(cell, (DecodeMatMul, FusedDecodeLayer, KernelRMSNorm))
                   for _, cell in reference.cells_and_names())
    tokens = [fast.generate(prompts, max_new_tokens=16, do_sample=False),
              reference.generate(prompts, max_new_tokens=16, do_sample=False)]
    assert [row.tolist() for row in tokens[0]] == [row.tolist() for row in tokens[1]]


def test_layer_variant_the_kernel_does_not_compute_keeps_mindformers_ops():
    config = KnowLMConfig.from_name("tiny", use_past=True, batch_size=1, seq_length=32, qkv_has_bias=True)
    ms.set_seed(0)
    model = KnowLMForCausalLM(config)
    assert model.kernel_library is not None and isinstance(model.lm_head.matmul, DecodeMatMul)
    assert not any(isinstance(layer, FusedDecodeLayer) for layer in model.model.layers)
    ms.set_seed(0)
    no_cache = KnowLMForCausalLM(KnowLMConfig.from_name("tiny", use_past=False, batch_size=1, seq_length=32,
                                                        qkv_has_bias=True))
    prompt = [[1, 17, 250, 31]]
    assert model.generate(prompt, max_new_tokens=8, do_sample=False)[0].tolist() == \
        no_cache.generate(prompt, max_new_tokens=8, do_sample=False)[0].tolist()


def test_grouped_query_attention_kv_cache_greedy_matches_transformers(tmp_path):
    torch.manual_seed(1)
    hf_model = transformers.LlamaForCausalLM(transformers.LlamaConfig(**{**TINY_HF, "num_key_value_heads": 2}))
    model_dir = convert.convert_checkpoint(save_hf_checkpoint(hf_model.eval(), tmp_path / "hf"),
                                           tmp_path / "model").output
    model = KnowLMForCausalLM.from_pretrained(model_dir, use_past=True)
    for prompt in ([1, 17, 250, 31, 999, 5, 42], [1, 600, 7]):
        expected = hf_greedy(hf_model, prompt, 12)
        got = model.generate([prompt], max_new_tokens=12, do_sample=False)[0].tolist()
        assert got == expected[:len(got)] and (len(got) == len(expected) or got[-1] == 2)
