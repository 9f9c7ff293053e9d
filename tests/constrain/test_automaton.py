"""The answer automaton (``knowlm.constrain``) on hand-made cases, and random walks through it: every path it allows
ends in an answer ``knowlm.ie.parse`` reads in full, names from the schema, entities from the input."""
import random

import pytest

from knowlm.constrain.automaton import SuffixAutomaton, VocabularyTrie, advance_bytes, allowed_tokens
from knowlm.constrain.formats import answer_grammar
from knowlm.errors import KnowLMError
from knowlm.ie.parse import parse

TEXT = "Paris is the capital of France, and Paris hosts the Louvre."
RELATIONS = ["capital of", "capital", "located in"]


def accepted(grammar, answer):
    state = advance_bytes(grammar, grammar.start(), answer.encode("utf-8"))
    return bool(state) and grammar.accepts(state)


def on_a_path(grammar, prefix):
    return bool(advance_bytes(grammar, grammar.start(), prefix.encode("utf-8")))


def test_the_suffix_automaton_knows_exactly_the_substrings():
    data = "abracadabra 北京".encode("utf-8")
    automaton = SuffixAutomaton(data)
    rng = random.Random(0)
    for _ in range(500):
        start, length = rng.randrange(len(data)), rng.randrange(1, 6)
        probe = data[start:start + length] if rng.random() < 0.5 else bytes(rng.choice(data) for _ in range(length))
        state = 0
        for byte in probe:
            state = automaton.step(state, byte) if state is not None else None
        assert (state is not None) == (probe in data), probe


def test_knowlm_tuples_allow_schema_relations_and_input_spans_only():
    grammar = answer_grammar("re", "tuple", "en", RELATIONS, TEXT)
    assert accepted(grammar, "(Paris, capital of, France)")
    assert accepted(grammar, "(Paris, capital of, France),(the Louvre, located in, Paris)")
    assert accepted(grammar, "NAN")
    assert not accepted(grammar, "(Paris, capital of, Germany)")           # not in the input
    assert not accepted(grammar, "(Paris, capitol of, France)")            # not in the schema
    assert not accepted(grammar, "(Paris, capital of, France) and more")   # nothing after the answer closes
    assert not accepted(grammar, "(Paris, capital of, France")             # not closed: may not end here
    assert not accepted(grammar, "(, capital of, France)")                 # an empty head
    assert not on_a_path(grammar, "NAN,")


def test_a_schema_item_that_is_a_prefix_of_another_is_either():
    grammar = answer_grammar("re", "tuple", "en", RELATIONS, TEXT)
    assert accepted(grammar, "(Paris, capital, France)") and accepted(grammar, "(Paris, capital of, France)")
    assert on_a_path(grammar, "(Paris, capital")


def test_a_repeated_entity_is_a_span_and_a_span_with_a_separator_is_not():
    grammar = answer_grammar("re", "tuple", "en", RELATIONS, TEXT)
    assert accepted(grammar, "(Paris hosts the Louvre, located in, Paris)")
    assert not accepted(grammar, "(Paris hosts the Louvre, located in, France, and Paris)")   # parses two ways
    zh = answer_grammar("re", "tuple", "zh", ["总部"], "深圳，华为")
    assert not on_a_path(zh, "(深圳，")


def test_spans_hold_whole_ascii_words_while_chinese_text_may_be_cut_anywhere():
    grammar = answer_grammar("re", "tuple", "en", RELATIONS, TEXT)
    assert not accepted(grammar, "(Par, capital, France)") and not accepted(grammar, "(aris, capital, France)")
    assert accepted(grammar, "(the Louvre., capital, France)")
    mixed = answer_grammar("re", "tuple", "zh", ["首都"], "华为P50发布于2023年。")
    assert accepted(mixed, "(华为P50,首都,2023年)") and accepted(mixed, "(为P50,首都,布于)")
    assert not accepted(mixed, "(为P,首都,华为)") and not accepted(mixed, "(华为,首都,50)")


def test_an_empty_schema_group_allows_only_nan_or_an_empty_object():
    assert accepted(answer_grammar("re", "tuple", "en", [], TEXT), "NAN")
    assert not on_a_path(answer_grammar("re", "tuple", "en", [], TEXT), "(")
    oneke = answer_grammar("re", "oneke", "en", [], TEXT)
    assert accepted(oneke, "{}") and not on_a_path(oneke, '{"')
    one = answer_grammar("ner", "oneke", "en", ["person"], TEXT)
    assert accepted(one, '{"person": []}') and accepted(one, '{"person": ["Paris", "France"]}')
    assert not accepted(one, '{"person": ["Berlin"]}') and not accepted(one, '{"place": []}')


def test_chinese_text_with_full_width_punctuation_and_characters_split_across_tokens():
    text = "华为（深圳）的总部位于深圳，创始人是任正非。"
    grammar = answer_grammar("re", "tuple", "zh", ["总部", "创始人"], text)
    assert accepted(grammar, "(华为（深圳）,总部,深圳),(华为（深圳）,创始人,任正非)")
    assert not accepted(grammar, "(华为,总部,北京)")
    whole = "华".encode("utf-8")
    state = advance_bytes(grammar, grammar.start(), b"(" + whole[:2])      # half a character, inside a span
    assert state and not grammar.accepts(state)
    assert not advance_bytes(grammar, state, b",")                         # a span ends only on a character
    assert advance_bytes(grammar, state, whole[2:] + "为".encode("utf-8"))


def test_tokens_that_straddle_a_span_edge_are_allowed_and_the_mask_holds_only_valid_tokens():
    vocab = [b"(", b"Par", b"is", b"Paris,", b" capital", b" of", b", ", b"France", b")", b"NAN", b"Germany",
             b"\xe5", None, b"is, capital of, Fr"]
    grammar = answer_grammar("re", "tuple", "en", RELATIONS, TEXT)
    trie = VocabularyTrie(vocab)
    state = advance_bytes(grammar, grammar.start(), b"(")
    assert sorted(allowed_tokens(grammar, trie, state)) == [1, 2, 3, 7, 13]    # span starts, "Paris," straddles
    state = advance_bytes(grammar, state, b"Par")
    assert 13 in allowed_tokens(grammar, trie, state) and 10 not in allowed_tokens(grammar, trie, state)
    assert sorted(allowed_tokens(grammar, trie, grammar.start())) == [0, 9]


@pytest.mark.parametrize("task,fmt,language,schema,text", [
    ("re", "tuple", "en", RELATIONS, TEXT),
    ("re", "tuple", "zh", ["总部", "创始人"], "华为（深圳）的总部位于深圳，创始人是任正非。"),
    ("ner", "tuple", "en", ["location", "museum"], TEXT),
    ("re", "oneke", "en", RELATIONS, TEXT),
    ("ner", "oneke", "zh", ["地点", "人物"], "任正非在深圳创立了华为。"),
])
def test_every_random_walk_through_the_mask_ends_in_an_answer_that_parses(task, fmt, language, schema, text):
    # Every single byte (as byte-level vocabularies have), a few multi-byte pieces that straddle characters and
    # words, and the format's own strings.
    alphabet = sorted({bytes([b]) for b in (text + "".join(schema)).encode("utf-8")}
                      | {text.encode()[i:i + 3] for i in range(0, 30)}
                      | {b"(", b")", b",", b", ", b'"', b'", "', b'": [', b"{", b"}", b"]", b"NAN", b" "}
                      | {name.encode() for name in schema} | {b'{"subject": "', b'", "object": "', b'"}'})
    alphabet = sorted(set(alphabet) | {bytes([b]) for piece in alphabet for b in piece})
    vocab = alphabet + [None]                   # the last id stands for end-of-sequence
    grammar = answer_grammar(task, fmt, language, schema, text)
    trie = VocabularyTrie(vocab)
    rng = random.Random(0)
    for _ in range(30):
        state, answer = grammar.start(), b""
        for _ in range(60):
            choices = allowed_tokens(grammar, trie, state) + ([len(vocab) - 1] if grammar.accepts(state) else [])
            assert choices, answer.decode("utf-8", "replace")          # never a dead end
            # The trie walk follows only the bytes a state may take: it finds exactly the tokens that fit.
            assert sorted(allowed_tokens(grammar, trie, state)) == [
                token for token, piece in enumerate(vocab) if piece and advance_bytes(grammar, state, piece)]
            token = rng.choice(choices)
            if token == len(vocab) - 1:
                break
            answer += vocab[token]
            state = advance_bytes(grammar, state, vocab[token])
        if not grammar.accepts(state):
            continue                            # cut off by the walk's length, as max_new_tokens would
        parsed = parse(task, answer.decode("utf-8"), fmt, schema)
        assert parsed.errors == 0, answer.decode()
        for record in parsed.records:
            assert record[1] in schema, answer.decode()
            spans = [record[0], record[2]] if task == "re" else [record[0]]
            assert all(span in text for span in spans), answer.decode()


def test_unsupported_tasks_and_formats_are_one_line():
    with pytest.raises(KnowLMError, match="task 'ee'"):
        answer_grammar("ee", "tuple", "en", [], TEXT)
    with pytest.raises(KnowLMError, match="answer format 'json_list'"):
        answer_grammar("re", "json_list", "en", [], TEXT)
