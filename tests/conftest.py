"""Shared fixtures: a tiny random Hugging Face LLaMA (the reference) and the same weights as a knowlm model.

MindFormers writes logs under $LOCAL_DEFAULT_PATH (default ./output) from the moment it is imported, so that is
pointed at a temporary folder before anything imports it.
"""
import atexit
import os
import shutil
import tempfile

if "LOCAL_DEFAULT_PATH" not in os.environ:
    os.environ["LOCAL_DEFAULT_PATH"] = tempfile.mkdtemp(prefix="knowlm-test-output-")
    atexit.register(shutil.rmtree, os.environ["LOCAL_DEFAULT_PATH"], ignore_errors=True)
# Compiled graphs (knowlm.model.compile_cache) go with the logs, not to the user's ~/.cache.
os.environ.setdefault("KNOWLM_CACHE_DIR", os.path.join(os.environ["LOCAL_DEFAULT_PATH"], "cache"))
os.environ.setdefault("GLOG_v", "3")

import mindspore as ms  # noqa: E402
import numpy as np  # noqa: E402
import pytest  # noqa: E402
import torch  # noqa: E402
import transformers  # noqa: E402

from knowlm import convert  # noqa: E402
from knowlm.tokenizer import BUILTIN_TOKENIZER  # noqa: E402

# Same shape as the "tiny" preset, so the builtin 1000-piece tokenizer fits it.
TINY_HF = dict(vocab_size=1000, hidden_size=64, intermediate_size=176, num_hidden_layers=2, num_attention_heads=4,
               num_key_value_heads=4, max_position_embeddings=256, rms_norm_eps=1e-6, rope_theta=10000.0,
               bos_token_id=1, eos_token_id=2, pad_token_id=0, tie_word_embeddings=False,
               # Wide initialisation gives decisive logits, so greedy comparisons never hinge on near-ties.
               initializer_range=0.2)


def knowlm_config_from_hf(hf_config, **overrides):
    """The float32 ``KnowLMConfig`` of a ``transformers.LlamaConfig``."""
    return convert.knowlm_config_from_hf(hf_config.to_dict(), "float32", **overrides)


def save_hf_checkpoint(hf_model, path, **save_kwargs):
    """``hf_model`` as a Hugging Face directory (``save_pretrained(**save_kwargs)``) with the builtin tokenizer."""
    hf_model.save_pretrained(path, **save_kwargs)
    shutil.copyfile(BUILTIN_TOKENIZER, path / "tokenizer.model")
    return path


@pytest.fixture(scope="session")
def hf_model():
    torch.manual_seed(0)
    return transformers.LlamaForCausalLM(transformers.LlamaConfig(**TINY_HF)).eval()


@pytest.fixture(scope="session")
def model_dir(hf_model, tmp_path_factory):
    """The HF reference converted by ``knowlm convert`` to a knowlm model directory (config, checkpoint, tokenizer)."""
    root = tmp_path_factory.mktemp("tiny")
    return convert.convert_checkpoint(save_hf_checkpoint(hf_model, root / "hf"), root / "model").output


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
