"""KnowLMTokenizer: LLaMA SentencePiece conventions, round trips, and its padding token."""
import pytest

from knowlm import KnowLMError, KnowLMTokenizer
from knowlm.tokenizer import BUILTIN_TOKENIZER, train_tokenizer

TEXTS = ["知识图谱由实体和关系组成，可以用三元组表示。", "浙江大学位于杭州，西湖是著名的景点！",
         "KnowLM extracts (subject, relation, object) triples from text.",
         "Paris is the capital of France; the Eiffel Tower is in Paris."]


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    path = tmp_path_factory.mktemp("spm") / "tokenizer.model"
    train_tokenizer(TEXTS * 20, path, vocab_size=400)
    return KnowLMTokenizer(vocab_file=str(path))


@pytest.mark.parametrize("text", TEXTS + ["未见过的字：龘 and unseen words: zyzzyva 42"])
def test_round_trip_of_chinese_and_english_text(trained, text):
    ids = trained(text)["input_ids"]
    assert ids[0] == 1
    assert trained.decode(ids, skip_special_tokens=True) == text


def test_llama_special_ids_and_pad_in_vocabulary(trained):
    assert (trained.unk_token_id, trained.bos_token_id, trained.eos_token_id, trained.pad_token_id) == (0, 1, 2, 0)
    assert trained.convert_ids_to_tokens(trained.pad_token_id) == "<unk>"


def test_builtin_tokenizer_fits_tiny_preset():
    from knowlm import KnowLMConfig
    assert KnowLMTokenizer(vocab_file=str(BUILTIN_TOKENIZER)).vocab_size == KnowLMConfig.from_name("tiny").vocab_size


def test_model_directory_is_accepted_as_vocab_file(tmp_path):
    (tmp_path / "tokenizer.model").write_bytes(BUILTIN_TOKENIZER.read_bytes())
    assert KnowLMTokenizer(vocab_file=str(tmp_path))("你好")["input_ids"][0] == 1


def test_pad_token_missing_from_vocabulary_is_refused():
    with pytest.raises(KnowLMError, match=r"pad_token '<pad>' is not in the vocabulary"):
        KnowLMTokenizer(vocab_file=str(BUILTIN_TOKENIZER), pad_token="<pad>")


def test_missing_tokenizer_model_names_the_path(tmp_path):
    with pytest.raises(KnowLMError, match=rf"{tmp_path}/tokenizer.model: tokenizer.model not found"):
        KnowLMTokenizer(vocab_file=str(tmp_path))


def test_file_that_is_not_sentencepiece_is_refused(tmp_path):
    bad = tmp_path / "tokenizer.model"
    bad.write_text("not a model")
    with pytest.raises(KnowLMError, match="not a SentencePiece model"):
        KnowLMTokenizer(vocab_file=str(bad))
