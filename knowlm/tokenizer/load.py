"""Which tokenizer a model directory holds, loading it, and checking that it is the one of the weights.

A directory holds a SentencePiece ``tokenizer.model`` (KnowLM, OneKE: ``KnowLMTokenizer``) or a Hugging Face
``tokenizer.json`` + ``tokenizer_config.json`` (``KnowLMFastTokenizer``). When both are there, ``tokenizer.model``
wins: it is what KnowLM ships and what its own code loads (transformers' slow ``LlamaTokenizer``), and a LLaMA
``tokenizer.json`` is only a conversion of it. One exception: a ``tokenizer.model`` that is a GGUF file (transformers'
``save_pretrained`` of a tokenizer read from GGUF copies the GGUF there) is no tokenizer, and ``tokenizer.json`` is.

Framework imports happen inside the functions that build a tokenizer: listing the files loads no MindFormers.
"""
from pathlib import Path
from types import SimpleNamespace

from knowlm.errors import KnowLMError
from knowlm.files import (FAST_TOKENIZER_FILES, FAST_TOKENIZER_NAME, SENTENCEPIECE_FILES, TOKENIZER_CONFIG_NAME,
                          TOKENIZER_NAME)
from knowlm.tokenizer.chat import read_chat_template

SENTENCEPIECE, FAST = "sentencepiece", "fast"
# Files that travel with each kind (the first is required), copied when a model directory is written.
KIND_FILES = {SENTENCEPIECE: SENTENCEPIECE_FILES, FAST: FAST_TOKENIZER_FILES}
_GGUF_MAGIC = b"GGUF"


def tokenizer_kind(directory) -> str:
    """``"sentencepiece"`` or ``"fast"``: the tokenizer of model directory ``directory`` (see the module's rule)."""
    directory = Path(directory)
    spm, fast = directory / TOKENIZER_NAME, directory / FAST_TOKENIZER_NAME
    if spm.is_file() and not _is_gguf(spm):
        return SENTENCEPIECE
    if fast.is_file():
        return FAST
    if spm.is_file():
        raise KnowLMError(f"{spm}: a GGUF file, not a SentencePiece model; expected {TOKENIZER_NAME} (SentencePiece) "
                          f"or {FAST_TOKENIZER_NAME} beside it")
    raise KnowLMError(f"{directory}: no tokenizer; expected {TOKENIZER_NAME} (SentencePiece) or {FAST_TOKENIZER_NAME} "
                      f"+ {TOKENIZER_CONFIG_NAME} (Hugging Face) in it")


def _is_gguf(path) -> bool:
    with open(path, "rb") as file:
        return file.read(len(_GGUF_MAGIC)) == _GGUF_MAGIC


def tokenizer_files(directory) -> list:
    """The files of ``directory``'s tokenizer that are present: the ones to copy into a model directory."""
    directory = Path(directory)
    return [directory / name for name in KIND_FILES[tokenizer_kind(directory)] if (directory / name).is_file()]


def check_tokenizer_files(directory, vocab_size, bos_token_id=None, eos_token_id=None) -> list:
    """``tokenizer_files(directory)`` once the tokenizer they make loads and fits the weights (``check_tokenizer``):
    for a converter, before it writes anything. One line if there is none or it is bad."""
    files = tokenizer_files(directory)
    config = SimpleNamespace(vocab_size=vocab_size, bos_token_id=bos_token_id, eos_token_id=eos_token_id)
    load_tokenizer(directory, config)
    return files


def load_tokenizer(path, config=None):
    """The tokenizer of model directory ``path`` (or of the ``tokenizer.model``/``tokenizer.json`` file ``path``);
    checked against ``config`` (a ``KnowLMConfig``) when given. A SentencePiece tokenizer also gets the chat
    template the directory may hold."""
    path = Path(path)
    directory = path.parent if path.is_file() else path
    kind = {TOKENIZER_NAME: SENTENCEPIECE, FAST_TOKENIZER_NAME: FAST}.get(path.name) if path.is_file() else None
    kind = kind or tokenizer_kind(directory)
    if kind == FAST:
        from knowlm.tokenizer.fast import KnowLMFastTokenizer
        tokenizer = KnowLMFastTokenizer(vocab_file=str(directory / FAST_TOKENIZER_NAME))
    else:
        from knowlm.tokenizer.spm import KnowLMTokenizer
        tokenizer = KnowLMTokenizer(vocab_file=str(directory / TOKENIZER_NAME))
        template, source = read_chat_template(directory)
        if template is not None:
            tokenizer.chat_template, tokenizer.chat_template_source = template, str(source)
    if config is not None:
        check_tokenizer(tokenizer, config)
    return tokenizer


def check_tokenizer(tokenizer, config, source=None):
    """One line naming the tokenizer's file unless ``tokenizer`` fits the weights of ``config``: every id it can
    produce (added tokens included) is below ``config.vocab_size``, and its bos/eos ids, when both sides have them,
    are the config's ``bos_token_id``/``eos_token_id`` (a list of eos ids: one of them)."""
    source = source or tokenizer.vocab_file
    vocab_size = getattr(config, "vocab_size", None)
    if vocab_size is not None:
        if getattr(tokenizer, "sp_model", None) is not None:
            from knowlm.tokenizer.spm import check_sentencepiece
            check_sentencepiece(tokenizer.vocab_file, vocab_size)
        # Not len(tokenizer): MindFormers' slow tokenizers count <unk>, <s>, </s> twice there.
        size = max(tokenizer.get_vocab().values()) + 1
        if size > vocab_size:
            raise KnowLMError(f"{source}: {size} tokens, but the model config has vocab_size {vocab_size}; this "
                              "tokenizer is not the one of these weights")
    for name in ("bos", "eos"):
        token_id, wanted = getattr(tokenizer, f"{name}_token_id", None), getattr(config, f"{name}_token_id", None)
        if token_id is None or wanted is None:
            continue
        if token_id not in (wanted if isinstance(wanted, (list, tuple)) else [wanted]):
            where = source if source != tokenizer.vocab_file else _special_tokens_file(tokenizer)
            raise KnowLMError(f"{where}: {name}_token {str(getattr(tokenizer, f'{name}_token'))!r} is id {token_id}, "
                              f"but the model config has {name}_token_id {wanted}; this tokenizer is not the one of "
                              "these weights")
    return tokenizer


def _special_tokens_file(tokenizer):
    """Where a tokenizer's special tokens are written: tokenizer_config.json beside a tokenizer.json, if any."""
    vocab_file = Path(tokenizer.vocab_file)
    config = vocab_file.parent / TOKENIZER_CONFIG_NAME
    return config if vocab_file.name == FAST_TOKENIZER_NAME and config.is_file() else vocab_file
