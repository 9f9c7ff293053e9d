"""A request's text as it grows (``knowlm.serve.text``) and its next-token choice (``knowlm.serve.sampling``), on
the real model's byte-level tokenizer: Chinese characters split over tokens, stop strings split over tokens."""
import numpy as np
import pytest

from knowlm.checkpoints.model_dir import load_config
from knowlm.models.packaged import packaged_model_dir
from knowlm.serve.sampling import Sampler, SamplingParams
from knowlm.serve.text import TextStream
from knowlm.tokenizer.load import load_tokenizer
from reference import needs_smollm2

pytestmark = needs_smollm2

TEXT = "石桥是南溪国的首都。The capital, Stone Bridge, lies on the river 🌉. 你好！END of text"


@pytest.fixture(scope="module")
def tokenizer():
    folder = packaged_model_dir("smollm2")
    return load_tokenizer(folder, load_config(folder))


def released(tokenizer, ids, stop=()):
    stream, pieces, stopped = TextStream(tokenizer, stop), [], False
    for token in ids:
        piece, stopped = stream.add(token)
        pieces.append(piece)
        assert "\ufffd" not in piece
        if stopped:
            break
    if not stopped:
        pieces.append(stream.finish())
    return pieces, stopped


def test_text_released_token_by_token_is_the_whole_decode_and_never_half_a_character(tokenizer):
    ids = tokenizer.encode(TEXT, add_special_tokens=False)
    assert any("\ufffd" in tokenizer.decode([token]) for token in ids)     # characters split over tokens
    pieces, stopped = released(tokenizer, ids)
    assert "".join(pieces) == tokenizer.decode(ids, skip_special_tokens=True) == TEXT and not stopped


@pytest.mark.parametrize("stop", [["END"], ["Stone Bridge"], ["南溪"], ["no such text", "river 🌉"], ["!", "。"]])
def test_a_stop_string_ends_the_text_before_it_even_split_over_tokens(tokenizer, stop):
    ids = tokenizer.encode(TEXT, add_special_tokens=False)
    pieces, stopped = released(tokenizer, ids, stop)
    first = min(TEXT.find(s) for s in stop if s in TEXT)
    assert stopped and "".join(pieces) == TEXT[:first]


def test_a_stop_string_that_never_comes_holds_nothing_back_at_the_end(tokenizer):
    ids = tokenizer.encode(TEXT, add_special_tokens=False)
    pieces, stopped = released(tokenizer, ids, ["a very long stop string that is not there"])
    assert not stopped and "".join(pieces) == TEXT
    assert pieces[-1]       # held back until the end: could have begun a stop string


def test_greedy_is_the_argmax_and_seeded_sampling_repeats():
    logits = np.random.default_rng(0).normal(size=1000).astype(np.float32)
    assert Sampler(SamplingParams(max_tokens=1, temperature=0))(logits) == int(np.argmax(logits))
    params = SamplingParams(max_tokens=1, temperature=0.8, top_p=0.9, top_k=40, seed=7)
    sampler_a, sampler_b = Sampler(params), Sampler(params)
    assert [sampler_a(logits) for _ in range(20)] == [sampler_b(logits) for _ in range(20)]
    assert len({Sampler(SamplingParams(max_tokens=1, seed=s))(logits) for s in range(50)}) > 5


def test_top_k_one_and_a_tiny_top_p_leave_only_the_argmax():
    logits = np.random.default_rng(1).normal(size=500).astype(np.float32)
    for params in (SamplingParams(max_tokens=1, top_k=1, seed=3), SamplingParams(max_tokens=1, top_p=1e-9, seed=3)):
        sampler = Sampler(params)
        assert {sampler(logits) for _ in range(20)} == {int(np.argmax(logits))}


def test_top_k_draws_only_among_the_k_most_likely():
    logits = np.random.default_rng(2).normal(size=500).astype(np.float32)
    sampler = Sampler(SamplingParams(max_tokens=1, temperature=2.0, top_k=5, seed=0))
    assert {sampler(logits) for _ in range(300)} <= set(np.argsort(-logits)[:5].tolist())


def test_penalties_lower_the_tokens_already_chosen():
    logits = np.zeros(10, np.float32)
    logits[3] = 1.0
    sampler = Sampler(SamplingParams(max_tokens=1, temperature=0, presence_penalty=2.0))
    assert [sampler(logits) for _ in range(2)] == [3, 0]
