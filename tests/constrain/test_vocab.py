"""Token bytes (``knowlm.constrain.vocab``): a text's tokens, joined, are the text's UTF-8 bytes — for the real
model's byte-level BPE (Chinese characters split across tokens) and for a SentencePiece vocabulary."""
import pytest

from knowlm.checkpoints.model_dir import load_config
from knowlm.constrain.automaton import VocabularyTrie, advance_bytes, allowed_tokens
from knowlm.constrain.formats import answer_grammar
from knowlm.constrain.vocab import token_bytes
from knowlm.models.packaged import packaged_model_dir
from knowlm.tokenizer.load import load_tokenizer
from knowlm.tokenizer.spm import BUILTIN_TOKENIZER, KnowLMTokenizer
from reference import needs_smollm2

TEXTS = ["华为（深圳）的总部位于深圳，创始人是任正非。", "Barack Obama was born in Honolulu, Hawaii.", "(a, b, c)\nNAN"]


@pytest.fixture(scope="module")
def smollm2_tokenizer():
    folder = packaged_model_dir("smollm2")
    return load_tokenizer(folder, load_config(folder))


@needs_smollm2
def test_byte_level_tokens_join_to_the_text_and_special_tokens_are_none(smollm2_tokenizer):
    tok = smollm2_tokenizer
    pieces = token_bytes(tok)
    assert len(pieces) == 49152 and pieces[tok.eos_token_id] is None
    for text in TEXTS:
        assert b"".join(pieces[i] for i in tok(text)["input_ids"]) == text.encode("utf-8")


def test_sentencepiece_tokens_join_to_the_text():
    tok = KnowLMTokenizer(vocab_file=BUILTIN_TOKENIZER)
    pieces = token_bytes(tok)
    assert pieces[tok.bos_token_id] is None
    for text in TEXTS:
        ids = tok(text)["input_ids"][1:]                     # after the BOS; SentencePiece's leading "▁"
        assert b"".join(pieces[i] for i in ids) == b" " + text.encode("utf-8")


@needs_smollm2
def test_the_real_vocabulary_mask_holds_only_tokens_that_keep_the_answer_valid(smollm2_tokenizer):
    tok = smollm2_tokenizer
    pieces = token_bytes(tok)
    trie = VocabularyTrie(pieces)
    text = "华为（深圳）的总部位于深圳，创始人是任正非。"
    grammar = answer_grammar("re", "tuple", "zh", ["总部", "创始人"], text)
    state = advance_bytes(grammar, grammar.start(), "(华为（深圳）,".encode())
    allowed = allowed_tokens(grammar, trie, state)
    assert allowed and all(advance_bytes(grammar, state, pieces[i]) for i in allowed)
    assert any("总".encode("utf-8").startswith(pieces[i]) or pieces[i].startswith("总".encode("utf-8"))
               for i in allowed)                                 # the relation 总部 can begin
    assert not any(advance_bytes(grammar, state, p) for p in (b"(", b"x", "北京".encode()))
