"""The ``pick`` function of constrained decoding: every row's next token, chosen among the tokens its ``Constraint``
allows, greedily or by seeded sampling (``KnowLMForCausalLM.generate(..., pick=)`` runs it at each decode step).

Greedy is the argmax over the allowed tokens; sampling is ``knowlm.serve.sampling``'s (temperature, top-k, top-p)
over the masked logits, so a token outside the answer's grammar has no probability at all. A seeded row draws from
a generator of its own, seeded by the seed and the row's prompt: the same prompt gets the same answer in any batch.
``repetition_penalty`` is MindFormers' (and transformers'): the prompt's and answer's tokens divided by it where
positive, multiplied where negative.

Greedy without a penalty, the allowed token chosen is the argmax itself wherever the argmax is allowed, so the decoding
loop may let knowlm's steps kernel run ahead and ask ``accepts`` about its tokens (``speculative``;
``knowlm.models.decoding._picked``): the same tokens, fewer model calls while the model keeps to the format.
"""
import zlib

import numpy as np

from knowlm.constrain.constraint import Constraint
from knowlm.serve.sampling import Sampler, SamplingParams


class Picker:
    """``pick(logits, remaining, finished)`` over ``grammars`` (one per row), for prompts ``prompts`` (token ids)."""

    def __init__(self, grammars, vocabulary, prompts, do_sample=False, top_k=50, top_p=1.0, temperature=1.0,
                 repetition_penalty=1.0, seed=None):
        self.constraints = [Constraint(grammar, vocabulary) for grammar in grammars]
        self.penalty = repetition_penalty
        self.seen = [set(prompt) for prompt in prompts]
        self.samplers = None
        self.speculative = not do_sample and repetition_penalty == 1.0
        if do_sample:
            params = SamplingParams(max_tokens=1, temperature=temperature, top_p=top_p, top_k=top_k)
            self.samplers = [Sampler(params) for _ in prompts]
            for sampler, prompt in zip(self.samplers, prompts):
                if seed is not None:
                    key = zlib.crc32(np.asarray(prompt, np.int64).tobytes())
                    sampler.rng = np.random.default_rng([seed, key])

    def __call__(self, logits, remaining, finished):
        tokens = []
        for row, constraint in enumerate(self.constraints):
            if finished[row]:
                tokens.append(0)
                continue
            scores = logits[row]
            if self.penalty != 1.0:
                scores = _penalised(scores, self.seen[row], self.penalty)
            if self.samplers is None:
                allowed = constraint.allowed(remaining[row])
                token = int(allowed[np.argmax(scores[allowed])])
            else:
                token = self.samplers[row](constraint.mask(scores, remaining[row]))
            constraint.advance(token)
            self.seen[row].add(token)
            tokens.append(token)
        return tokens

    def accepts(self, row, token, remaining) -> bool:
        """Whether ``token`` is what greedy choice would take for ``row`` if the model's argmax is ``token``: it is
        allowed there (it is then taken, as from ``__call__``)."""
        if not np.any(self.constraints[row].allowed(remaining) == token):
            return False
        self.constraints[row].advance(token)
        self.seen[row].add(token)
        return True


def _penalised(scores, seen, penalty):
    scores = np.array(scores, np.float32)
    ids = np.fromiter(seen, np.int64)
    ids = ids[ids < scores.size]
    picked = scores[ids]
    scores[ids] = np.where(picked < 0, picked * penalty, picked / penalty)
    return scores
