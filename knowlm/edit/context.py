"""The texts an edit is computed from, as token rows: context templates sampled from the model, the prompt in each
of them, the subject's last token in each, and the target's tokens (EasyEdit's ``get_context_templates``,
``repr_tools.get_words_idxs_in_templates``, ``compute_v``'s prompts).

A context template is a short prefix the model wrote itself ("The first thing I noticed. "), so that the key and
value of an edit hold whatever precedes the prompt; the empty template is the bare prompt. Templates are sampled
with top-k 5 from five seed words at the start of a document, as EasyEdit does, from ``seed``: the same seed gives
the same templates.

Token positions: the subject's last token is ``len(tokens(prefix + subject)) - 1`` (EasyEdit's rule), checked to
be a token boundary of the whole text; the target's tokens are those that follow the prompt in ``prompt + " " +
target`` — the tokens ``knowlm edit-eval`` scores.
"""
import unicodedata
from dataclasses import dataclass

import mindspore as ms
import numpy as np

from knowlm.errors import KnowLMError

SEED_WORDS = ("The", "Therefore", "Because", "I", "You")
TOP_K = 5
ENDOFTEXT = "<|endoftext|>"
ROW_MULTIPLE, WIDTH_MULTIPLE = 8, 32         # fixed shapes: one compiled graph serves many requests


def sample_templates(cells, tokenizer, length_params, seed) -> list:
    """``[""]`` + one prefix per sample: for each ``(length, count)``, ``count // 5`` continuations of each seed word
    up to ``length`` tokens in all, decoded, braces dropped, ``". "`` appended."""
    rng = np.random.default_rng(seed)
    templates = [""]
    for length, count in length_params:
        start = document_start(tokenizer)
        rows = [start + ids(tokenizer, word) for word in SEED_WORDS for _ in range(count // len(SEED_WORDS))]
        for row in _grow(cells, rows, length, rng):
            text = unicodedata.normalize("NFKD", tokenizer.decode(row, skip_special_tokens=True))
            text = text.replace("\n\n", " ").replace("<|endoftext|>", "").replace("{", "").replace("}", "")
            templates.append(text + ". ")
    return templates


def document_start(tokenizer) -> list:
    """What a text starts with in the model's training: nothing when the tokenizer adds a BOS itself (LLaMA), else
    GPT-style ``<|endoftext|>`` where the vocabulary has it (SmolLM2: without it, "The" is followed by "-", ","
    and newlines rather than words)."""
    first = ids(tokenizer, "The")[:1]
    if first == [tokenizer.bos_token_id]:
        return []
    token = tokenizer.convert_tokens_to_ids(ENDOFTEXT)
    return [token] if isinstance(token, int) and tokenizer.convert_ids_to_tokens(token) == ENDOFTEXT else []


def round_up(count, multiple) -> int:
    return -(-count // multiple) * multiple


def _grow(cells, rows, length, rng):
    """Top-k sampling, every row to ``length`` tokens: all rows in one call per token."""
    width = round_up(length, WIDTH_MULTIPLE)
    next_logits = cells.next_logits(width)
    tokens = np.zeros((round_up(len(rows), ROW_MULTIPLE), width), np.int32)
    while any(len(row) < length for row in rows):
        for i, row in enumerate(rows):
            tokens[i, :len(row)] = row
        picks = np.array([i * width + len(row) - 1 for i, row in enumerate(rows)], np.int32)
        logits = next_logits(ms.Tensor(tokens), ms.Tensor(picks)).asnumpy().astype(np.float64)
        for i, row in enumerate(rows):
            if len(row) < length:
                top = np.argsort(-logits[i])[:TOP_K]
                probs = np.exp(logits[i, top] - logits[i, top].max())
                row.append(int(rng.choice(top, p=probs / probs.sum())))
    return rows


@dataclass
class Rows:
    """Token rows, right-padded to a fixed shape, with each real row's subject-last position."""
    tokens: np.ndarray          # [rows (a multiple of 8), width (a multiple of 32)]
    lookups: list               # one position per real row
    lengths: list               # tokens of each real row

    @classmethod
    def pack(cls, rows, lookups, max_width, pad_id=0, where="request"):
        width = round_up(max(map(len, rows)), WIDTH_MULTIPLE)
        if width > max_width:
            raise KnowLMError(f"{where}: {max(map(len, rows))} tokens with its longest context template; the "
                              f"model runs {max_width} positions (--seq-length)")
        tokens = np.full((round_up(len(rows), ROW_MULTIPLE), width), pad_id, np.int32)
        for i, row in enumerate(rows):
            tokens[i, :len(row)] = row
        return cls(tokens, list(lookups), [len(row) for row in rows])


def ids(tokenizer, text) -> list:
    return list(tokenizer(text)["input_ids"])


def subject_rows(tokenizer, request, templates, where) -> tuple:
    """``(rows, lookups)``: ``template + prompt`` for each template, and the subject's last token in each."""
    before = request.prompt[:request.prompt.index(request.subject)]
    rows, lookups = [], []
    for template in templates:
        row, head = ids(tokenizer, template + request.prompt), ids(tokenizer, template + before + request.subject)
        last = len(head) - 1
        if row[:len(head)] != head:
            raise KnowLMError(f"{where}: the subject {request.subject!r} does not end on a token boundary of "
                              f"{template + request.prompt!r}; put a space or punctuation after it")
        rows.append(row)
        lookups.append(last)
    return rows, lookups


def target_ids(tokenizer, prompt, target, where) -> list:
    """The tokens of ``target`` as they follow ``prompt`` in ``prompt + " " + target``."""
    head, whole = ids(tokenizer, prompt), ids(tokenizer, f"{prompt} {target}")
    if whole[:len(head)] != head or len(whole) == len(head):
        raise KnowLMError(f"{where}: {prompt!r} is not a token prefix of {prompt + ' ' + target!r}")
    return whole[len(head):]
