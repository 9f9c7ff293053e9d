"""KnowLMTokenizer: LLaMA SentencePiece conventions, round trips, and its padding token."""
import pytest

from knowlm import KnowLMError, KnowLMTokenizer
from knowlm.tokenizer.spm import BUILTIN_TOKENIZER, train_tokenizer

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
    with pytest.raises(KnowLMError, match=rf"{tmp_path}/tokenizer.model: not found"):
        KnowLMTokenizer(vocab_file=str(tmp_path))


def test_file_that_is_not_sentencepiece_is_refused(tmp_path):
    bad = tmp_path / "tokenizer.model"
    bad.write_text("not a model")
    with pytest.raises(KnowLMError, match="not a SentencePiece model"):
        KnowLMTokenizer(vocab_file=str(bad))




def _name_pieces(tokenizer, text, name):
    """The run of pieces that spells exactly ``name`` inside ``text``, or None when pieces straddle its edges."""
    pieces = tokenizer.convert_ids_to_tokens(tokenizer.encode(text, add_special_tokens=False))
    for start in range(len(pieces)):
        for end in range(start + 1, len(pieces) + 1):
            if "".join(pieces[start:end]).replace("\u2581", " ") == name:
                return pieces[start:end]
    return None


def test_whole_pieces_keep_each_name_the_same_pieces_in_its_sentence_and_its_answer(tmp_path):
    cases = [("云州是青岚国的首都。", "(青岚国,首都,云州)", ("青岚国", "云州")),
             ("火泽是赤原国的首都。", "(赤原国,首都,火泽)", ("赤原国", "火泽")),
             ("Nanxi Normal University lies in Shiqiao.", "(Nanxi Normal University, located in, Shiqiao)",
              ("Nanxi Normal University", "Shiqiao")),
             ("The capital of Dandor is Orbelkel.", "(Dandor, capital, Orbelkel)", ("Dandor", "Orbelkel")),
             ("Wutong Bay is the hometown of Irene Brook.", "(Irene Brook, place of birth, Wutong Bay)",
              ("Irene Brook", "Wutong Bay"))]
    texts = [text for sentence, answer, _ in cases for text in (sentence, answer)] * 30
    template = "### Instruction:\n请根据关系列表抽取三元组。\n\n### Input:\n"
    plain = KnowLMTokenizer(vocab_file=str(train_tokenizer(texts, tmp_path / "plain.model", 380)))
    friendly = KnowLMTokenizer(vocab_file=str(train_tokenizer(texts, tmp_path / "friendly.model", 380,
                                                               whole_pieces=[template, "located in"])))

    def same_pieces(tokenizer, sentence, answer, name):
        # As in a prompt: the sentence follows the template's newline, the answer the response marker's.
        in_sentence = _name_pieces(tokenizer, template + sentence, name)
        return in_sentence is not None and in_sentence == _name_pieces(tokenizer, "Response:\n" + answer, name)

    checks = [(sentence, answer, name) for sentence, answer, names in cases for name in names]
    assert all(same_pieces(friendly, *check) for check in checks)
    # Plain BPE learns pieces across a name's edge ("是青", "▁Orbelkel"): some names change pieces with context.
    assert not all(same_pieces(plain, *check) for check in checks)
    # Each whole piece is one token wherever it occurs, spaces and newlines included, and decodes back unchanged.
    prompt = template + "Shiqiao is located in Nanxi."
    ids = friendly.encode(prompt, add_special_tokens=False)
    pieces = friendly.convert_ids_to_tokens(ids)
    assert template.replace(" ", "\u2581") in pieces and "located\u2581in" in pieces
    assert friendly.decode(ids) == prompt
