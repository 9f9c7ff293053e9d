"""KnowLM's tokenizer: LLaMA's SentencePiece tokenizer with a padding token that exists in the vocabulary.

MindFormers' old ``research/knowlm`` configured ``pad_token='<pad>'``, which LLaMA's 32000-piece vocabulary
does not contain, so padding silently became ``<unk>`` in some places and failed in others. KnowLM (like its
Hugging Face release) pads with id 0, ``<unk>``; this class makes that the default and refuses any pad token
that is not a real piece.
"""
import io
import re

import sentencepiece as spm
from mindformers.models.llama.llama_tokenizer import LlamaTokenizer
from mindformers.tools.register import MindFormerModuleType, MindFormerRegister

from knowlm.errors import KnowLMError, first_line
from knowlm.files import ASSETS_DIR, TOKENIZER_NAME, atomic_write, file_in
from knowlm.models.pipelines import checkpoint_dir

BUILTIN_TOKENIZER = ASSETS_DIR / "tokenizer.model"
BUILTIN_CORPUS = ASSETS_DIR / "corpus.txt"
# Where train_tokenizer(whole_pieces=...) forbids merges: between two CJK characters and after a space (so no
# piece starts with "▁" plus a letter: "Irene" is the same tokens after a space and after "(").
_NO_MERGE = re.compile(r"(?<=[\u3400-\u9fff])(?=[\u3400-\u9fff])|(?<= )")
_DELIMITER = "\u2063"   # INVISIBLE SEPARATOR: never in the training text itself


@MindFormerRegister.register(MindFormerModuleType.TOKENIZER)
class KnowLMTokenizer(LlamaTokenizer):
    """``LlamaTokenizer`` whose pad token defaults to ``<unk>`` (id 0) and must be in the vocabulary.

    ``vocab_file`` may be a ``tokenizer.model`` file or a model directory holding one; when it is unset and
    ``pipeline_name`` is given (yaml files of registered pipeline names), it is the one beside that name's weights.
    """

    def __init__(self, vocab_file=None, pad_token="<unk>", pipeline_name=None, **kwargs):
        if not vocab_file and pipeline_name:
            vocab_file = checkpoint_dir(pipeline_name)
        vocab_file = _resolve_vocab_file(vocab_file)
        super().__init__(vocab_file=str(vocab_file), pad_token=pad_token, **kwargs)
        pad = str(self.pad_token)
        if pad != str(self.unk_token) and self.sp_model.piece_to_id(pad) == self.sp_model.unk_id():
            raise KnowLMError(f"{vocab_file}: pad_token {pad!r} is not in the vocabulary; "
                              f"use a piece it contains, such as {str(self.unk_token)!r} (id 0)")


def _resolve_vocab_file(vocab_file):
    path = file_in(vocab_file, TOKENIZER_NAME, "KnowLMTokenizer", "the SentencePiece model shipped with the weights")
    check_sentencepiece(path)
    return path


def check_sentencepiece(path, vocab_size=None) -> int:
    """The number of pieces of SentencePiece model ``path``; one line if it is none, or has more pieces than the
    ``vocab_size`` of the weights it should serve."""
    try:
        pieces = spm.SentencePieceProcessor(model_file=str(path)).get_piece_size()
    except (RuntimeError, OSError) as err:
        raise KnowLMError(f"{path}: not a SentencePiece model ({first_line(err)})") from None
    if vocab_size is not None and pieces > vocab_size:
        raise KnowLMError(f"{path}: {pieces} pieces, but the model config has vocab_size {vocab_size}; this "
                          "tokenizer is not the one of these weights")
    return pieces


def train_tokenizer(texts, output_path, vocab_size, whole_pieces=None):
    """Train a LLaMA-style SentencePiece BPE model (unk 0, bos 1, eos 2, byte fallback) on ``texts``.

    Used to make small tokenizers for tests and the built-in tiny model; writes ``output_path`` atomically.
    With ``whole_pieces`` (the fixed wording of a prompt template, label names), each of them becomes a single
    piece, and pieces learned from ``texts`` never span two Chinese characters or follow a space: a name is then
    the same tokens inside a sentence and inside an answer, which is what a small model trained from scratch needs
    to learn to copy it (a piece like ``是南`` or ``▁Nan`` hides it), and a prompt's boilerplate costs a few
    tokens instead of a hundred.
    """
    options = {}
    if whole_pieces is not None:
        texts = [_NO_MERGE.sub(_DELIMITER, text) for text in texts]
        # SentencePiece matches user-defined symbols after it has turned spaces into "▁".
        options.update(pretokenization_delimiter=_DELIMITER,
                       user_defined_symbols=sorted({piece.replace(" ", "\u2581") for piece in whole_pieces if piece}))
    model = io.BytesIO()
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(texts), model_writer=model, vocab_size=vocab_size, model_type="bpe",
        character_coverage=1.0, byte_fallback=True, split_digits=True, unk_id=0, bos_id=1, eos_id=2, pad_id=-1,
        hard_vocab_limit=True, num_threads=1, minloglevel=2,
        # LLaMA keeps text as written: NFKC would turn Chinese punctuation into ASCII and break round trips.
        normalization_rule_name="identity", remove_extra_whitespaces=False, **options)
    return atomic_write(output_path, lambda tmp: tmp.write_bytes(model.getvalue()))
