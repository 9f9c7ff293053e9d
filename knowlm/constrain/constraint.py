"""One answer being decoded: which tokens may come next, so that it stays valid and ends within its token budget.

A token may come next when every one of its bytes keeps the answer on a path of its grammar (``automaton``), and,
near the end of the budget, when the answer can still reach its end in the tokens left after it: every byte is a
token of its own in byte-level BPE and in SentencePiece with byte fallback, so ``Grammar.distance`` (bytes) bounds the
tokens an ending needs. End-of-sequence may come only where the answer may end; where nothing else may follow (a
closed OneKE object, ``NAN``), it is the only choice. A row cut off by its budget therefore still holds an answer.
"""
import weakref

import numpy as np

from knowlm.constrain.automaton import State, VocabularyTrie, advance_bytes, allowed_tokens, walk
from knowlm.constrain.vocab import token_bytes

BLANK = 0x20


class Vocabulary:
    """Each token's bytes (``None``: never in an answer) and their trie, the model's end-of-sequence ids, and whether
    decoding drops a leading blank of an answer's first token (SentencePiece's ``▁``)."""

    def __init__(self, pieces, eos_ids, drops_leading_blank=False):
        self.bytes = pieces
        self.trie = VocabularyTrie(pieces)
        self.eos = np.array(sorted({int(token) for token in eos_ids if token is not None}), np.int64)
        self.drops_leading_blank = drops_leading_blank

    @classmethod
    def of_tokenizer(cls, tokenizer, eos_ids):
        pieces = token_bytes(tokenizer)
        return cls(pieces, eos_ids, _drops_leading_blank(tokenizer, pieces))


def _drops_leading_blank(tokenizer, pieces):
    for token, data in enumerate(pieces):
        if data and len(data) > 1 and data[0] == BLANK and data[1:].isalpha() and data.isascii():
            return tokenizer.decode([token]) == data[1:].decode()
    return False


_VOCABULARIES = weakref.WeakKeyDictionary()


def vocabulary_of(tokenizer, eos_ids) -> Vocabulary:
    """``Vocabulary.of_tokenizer(tokenizer, eos_ids)``, built once per tokenizer (a trie of the whole vocabulary
    takes ~0.3 s)."""
    key = tuple(sorted({int(token) for token in eos_ids if token is not None}))
    built = _VOCABULARIES.setdefault(tokenizer, {})
    if key not in built:
        built[key] = Vocabulary.of_tokenizer(tokenizer, key)
    return built[key]


class Constraint:
    """The decoding state of one answer to ``grammar`` (``formats.answer_grammar``) in ``vocabulary``'s tokens."""

    def __init__(self, grammar, vocabulary):
        self.grammar, self.vocabulary = grammar, vocabulary
        self.state, self.first = grammar.start(), True
        self.horizon = grammar.horizon()

    def allowed(self, remaining) -> np.ndarray:
        """The token ids that may come next when this token and ``remaining - 1`` more are left."""
        tokens = self._tokens()
        ending = self.grammar.accepts(self.state)
        if remaining - 1 < self.horizon:    # near the end: only tokens after which the answer can still end
            ordered, distances = self._distances()
            within = ordered[distances <= remaining - 1]
            if within.size or ending:       # else no ending fits (a vocabulary without single bytes): best effort
                tokens = within
        if ending or not tokens.size:       # nothing fits at all: stop rather than write what cannot be read
            tokens = np.concatenate([tokens, self.vocabulary.eos])
        return tokens

    def mask(self, logits, remaining) -> np.ndarray:
        """``logits`` (vocab,) with every token that may not come next at -inf."""
        allowed = self.allowed(remaining)
        masked = np.full(np.shape(logits), -np.inf, np.float32)
        masked[allowed] = np.asarray(logits)[allowed]
        return masked

    def advance(self, token):
        """Take ``token`` (one ``allowed`` returned); end-of-sequence leaves the state as it is."""
        data = self.vocabulary.bytes[token] if token < len(self.vocabulary.bytes) else None
        if data is None:
            return
        following = advance_bytes(self.grammar, self.state, data)
        if self._blank_may_lead() and data[0] == BLANK:
            following = State(following.configs | advance_bytes(self.grammar, self.state, data[1:]).configs)
        if not following:
            raise ValueError(f"token {token} ({data!r}) leaves the answer's grammar")
        self.state, self.first = following, False

    def _blank_may_lead(self):
        # The answer's first token, in a vocabulary whose decoding drops its leading blank.
        return self.first and self.vocabulary.drops_leading_blank

    def _blank_led(self):
        # (token, state) of the tokens that are a blank and then bytes that keep the answer on its grammar.
        blank = self.vocabulary.trie.children[0].get(BLANK)
        return walk(self.grammar, self.vocabulary.trie, self.state, blank) if blank is not None else []

    def _walk(self):
        pairs = walk(self.grammar, self.vocabulary.trie, self.state)
        return pairs + self._blank_led() if self._blank_may_lead() else pairs

    def _tokens(self):
        # Remembered per state in the grammar: the same states recur (each tuple's start, each span's start).
        key = ("tokens", id(self.vocabulary), self.state, self.first)
        if key not in self.grammar.masks:
            tokens = set(allowed_tokens(self.grammar, self.vocabulary.trie, self.state))
            if self._blank_may_lead():
                tokens.update(token for token, _ in self._blank_led())
            self.grammar.masks[key] = np.array(sorted(tokens), np.int64)
        return self.grammar.masks[key]

    def _distances(self):
        # The tokens by how far the answer is from its end after each (bytes), nearest first.
        key = ("distances", id(self.vocabulary), self.state, self.first)
        if key not in self.grammar.masks:
            nearest = {}
            for token, state in self._walk():
                nearest[token] = min(nearest.get(token, np.inf), self.grammar.distance(state))
            tokens = np.array(sorted(nearest), np.int64)
            self.grammar.masks[key] = (tokens, np.array([nearest[token] for token in tokens.tolist()], np.float64))
        return self.grammar.masks[key]
