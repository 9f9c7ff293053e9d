"""The second moment of down-projection inputs over the shipped corpus (``knowlm.edit.stats``): equal to the one
transformers' forward hooks give on the same weights and paragraphs; cached, and recomputed when weights change."""
import random

import numpy as np
import pytest
import torch

from knowlm.edit import stats
from knowlm.edit.stats import corpus_paragraphs, second_moments
from knowlm.edit.trace import Cells

SAMPLES, WIDTH = 12, 64


def test_the_corpus_is_hundreds_of_english_paragraphs():
    paragraphs = corpus_paragraphs()
    assert len(paragraphs) > 500 and sum(map(len, paragraphs)) > 500_000
    assert sum(len(p) >= 150 for p in paragraphs) >= 500          # running prose, not lists


def test_second_moment_equals_transformers_hooks_and_is_cached_by_weights(tiny, hf_model, monkeypatch):
    model, tok = tiny
    moment = second_moments(Cells(model), tok, (0,), SAMPLES, WIDTH)[0]
    paragraphs = corpus_paragraphs()
    order = list(range(len(paragraphs)))
    random.Random(1).shuffle(order)
    total, count = torch.zeros(176, 176, dtype=torch.float64), 0
    seen = []
    hook = hf_model.model.layers[0].mlp.down_proj.register_forward_pre_hook(lambda m, i: seen.append(i[0][0]))
    try:
        for i in order[:SAMPLES]:
            with torch.no_grad():
                hf_model(torch.tensor([tok(paragraphs[i])["input_ids"][:WIDTH]]))
            keys = seen.pop().double()
            total += keys.T @ keys
            count += len(keys)
    finally:
        hook.remove()
    np.testing.assert_allclose(moment, (total / count).numpy(), rtol=1e-4, atol=1e-6)

    monkeypatch.setattr(stats, "_accumulate", lambda *args: pytest.fail("recomputed a cached second moment"))
    np.testing.assert_array_equal(second_moments(Cells(model), tok, (0,), SAMPLES, WIDTH)[0], moment)
    monkeypatch.undo()
    embedding = model.model.tok_embeddings.embedding_weight
    original = embedding.asnumpy().copy()
    try:
        embedding.set_data(type(embedding.data)(original * 2))
        changed = second_moments(Cells(model), tok, (0,), SAMPLES, WIDTH)[0]
    finally:
        embedding.set_data(type(embedding.data)(original))
    assert not np.allclose(changed, moment)          # other weights, another cache entry
