"""KnowLMForCausalLM against Hugging Face transformers (the reference), on CPU."""
import mindspore as ms
import numpy as np
import pytest
import torch
from mindformers.models.llama.llama_layer import LlamaRMSNorm
from mindspore import nn, ops

import knowlm.models.decoding
import knowlm.models.llama
from reference import hf_greedy, knowlm_logits
from knowlm import KnowLMError, KnowLMForCausalLM
from knowlm.models.decoding import greedy_config
from knowlm.models.layers import KnowLMRMSNorm, RMSNormFunction, Softmax

PROMPTS = [[1, 17, 250, 31, 999, 5, 42], [1, 600, 7, 7, 300]]


@pytest.fixture(scope="module")
def no_cache(model_dir):
    return KnowLMForCausalLM.from_pretrained(model_dir, use_past=False)


@pytest.fixture(scope="module")
def with_cache(model_dir):
    return KnowLMForCausalLM.from_pretrained(model_dir, use_past=True)


def test_logits_match_transformers_fp32(hf_model, no_cache):
    ids = PROMPTS[0]
    with torch.no_grad():
        expected = hf_model(torch.tensor([ids])).logits.numpy()
    got = knowlm_logits(no_cache, [ids])
    assert np.abs(got - expected).max() <= 1e-4


@pytest.mark.parametrize("prompt", PROMPTS)
def test_greedy_tokens_match_transformers(hf_model, no_cache, prompt):
    expected = hf_greedy(hf_model, prompt, 12)
    got = no_cache.generate([prompt], max_new_tokens=12, do_sample=False)[0].tolist()
    assert got == expected[:len(got)] and (len(got) == len(expected) or got[-1] == 2)


# The pad id (0, also <unk>) and the end-of-sequence id (2) inside prompts, as chat templates and unknown characters
# put them: they are tokens like any other, never masked out.
SPECIAL_INSIDE = [[1, 17, 0, 31, 2, 5, 42, 0, 9], [1, 2, 600, 0, 0, 300, 7]]


@pytest.mark.parametrize("prompt", SPECIAL_INSIDE)
def test_pad_and_eos_ids_inside_a_prompt_are_attended_as_in_transformers(hf_model, no_cache, with_cache, prompt):
    with torch.no_grad():
        expected = hf_model(torch.tensor([prompt])).logits.numpy()
    assert np.abs(knowlm_logits(no_cache, [prompt]) - expected).max() <= 1e-4
    reference = hf_greedy(hf_model, prompt, 8)
    for model in (no_cache, with_cache):
        got = model.generate([prompt], max_new_tokens=8, do_sample=False)[0].tolist()
        assert got == reference[:len(got)] and (len(got) == len(reference) or got[-1] == 2)


def test_a_prompt_ending_with_the_pad_id_keeps_its_last_token_given_another_padding_id(hf_model, with_cache):
    from knowlm.generate import generate
    prompts = [[1, 17, 250, 0], [1, 600, 7, 2, 300, 0, 0]]          # end with <unk> (the pad id), twice

    class Ids:          # a tokenizer whose texts are their ids, to put any id at the end of a prompt
        pad_token_id = 0

        def __call__(self, text):
            return {"input_ids": prompts[int(text)]}

        def decode(self, ids, skip_special_tokens=True):
            return " ".join(map(str, ids))
    texts = generate(with_cache, Ids(), ["0", "1"], max_new_tokens=6)
    for prompt, text in zip(prompts, texts):
        reference = hf_greedy(hf_model, prompt, 6)[len(prompt):]
        got = [int(t) for t in text.split()]
        assert got == reference[:len(got)] and (len(got) == len(reference) or got[-1] == 2)


@pytest.mark.parametrize("prompt", PROMPTS)
def test_kv_cache_greedy_equals_no_cache_greedy(no_cache, with_cache, prompt):
    expected = no_cache.generate([prompt], max_new_tokens=20, do_sample=False)[0].tolist()
    assert with_cache.generate([prompt], max_new_tokens=20, do_sample=False)[0].tolist() == expected


def test_sampling_with_top_k_1_equals_greedy(with_cache):
    greedy = with_cache.generate([PROMPTS[0]], max_new_tokens=12, do_sample=False)[0].tolist()
    sampled = with_cache.generate([PROMPTS[0]], max_new_tokens=12, do_sample=True, top_k=1, seed=3)[0].tolist()
    assert sampled == greedy


def test_same_seed_gives_same_sample_and_other_seed_differs(with_cache):
    def sample(seed):
        return with_cache.generate([PROMPTS[1]], max_new_tokens=16, do_sample=True, top_k=50, top_p=0.95,
                                   temperature=1.5, repetition_penalty=1.3, seed=seed)[0].tolist()
    assert sample(7) == sample(7)
    assert sample(7) != sample(8)


def test_batched_prompts_of_different_lengths_match_one_by_one(with_cache):
    width = max(len(p) for p in PROMPTS)
    batch = [p + [0] * (width - len(p)) for p in PROMPTS]
    together = [row.tolist() for row in with_cache.generate(batch, max_new_tokens=10, do_sample=False)]
    alone = [with_cache.generate([p], max_new_tokens=10, do_sample=False)[0].tolist() for p in PROMPTS]
    assert together == alone


class Recorder:
    """A streamer that keeps what ``generate`` gives it."""

    def __init__(self):
        self.calls = []

    def put(self, value):
        self.calls.append(np.asarray(value).tolist())

    def end(self):
        self.calls.append("end")


def _both_loops(model, monkeypatch, prompts, **kwargs):
    """(knowlm's greedy loop, MindFormers' loop) on the same model: tokens and streamer calls."""
    runs = []
    for loop in ("knowlm", "mindformers"):
        if loop == "mindformers":
            monkeypatch.setattr(knowlm.models.llama, "greedy_config", lambda *args: None)
        streamer = Recorder()
        tokens = model.generate(prompts, do_sample=False, streamer=streamer, **kwargs)
        runs.append(([row.tolist() for row in tokens], streamer.calls))
    return runs


def test_greedy_loop_gives_mindformers_tokens_on_a_padded_batch_stopping_at_eos(with_cache, monkeypatch):
    width = max(len(p) for p in PROMPTS)
    batch = [p + [0] * (width - len(p)) for p in PROMPTS]
    free = with_cache.generate(batch, max_new_tokens=10, do_sample=False, eos_token_id=[])
    eos = int(free[0][len(PROMPTS[0]) + 3])            # row 0 stops at its 4th new token, row 1 goes on
    assert eos not in free[1][len(PROMPTS[1]):].tolist()
    ours, reference = _both_loops(with_cache, monkeypatch, batch, max_new_tokens=10, eos_token_id=[eos])
    assert ours == reference
    assert len(ours[0][0]) == len(PROMPTS[0]) + 4 and len(ours[0][1]) == len(PROMPTS[1]) + 10


@pytest.mark.parametrize("max_length", [12, 1000])     # within seq_length (256), and capped at it
def test_greedy_loop_gives_mindformers_tokens_up_to_max_length(with_cache, monkeypatch, max_length):
    ours, reference = _both_loops(with_cache, monkeypatch, [PROMPTS[1]], max_length=max_length, eos_token_id=[])
    assert ours == reference and len(ours[0][0]) == min(max_length, 256)


@pytest.mark.parametrize("chunk_seconds, calls", [(0.0, 9), (1e9, 2)])   # a step per call; then all the rest
def test_decode_steps_kernel_gives_the_decode_step_graphs_tokens(with_cache, monkeypatch, chunk_seconds, calls):
    width = max(len(p) for p in PROMPTS)
    batch = [p + [0] * (width - len(p)) for p in PROMPTS]
    free = with_cache.generate(batch, max_new_tokens=10, do_sample=False, eos_token_id=[])
    eos = int(free[0][len(PROMPTS[0]) + 3])            # row 0 stops at its 4th new token, within a call
    steps, counts = with_cache.__dict__["decode_steps"], []

    def counting(tokens, valid, steps_per_row, *args):
        counts.append(steps_per_row.asnumpy().tolist())
        return steps(tokens, valid, steps_per_row, *args)

    counting.STEPS = steps.STEPS
    monkeypatch.setattr(knowlm.models.decoding, "CHUNK_SECONDS", chunk_seconds)
    monkeypatch.setitem(with_cache.__dict__, "decode_steps", counting)
    kernel = [row.tolist() for row in with_cache.generate(batch, max_new_tokens=10, do_sample=False,
                                                          eos_token_id=[eos])]
    monkeypatch.setitem(with_cache.__dict__, "decode_steps", None)
    graph = [row.tolist() for row in with_cache.generate(batch, max_new_tokens=10, do_sample=False,
                                                         eos_token_id=[eos])]
    assert kernel == graph and len(counts) == calls
    assert len(kernel[0]) == len(PROMPTS[0]) + 4 and len(kernel[1]) == len(PROMPTS[1]) + 10


def test_generation_interrupted_midway_leaves_the_model_generating_as_before(with_cache):
    class Interrupt(Recorder):
        def put(self, value):
            super().put(value)
            if len(self.calls) == 4:
                raise KeyboardInterrupt

    expected = with_cache.generate([PROMPTS[0]], max_new_tokens=8, do_sample=False)[0].tolist()
    with pytest.raises(KeyboardInterrupt):
        with_cache.generate([PROMPTS[0]], max_new_tokens=8, do_sample=False, streamer=Interrupt())
    assert not with_cache.block_mgr.block_mem_pool.used_blocks          # its cache blocks given back
    assert with_cache.generate([PROMPTS[0]], max_new_tokens=8, do_sample=False)[0].tolist() == expected


def test_max_length_shorter_than_the_prompt_is_refused(with_cache):
    with pytest.raises(KnowLMError, match="max_length 4 is shorter than the 7-token prompt"):
        with_cache.generate([PROMPTS[0]], max_length=4, do_sample=False)


@pytest.mark.parametrize("kwargs", [dict(do_sample=True), dict(repetition_penalty=1.2), dict(min_new_tokens=3),
                                    dict(return_dict_in_generate=True), dict(use_past=True)])
def test_calls_the_greedy_loop_does_not_compute_go_to_mindformers(with_cache, kwargs):
    assert greedy_config(with_cache, None, None, {"do_sample": False, **kwargs}) is None
    assert greedy_config(with_cache, None, None, dict(do_sample=False, max_new_tokens=3)).max_new_tokens == 3


def test_prompt_longer_than_seq_length_is_refused(with_cache):
    with pytest.raises(KnowLMError, match="prompt is 300 tokens; the model's seq_length is 256"):
        with_cache.generate([[1] + [5] * 299], max_new_tokens=4)


class _Weighted(nn.Cell):
    """sum(f(x) * r): its gradient is f's vector-Jacobian product with r."""

    def __init__(self, function):
        super().__init__()
        self.function = function

    def construct(self, x, r):
        return (self.function(x) * r).sum()


def _value_and_gradients(function, x, r):
    net = _Weighted(function)
    (dx, _), weights = ops.GradOperation(get_all=True, get_by_list=True)(net, net.trainable_params())(x, r)
    return [function(x).asnumpy(), dx.asnumpy()] + [w.asnumpy() for w in weights]


def test_norm_and_softmax_with_row_sum_gradients_equal_mindformers_autodiff():
    rng = np.random.default_rng(0)
    x, r = (ms.Tensor(rng.standard_normal((2, 5, 48), np.float32)) for _ in range(2))
    weight = ms.Tensor(rng.standard_normal(48).astype(np.float32))
    norms = [LlamaRMSNorm(48, eps=1e-5, fused_kernel=False) for _ in range(2)]
    for norm in norms:
        norm.weight.set_data(weight)
    norms[1].__class__ = KnowLMRMSNorm
    norms[1].function = RMSNormFunction(norms[1].eps)
    for stock, ours in [norms, (ops.Softmax(), Softmax())]:
        expected, got = _value_and_gradients(stock, x, r), _value_and_gradients(ours, x, r)
        assert len(got) == len(expected) and all(np.abs(a - b).max() <= 1e-5 for a, b in zip(got, expected))


def test_training_model_uses_row_sum_gradients(model_dir):
    model = KnowLMForCausalLM.from_pretrained(model_dir, use_past=False)
    norms = [cell for _, cell in model.cells_and_names() if isinstance(cell, LlamaRMSNorm)]
    assert norms and all(isinstance(norm, KnowLMRMSNorm) for norm in norms)
    assert all(isinstance(layer.attention.softmax, Softmax) for layer in model.model.layers)


def test_lora_training_loss_of_a_chat_sample_with_eos_and_unk_inside_equals_torch_peft(hf_model, model_dir, tmp_path):
    # A two-turn LLaMA-2 chat sample (OneKE's format): </s><s> between the turns and an <unk> (the pad id, 0) in
    # the text, both answers supervised. MindFormers dropped every position whose input is the pad id from the loss.
    import copy
    import peft
    from knowlm.checkpoints.lora import import_peft_adapter
    from knowlm.models.lora import load_lora_model
    from knowlm.tokenizer.spm import BUILTIN_TOKENIZER, KnowLMTokenizer
    tokenizer = KnowLMTokenizer(vocab_file=BUILTIN_TOKENIZER)
    turns = [("[INST] 抽取三元组：张三出生于北京。[/INST]", "(张三, 出生地, 北京)"),
             ("[INST] And: Irene was born in Wuhan.[/INST]", "(Irene, place of birth, Wuhan)")]
    ids, labels = [], []
    for question, answer in turns:
        prompt = [1] + tokenizer.encode(question, add_special_tokens=False)
        reply = tokenizer.encode(answer, add_special_tokens=False)
        reply = reply[:3] + [0] + reply[3:] + [2]                       # <unk> inside the answer, </s> after it
        ids += prompt + reply
        labels += [-100] * len(prompt) + reply
    seq_length = 128
    width = seq_length + 1
    assert ids.count(0) == 2 and ids.count(2) == 2 and len(ids) < width
    padded_ids = np.array(ids + [0] * (width - len(ids)), np.int32)[None]
    padded_labels = np.array(labels + [-100] * (width - len(labels)), np.int32)[None]

    torch.manual_seed(3)
    lora = peft.get_peft_model(copy.deepcopy(hf_model), peft.LoraConfig(
        r=4, lora_alpha=8, lora_dropout=0.0, init_lora_weights=False, target_modules=[
            "q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"])).eval()
    lora.save_pretrained(tmp_path / "peft")
    with torch.no_grad():
        logits = lora(torch.tensor(padded_ids[:, :-1]).long()).logits
        expected = torch.nn.functional.cross_entropy(logits.flatten(0, 1), torch.tensor(padded_labels[0, 1:]).long(),
                                                     ignore_index=-100).item()
    adapter = import_peft_adapter(tmp_path / "peft", tmp_path / "adapter").output
    model = load_lora_model(model_dir, adapter, use_past=False, seq_length=seq_length)
    model.set_train(True)
    got = model(ms.Tensor(padded_ids), labels=ms.Tensor(padded_labels)).asnumpy().item()
    assert abs(got - expected) <= 1e-5 * abs(expected), (got, expected)


def test_one_prompt_ending_with_the_pad_id_is_all_prompt(hf_model, with_cache):
    prompt = [1, 17, 250, 2, 31, 0]            # </s> inside, <unk> (the pad id) last
    reference = hf_greedy(hf_model, prompt, 6)
    for given in (prompt, [prompt]):
        got = with_cache.generate(given, max_new_tokens=6, do_sample=False)[0].tolist()
        assert got == reference[:len(got)] and (len(got) == len(reference) or got[-1] == 2)
