"""How a request picks each next token: OpenAI's sampling options, and a ``Sampler`` per request.

Sampling runs on the host over one row of logits. A seeded request draws from its own generator, and the kernels
give a row the same logits whatever else is in the batch, so the same seed gives the same text under any load.
"""
from dataclasses import dataclass

import numpy as np


@dataclass(frozen=True)
class SamplingParams:
    """What a request asked for; checked by the API (``knowlm.serve.api``) before it gets here."""
    max_tokens: int
    temperature: float = 1.0        # 0: greedy (the argmax, as ``knowlm generate`` without --do-sample)
    top_p: float = 1.0
    top_k: int = 0                  # 0: no top-k filter
    seed: int | None = None
    stop: tuple = ()
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0

    @property
    def greedy(self) -> bool:
        return self.temperature == 0


class Sampler:
    """The next-token choice of one request; it counts the tokens it chose for OpenAI's penalties."""

    def __init__(self, params: SamplingParams):
        self.params = params
        self.rng = np.random.default_rng(params.seed)     # None: fresh entropy
        self.counts = {}

    def __call__(self, logits) -> int:
        p = self.params
        if self.counts and (p.presence_penalty or p.frequency_penalty):
            logits = np.array(logits, np.float32)
            ids = np.fromiter(self.counts, np.int64)
            logits[ids] -= p.presence_penalty + p.frequency_penalty * np.fromiter(self.counts.values(), np.float32)
        token = int(np.argmax(logits)) if p.greedy else self._draw(logits)
        self.counts[token] = self.counts.get(token, 0) + 1
        return token

    def _draw(self, logits) -> int:
        p = self.params
        scaled = np.asarray(logits, np.float64) / p.temperature
        if 0 < p.top_k < scaled.size:
            candidates = np.argpartition(-scaled, p.top_k - 1)[:p.top_k]
        else:
            candidates = np.arange(scaled.size)
        # Most likely first; ties by id, so that the order (and the draw) does not depend on the partition.
        candidates = candidates[np.lexsort((candidates, -scaled[candidates]))]
        probs = np.exp(scaled[candidates] - scaled[candidates[0]])
        cumulative = np.cumsum(probs)
        if p.top_p < 1.0:       # the smallest head whose mass reaches top_p
            keep = int(np.searchsorted(cumulative, p.top_p * cumulative[-1])) + 1
            candidates, cumulative = candidates[:keep], cumulative[:keep]
        index = int(np.searchsorted(cumulative, self.rng.random() * cumulative[-1], side="right"))
        return int(candidates[min(index, len(candidates) - 1)])
