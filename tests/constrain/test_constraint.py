"""One answer's decoding state (``knowlm.constrain.constraint``): the token budget is kept (every answer cut off by
its budget still parses), end-of-sequence comes only where the answer may end, SentencePiece's leading blank."""
import random

import numpy as np
import pytest

from knowlm.constrain.automaton import advance_bytes
from knowlm.constrain.constraint import Constraint, Vocabulary
from knowlm.constrain.formats import answer_grammar
from knowlm.ie.parse import parse, run_on
from knowlm.tokenizer.spm import BUILTIN_TOKENIZER, KnowLMTokenizer

EOS = 0
TEXT = "Paris is the capital of France, and Paris hosts the Louvre."
ZH = "华为（深圳）的总部位于深圳，创始人是任正非。"


# Every single byte, and longer pieces answers are made of; id 0 is end-of-sequence.
PIECES = [None] + [bytes([b]) for b in range(256)] + [piece.encode() for piece in [
    "(", ")", ", ", ",(", "),(", "NAN", "Paris", "France", " is", " the", " capital", " of", " France", " Louvre", "capital of",
    "located in", '{"', '": [', '"}', '{"subject": "', '", "object": "', "]}", "深圳", "华为"]]


def hand_vocabulary():
    return Vocabulary(PIECES, [EOS])


def decode_randomly(constraint, budget, rng):
    """Random logits, masked, argmax: what a model that writes garbage does under the constraint."""
    tokens = []
    for step in range(budget):
        allowed = constraint.allowed(budget - step)
        token = int(allowed[np.argmax(rng.standard_normal(allowed.size))])
        if token == EOS:
            break
        constraint.advance(token)
        tokens.append(token)
    return tokens


GRAMMARS = [("re", "tuple", "en", ["capital of", "capital", "located in"], TEXT),
            ("ner", "tuple", "en", ["city", "country"], TEXT),
            ("re", "tuple", "zh", ["总部", "创始人"], ZH),
            ("re", "oneke", "en", ["capital of", "located in"], TEXT),
            ("ner", "oneke", "zh", ["组织", "地点"], ZH)]


@pytest.mark.parametrize("task, fmt, language, schema, text", GRAMMARS)
def test_every_answer_cut_off_by_its_budget_still_parses_in_full(task, fmt, language, schema, text):
    vocabulary = hand_vocabulary()
    rng = np.random.default_rng(0)
    shortest = answer_grammar(task, fmt, language, schema, text).distance(
        answer_grammar(task, fmt, language, schema, text).start())
    for budget in [int(shortest), int(shortest) + 1, int(shortest) + 7, 40, 120]:
        for _ in range(6):
            grammar = answer_grammar(task, fmt, language, schema, text)
            constraint = Constraint(grammar, vocabulary)
            tokens = decode_randomly(constraint, budget, rng)
            answer = b"".join(vocabulary.bytes[t] for t in tokens).decode("utf-8")
            assert len(tokens) <= budget and grammar.accepts(constraint.state), (budget, answer)
            parsed = parse(task, answer, fmt, schema)
            assert parsed.errors == 0 and not run_on(task, answer, fmt), answer
            for record in parsed.records:
                spans = [record[0], record[2]] if task == "re" else [record[0]]
                assert record[1] in schema and all(span in text for span in spans), answer


def test_the_distance_to_the_end_never_passes_the_horizon_and_shrinks_along_the_shortest_way():
    grammar = answer_grammar("re", "oneke", "en", ["capital of", "located in"], TEXT)
    horizon = grammar.horizon()
    rng = random.Random(1)
    for _ in range(20):
        state, answer = grammar.start(), b""
        for _ in range(60):
            assert grammar.distance(state) <= horizon
            options = [b for b in range(256) if grammar.advance(state, b)]
            if not options:
                break
            byte = rng.choice(options)
            answer += bytes([byte])
            state = grammar.advance(state, byte)
    # From the start, some byte always takes the answer one byte nearer its end.
    state = grammar.start()
    while grammar.distance(state) > 0:
        state = min((grammar.advance(state, b) for b in range(256) if grammar.advance(state, b)),
                    key=grammar.distance)
    assert grammar.accepts(state)


def test_end_of_sequence_comes_only_where_the_answer_may_end_and_alone_after_a_closed_object():
    vocabulary = hand_vocabulary()
    grammar = answer_grammar("re", "oneke", "en", ["capital of"], TEXT)
    constraint = Constraint(grammar, vocabulary)
    assert EOS not in constraint.allowed(100)
    for piece in ['{"', "capital of", '": [', "]"]:
        constraint.advance(vocabulary.bytes.index(piece.encode()))
    assert EOS not in constraint.allowed(100)
    constraint.advance(vocabulary.bytes.index(b"}"))
    assert constraint.allowed(100).tolist() == [EOS]          # no run-on text after the object closes
    tuples = Constraint(answer_grammar("re", "tuple", "en", ["capital of"], TEXT), vocabulary)
    for piece in ["(", "Paris", ", ", "capital of", ", ", "France", ")"]:
        tuples.advance(vocabulary.bytes.index(piece.encode()))
    allowed = tuples.allowed(100).tolist()
    assert EOS in allowed and vocabulary.bytes.index(b",(") in allowed          # end, or another tuple
    assert tuples.allowed(1).tolist() == [EOS]                 # one token left: no room for another tuple


def test_a_token_outside_the_grammar_is_refused():
    vocabulary = hand_vocabulary()
    constraint = Constraint(answer_grammar("re", "tuple", "en", ["capital of"], TEXT), vocabulary)
    with pytest.raises(ValueError, match="leaves the answer's grammar"):
        constraint.advance(vocabulary.bytes.index(b"Paris"))       # an answer starts with "(" or NAN


def test_sentencepiece_answers_may_start_with_the_blank_that_decoding_drops():
    tokenizer = KnowLMTokenizer(BUILTIN_TOKENIZER)
    vocabulary = Vocabulary.of_tokenizer(tokenizer, [tokenizer.eos_token_id])
    assert vocabulary.drops_leading_blank
    grammar = answer_grammar("re", "tuple", "en", ["capital of"], TEXT)
    constraint = Constraint(grammar, vocabulary)
    blank_bracket = tokenizer.convert_tokens_to_ids("▁(")
    assert blank_bracket in constraint.allowed(50).tolist() and tokenizer.decode([blank_bracket]) == "("
    constraint.advance(blank_bracket)
    assert constraint.state == advance_bytes(grammar, grammar.start(), b"(")
    assert tokenizer.convert_tokens_to_ids("▁(") not in constraint.allowed(50).tolist()    # only the first token
