"""A real pretrained LLaMA (SmolLM2-135M-Instruct) through knowlm against transformers on the same GGUF file: chat
prompts with end-of-turn tokens (SmolLM2's pad id) in the middle, which random weights and random ids never exercise.

knowlm's side is the real path: ``load_model("smollm2")`` converts the packaged GGUF file (``knowlm convert``) into
the cache and loads it with its own ``tokenizer.json`` and chat template.
"""
import mindspore as ms
import numpy as np
import pytest
import torch

from knowlm import KnowLMConfig, KnowLMForCausalLM
from knowlm.generate import generate
from knowlm.models.load import load_model
from knowlm.models.packaged import packaged_model_dir
from knowlm.tokenizer.chat import apply_chat_template
from reference import CHAT, needs_smollm2

pytestmark = needs_smollm2
SEQ_LENGTH = 128


@pytest.fixture(scope="module")
def reference(smollm2_reference):
    """transformers' model and tokenizer read from the same GGUF file (fp32)."""
    return smollm2_reference


@pytest.fixture(scope="module")
def smollm2():
    """knowlm's ``smollm2`` by name, with the KV cache (and knowlm's decode kernels), at seq_length 128."""
    return load_model("smollm2", use_past=True, seq_length=SEQ_LENGTH)


@pytest.fixture(scope="module")
def no_cache():
    return KnowLMForCausalLM.from_pretrained(packaged_model_dir("smollm2"), use_past=False, seq_length=SEQ_LENGTH)


def chat_ids(tokenizer):
    # transformers tokenizes a rendered chat without adding special tokens (apply_chat_template(tokenize=True)).
    return tokenizer.encode(apply_chat_template(tokenizer, CHAT), add_special_tokens=False)


def test_the_chat_template_and_ids_are_transformers_and_hold_end_of_turn_tokens(reference, smollm2):
    hf, hf_tokenizer = reference
    _, tokenizer = smollm2
    assert apply_chat_template(tokenizer, CHAT) == hf_tokenizer.apply_chat_template(CHAT, tokenize=False,
                                                                                   add_generation_prompt=True)
    ids = chat_ids(tokenizer)
    assert ids == hf_tokenizer.apply_chat_template(CHAT, add_generation_prompt=True)
    assert ids.count(hf.config.pad_token_id) >= 3 and ids[-1] != hf.config.pad_token_id   # <|im_end|> inside


def test_logits_at_every_position_of_a_chat_prompt_equal_transformers(reference, smollm2, no_cache):
    hf, _ = reference
    ids = chat_ids(smollm2[1])
    with torch.no_grad():
        expected = hf(torch.tensor([ids])).logits[0].numpy()
    padded = np.zeros((1, SEQ_LENGTH), np.int32)
    padded[0, :len(ids)] = ids
    got = no_cache(ms.Tensor(padded))[0].asnumpy().reshape(SEQ_LENGTH, -1)[:len(ids)]
    assert np.abs(got - expected).max() <= 1e-3


def test_greedy_64_tokens_equal_transformers_with_the_kernels_and_without_a_cache(reference, smollm2, no_cache):
    # knowlm's decode kernels against MindSpore's ops on the same model: tests/models/test_kernels.py.
    hf, _ = reference
    model, tokenizer = smollm2
    ids = chat_ids(tokenizer)
    with torch.no_grad():
        expected = hf.generate(torch.tensor([ids]), attention_mask=torch.ones(1, len(ids), dtype=torch.long),
                               max_new_tokens=64, do_sample=False)[0].tolist()
    assert len(expected) - len(ids) > 32        # a long answer (it ends with <|im_end|> before 64 tokens)
    assert model.kernel_library is not None
    for candidate in (model, no_cache):
        got = candidate.generate(ids, max_new_tokens=64, do_sample=False)[0].tolist()
        assert got == expected[:len(got)] and (len(got) == len(expected) or got[-1] == hf.config.eos_token_id)


def test_a_batch_of_prompts_of_different_lengths_equals_one_at_a_time(smollm2):
    model, tokenizer = smollm2
    prompts = [apply_chat_template(tokenizer, CHAT),
               apply_chat_template(tokenizer, [{"role": "user", "content": "The Eiffel Tower is in which city?"}]),
               "The capital of Italy is"]
    alone = [generate(model, tokenizer, [prompt], max_new_tokens=16)[0] for prompt in prompts]
    batched = load_model("smollm2", use_past=True, seq_length=SEQ_LENGTH, batch_size=len(prompts))
    assert generate(*batched, prompts, max_new_tokens=16) == alone
    assert "Paris" in alone[1] and "Rome" in alone[2]


def test_sampling_with_a_seed_is_reproducible(smollm2):
    model, tokenizer = smollm2

    def sample(seed):
        return generate(model, tokenizer, [apply_chat_template(tokenizer, CHAT)], max_new_tokens=24, do_sample=True,
                        top_k=50, top_p=0.95, temperature=1.2, seed=seed)[0]
    first = sample(7)
    assert sample(7) == first and first != sample(8)


def test_generate_chat_renders_the_models_template_and_answers_as_transformers(reference, smollm2):
    hf, hf_tokenizer = reference
    model, tokenizer = smollm2
    question = "What is the capital of France?"
    ids = hf_tokenizer.apply_chat_template([{"role": "user", "content": question}], add_generation_prompt=True)
    with torch.no_grad():
        expected = hf.generate(torch.tensor([ids]), attention_mask=torch.ones(1, len(ids), dtype=torch.long),
                               max_new_tokens=12, do_sample=False)[0].tolist()[len(ids):]
    answer = generate(model, tokenizer, [question], max_new_tokens=12, chat="model")[0]
    assert answer == hf_tokenizer.decode(expected, skip_special_tokens=True) and "Paris" in answer


def test_the_converted_config_is_the_smollm2_preset():
    from knowlm.checkpoints.model_dir import load_config
    config = load_config(packaged_model_dir("smollm2")).to_dict()
    preset = KnowLMConfig.from_name("smollm2").to_dict()
    for key in ("hidden_size", "num_layers", "num_heads", "n_kv_heads", "intermediate_size", "vocab_size",
                "rms_norm_eps", "theta", "max_position_embedding", "tie_word_embeddings", "bos_token_id",
                "eos_token_id", "pad_token_id", "seq_length"):
        assert config[key] == pytest.approx(preset[key], rel=1e-6), key      # GGUF stores eps as float32


def test_pipeline_name_smollm2_finds_the_packaged_weights_and_its_tokenizer():
    from pathlib import Path
    from mindformers.models.build_tokenizer import build_tokenizer
    from knowlm.models.pipelines import checkpoint_for
    assert Path(checkpoint_for("smollm2")) == packaged_model_dir("smollm2")
    tokenizer = build_tokenizer({"type": "KnowLMFastTokenizer", "vocab_file": None, "pipeline_name": "smollm2"})
    assert (tokenizer.bos_token, tokenizer.eos_token, tokenizer.pad_token_id) == ("<|im_start|>", "<|im_end|>", 2)
