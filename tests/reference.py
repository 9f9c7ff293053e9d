"""What the tests compare knowlm against: Hugging Face ``transformers`` models and helpers around them.

Imported by test modules (``pythonpath = tests`` in pyproject.toml); the fixtures built from it are in conftest.py.
"""
import shutil

import mindspore as ms
import numpy as np
import pytest
import torch
import transformers

from knowlm.checkpoints import hf
from knowlm.errors import KnowLMError
from knowlm.models.packaged import PACKAGED_MODELS
from knowlm.tokenizer.spm import BUILTIN_TOKENIZER

# The real model's tests (SmolLM2-135M-Instruct): skipped where its package is not installed; a chat with end-of-turn
# tokens (<|im_end|>, SmolLM2's pad id) in the middle.
SMOLLM2 = PACKAGED_MODELS["smollm2"]
needs_smollm2 = pytest.mark.skipif(__import__("importlib").util.find_spec(SMOLLM2.package) is None,
                                   reason=f"the real model: {SMOLLM2.pip}")
CHAT = [{"role": "system", "content": "You are a geography teacher."},
        {"role": "user", "content": "What is the capital of France?"}, {"role": "assistant", "content": "Paris."},
        {"role": "user", "content": "And of Japan? Tell me about that city."}]

# Same shape as the "tiny" preset, so the builtin 1000-piece tokenizer fits it.
TINY_HF = dict(vocab_size=1000, hidden_size=64, intermediate_size=176, num_hidden_layers=2, num_attention_heads=4,
               num_key_value_heads=4, max_position_embeddings=256, rms_norm_eps=1e-6, rope_theta=10000.0,
               bos_token_id=1, eos_token_id=2, pad_token_id=0, tie_word_embeddings=False,
               # Wide initialisation gives decisive logits, so greedy comparisons never hinge on near-ties.
               initializer_range=0.2)


def knowlm_config_from_hf(hf_config, **overrides):
    """The float32 ``KnowLMConfig`` of a ``transformers.LlamaConfig``."""
    return hf.knowlm_config_from_hf(hf_config.to_dict(), "float32", **overrides)


def save_hf_checkpoint(hf_model, path, **save_kwargs):
    """``hf_model`` as a Hugging Face directory (``save_pretrained(**save_kwargs)``) with the builtin tokenizer."""
    hf_model.save_pretrained(path, **save_kwargs)
    shutil.copyfile(BUILTIN_TOKENIZER, path / "tokenizer.model")
    return path


def hf_greedy(hf_model, ids, new_tokens):
    """Hugging Face greedy generation of ``new_tokens`` after ``ids``: the prompt and the new tokens, a list."""
    with torch.no_grad():
        out = hf_model.generate(torch.tensor([ids]), attention_mask=torch.ones(1, len(ids), dtype=torch.long),
                                max_new_tokens=new_tokens, do_sample=False, pad_token_id=0)
    return out[0].tolist()


def knowlm_logits(model, ids):
    """Logits of ``ids`` (list of equal-length rows) from a no-cache model: (B, len, vocab) numpy."""
    ids = np.asarray(ids, np.int32)
    padded = np.zeros((ids.shape[0], model.config.seq_length), np.int32)
    padded[:, :ids.shape[1]] = ids
    logits = model(ms.Tensor(padded))[0].asnumpy()
    return logits.reshape(ids.shape[0], model.config.seq_length, -1)[:, :ids.shape[1]]


IDS = [[1, 5, 9, 200, 3, 17, 999, 42, 7, 64, 128, 300, 2, 11, 500, 77]]
SHARDED = dict(max_shard_size="300KB")      # the tiny model (~0.9 MB in fp32) in 3-4 files


def hf_llama(seed=0, **overrides):
    torch.manual_seed(seed)
    return transformers.LlamaForCausalLM(transformers.LlamaConfig(**{**TINY_HF, **overrides})).eval()


def hf_dir(tmp_path, model=None, fmt="safetensors", sharded=False):
    kwargs = dict(safe_serialization=fmt == "safetensors", **(SHARDED if sharded else {}))
    return save_hf_checkpoint(model or hf_llama(), tmp_path / f"hf-{fmt}", **kwargs)


def hf_logits(model, ids=IDS):
    with torch.no_grad():
        return model(torch.tensor(ids)).logits.numpy()


def one_line_error(call, match):
    with pytest.raises(KnowLMError, match=match) as err:
        call()
    assert "\n" not in str(err.value)
    return str(err.value)


def fails_with_one_line(argv, capsys, *fragments):
    """``knowlm ARGV`` exits 2 with exactly one line on stderr, ``knowlm: error: ...`` holding each fragment."""
    from knowlm.cli import main
    assert main([str(arg) for arg in argv]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("knowlm: error: "), err
    for fragment in fragments:
        assert fragment in err, err
    return err
