"""knowlm's whole-model CPU kernel (``KnowLMForward``: prompts by chunks into the KV cache, decode steps) and its
bfloat16 / Q8_0 weights, on the real model (SmolLM2-135M-Instruct) against transformers.

The weights of a bf16 or int8 model directory are compared with transformers running the very same values widened to
float32 (``knowlm export`` of that directory): the kernels read narrow weights exactly, so the logits agree as
closely as two float32 computations do.
"""
import numpy as np
import pytest
import torch
import transformers
from mindspore import Tensor

from knowlm import KnowLMForCausalLM
from knowlm.checkpoints.convert import export_checkpoint
from knowlm.checkpoints.gguf import convert_gguf
from knowlm.models.llama import weight_dtypes
from knowlm.models.packaged import packaged_gguf, packaged_model_dir
from reference import CHAT, needs_smollm2

pytestmark = needs_smollm2


def chat_ids(tokenizer, messages=CHAT):
    return tokenizer.apply_chat_template(messages, add_generation_prompt=True)


def transformers_logits(hf, ids):
    with torch.no_grad():
        return hf(torch.tensor([ids])).logits[0].numpy()


def generated_logits(model, ids, new_tokens):
    """The ids and per-step logits of MindFormers' own generate loop (dict output: not knowlm's greedy loop), which
    calls the model through ``KnowLMForCausalLM.forward``: the prompt by chunks, then one decode step per token."""
    out = model.generate(ids, max_new_tokens=new_tokens, do_sample=False, return_dict_in_generate=True,
                         output_logits=True)
    return list(out["sequences"][0]), [np.asarray(step).reshape(-1) for step in out["logits"]]


def test_prompt_in_chunks_then_decode_steps_give_transformers_logits(smollm2_reference):
    hf, tokenizer = smollm2_reference
    model = KnowLMForCausalLM.from_pretrained(packaged_model_dir("smollm2"), use_past=True, seq_length=256)
    forward = model.__dict__["forward_kernel"]
    assert forward is not None
    forward.CHUNK = 16          # the 60-token chat prompt in 4 chunks, the last one partial
    ids = chat_ids(tokenizer)
    assert len(ids) > 3 * forward.CHUNK and ids.count(hf.config.pad_token_id) >= 3
    sequence, logits = generated_logits(model, ids, 4)
    expected = transformers_logits(hf, sequence[:-1])
    for step, got in enumerate(logits):
        assert np.abs(got - expected[len(ids) - 1 + step]).max() <= 1e-3, step


def test_rows_of_different_lengths_in_one_batch_equal_each_row_alone(smollm2_reference):
    _, tokenizer = smollm2_reference
    model = KnowLMForCausalLM.from_pretrained(packaged_model_dir("smollm2"), use_past=True, seq_length=256)
    model.__dict__["forward_kernel"].CHUNK = 16
    prompts = [chat_ids(tokenizer), chat_ids(tokenizer, CHAT[1:2]), chat_ids(tokenizer, CHAT[:2])]
    together = model.generate(prompts, max_new_tokens=12, do_sample=False)
    alone = [model.generate(ids, max_new_tokens=12, do_sample=False)[0] for ids in prompts]
    assert [list(row) for row in together] == [list(row) for row in alone]


@pytest.fixture(scope="module", params=["bf16", "int8"])
def narrow(request, tmp_path_factory):
    """A bf16 or int8 model directory converted from the packaged GGUF file, and transformers on its export (the
    same weight values as float32 for int8, as bfloat16 widened to float32 for bf16)."""
    folder = tmp_path_factory.mktemp(request.param)
    convert_gguf(packaged_gguf("smollm2"), folder / "model", dtype=request.param, echo=lambda *_: None)
    export_checkpoint(folder / "model", folder / "hf", echo=lambda *_: None)
    hf = transformers.AutoModelForCausalLM.from_pretrained(folder / "hf", dtype=torch.float32).eval()
    return request.param, folder / "model", hf


def test_bf16_and_int8_weights_stay_narrow_and_give_the_logits_of_their_values(narrow, smollm2_reference):
    dtype, model_dir, hf = narrow
    _, tokenizer = smollm2_reference
    model = KnowLMForCausalLM.from_pretrained(model_dir, use_past=True, seq_length=256)
    assert weight_dtypes(model) == {"bf16": ("BFloat16", "Float32"), "int8": ("Float32", "UInt8")}[dtype]
    ids = chat_ids(tokenizer)
    sequence, logits = generated_logits(model, ids, 3)
    expected = transformers_logits(hf, sequence[:-1])
    for step, got in enumerate(logits):
        assert np.abs(got - expected[len(ids) - 1 + step]).max() <= 1e-3, step
    # knowlm's greedy loop (prompt, then the steps kernel) gives transformers' greedy tokens.
    with torch.no_grad():
        greedy = hf.generate(torch.tensor([ids]), attention_mask=torch.ones(1, len(ids), dtype=torch.long),
                             max_new_tokens=24, do_sample=False)[0].tolist()
    assert list(model.generate(ids, max_new_tokens=24, do_sample=False)[0]) == greedy


def test_narrow_weights_are_widened_to_float32_for_a_model_without_the_kv_cache(narrow):
    _, model_dir, _ = narrow
    model = KnowLMForCausalLM.from_pretrained(model_dir, use_past=False, seq_length=64)
    assert weight_dtypes(model) == ("Float32",)


def forward_logits(forward, rows, steps=3):
    """Each row's logits after its prompt (one ``Forward`` call for all rows) and after each of ``steps`` decode
    steps (one call each), the rows given the blocks of their own part of the cache."""
    blocks = -(-max(len(ids) + steps for ids in rows) // forward.block_size)
    tables = np.arange(len(rows) * blocks, dtype=np.int32).reshape(len(rows), blocks)
    ints = lambda values: Tensor(np.asarray(values, np.int32))     # noqa: E731
    tokens = np.zeros((len(rows), max(map(len, rows))), np.int32)
    for row, ids in enumerate(rows):
        tokens[row, :len(ids)] = ids
    lengths = np.array([len(ids) for ids in rows])
    out = [forward(ints(tokens), ints(np.zeros(len(rows))), ints(lengths), ints(tables)).asnumpy()]
    for _ in range(steps):
        last = out[-1].argmax(-1)
        out.append(forward(ints(last[:, None]), ints(lengths), ints(np.ones(len(rows))), ints(tables)).asnumpy())
        lengths = lengths + 1
    return np.stack(out, 1)        # (rows, steps + 1, vocab)


PROMPTS = ["Who wrote Hamlet?", "Name three rivers in China.", "2+2=", "翻译成英文：你好", "Hi",
           "List the planets of the solar system in order from the sun, with one fact about each.",
           "Why is the sky blue?", "Write a haiku.", "Paris is", "What is DNA?", "Count to ten.", "Bye"]


def assert_rows_alone_equal_rows_together(model_dir, tokenizer):
    model = KnowLMForCausalLM.from_pretrained(model_dir, use_past=True, seq_length=256)
    forward = model.__dict__["forward_kernel"]
    prompts = [chat_ids(tokenizer, [{"role": "user", "content": text}]) for text in PROMPTS]
    together = forward_logits(forward, prompts)
    for row in (5, 11):
        assert np.array_equal(forward_logits(forward, [prompts[row]])[0], together[row]), row


def test_a_rows_logits_are_bitwise_the_same_alone_and_among_eleven_other_rows(smollm2_reference):
    """Batch invariance: one row alone runs the few-row products, twelve rows the blocked ones (prompt tokens and
    decode steps); every product sums in one order, so the logits are equal to the bit (what lets ``knowlm serve``
    batch requests together and still give each the tokens ``knowlm generate`` gives it)."""
    assert_rows_alone_equal_rows_together(packaged_model_dir("smollm2"), smollm2_reference[1])


def test_bf16_and_int8_rows_are_bitwise_the_same_alone_and_among_eleven_other_rows(narrow, smollm2_reference):
    assert_rows_alone_equal_rows_together(narrow[1], smollm2_reference[1])
