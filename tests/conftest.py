"""Shared fixtures: a tiny random Hugging Face LLaMA (the reference) and the same weights as a knowlm model.

MindFormers writes logs under $LOCAL_DEFAULT_PATH (default ./output) from the moment it is imported, so that is
pointed at a temporary folder before anything imports it.
"""
import os
import tempfile

os.environ.setdefault("LOCAL_DEFAULT_PATH", tempfile.mkdtemp(prefix="knowlm-test-output-"))
os.environ.setdefault("GLOG_v", "3")

import mindspore as ms  # noqa: E402
import numpy as np  # noqa: E402
import pytest  # noqa: E402
import torch  # noqa: E402
import transformers  # noqa: E402

import knowlm  # noqa: E402
from knowlm.convert import hf_to_mindspore_name  # noqa: E402
from knowlm.pretrained import save_pretrained  # noqa: E402
from knowlm.tokenizer import BUILTIN_TOKENIZER  # noqa: E402

# Same shape as the "tiny" preset, so the builtin 1000-piece tokenizer fits it.
TINY_HF = dict(vocab_size=1000, hidden_size=64, intermediate_size=176, num_hidden_layers=2, num_attention_heads=4,
               num_key_value_heads=4, max_position_embeddings=256, rms_norm_eps=1e-6, rope_theta=10000.0,
               bos_token_id=1, eos_token_id=2, pad_token_id=0, tie_word_embeddings=False,
               # Wide initialisation gives decisive logits, so greedy comparisons never hinge on near-ties.
               initializer_range=0.2)


def knowlm_config_from_hf(hf_config, **overrides):
    return knowlm.KnowLMConfig(
        hidden_size=hf_config.hidden_size, num_layers=hf_config.num_hidden_layers,
        num_heads=hf_config.num_attention_heads, n_kv_heads=hf_config.num_key_value_heads,
        intermediate_size=hf_config.intermediate_size, vocab_size=hf_config.vocab_size,
        rms_norm_eps=hf_config.rms_norm_eps, theta=hf_config.rope_theta,
        seq_length=hf_config.max_position_embeddings, max_position_embedding=hf_config.max_position_embeddings,
        tie_word_embeddings=hf_config.tie_word_embeddings, compute_dtype="float32", param_init_type="float32",
        **overrides)


def load_hf_weights(model, hf_model):
    params = {}
    for name, tensor in hf_model.state_dict().items():
        target = hf_to_mindspore_name(name)
        if target is not None and target not in params:
            params[target] = ms.Parameter(ms.Tensor(tensor.detach().numpy()), name=target)
    not_loaded, _ = ms.load_param_into_net(model, params, strict_load=True)
    assert not [n for n in not_loaded if not n.endswith(("key_cache", "value_cache"))]
    return model


@pytest.fixture(scope="session")
def hf_model():
    torch.manual_seed(0)
    return transformers.LlamaForCausalLM(transformers.LlamaConfig(**TINY_HF)).eval()


@pytest.fixture(scope="session")
def model_dir(hf_model, tmp_path_factory):
    """The HF reference's weights saved as a knowlm model directory (config, checkpoint, tokenizer)."""
    model = load_hf_weights(knowlm.KnowLMForCausalLM(knowlm_config_from_hf(hf_model.config)), hf_model)
    return save_pretrained(model, tmp_path_factory.mktemp("tiny") / "model", BUILTIN_TOKENIZER)


def knowlm_logits(model, ids):
    """Logits of ``ids`` (list of equal-length rows) from a no-cache model: (B, len, vocab) numpy."""
    ids = np.asarray(ids, np.int32)
    padded = np.zeros((ids.shape[0], model.config.seq_length), np.int32)
    padded[:, :ids.shape[1]] = ids
    logits = model(ms.Tensor(padded))[0].asnumpy()
    return logits.reshape(ids.shape[0], model.config.seq_length, -1)[:, :ids.shape[1]]
