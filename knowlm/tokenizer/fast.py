"""Hugging Face fast tokenizers (``tokenizer.json`` + ``tokenizer_config.json``) for models that ship no SentencePiece
model, such as SmolLM2's byte-level BPE with its ChatML chat template.

``KnowLMFastTokenizer`` subclasses MindFormers' ``PreTrainedTokenizerFast``, not transformers' class: MindFormers'
pipelines and ``build_tokenizer`` expect MindFormers' tokenizer API (``save_pretrained(directory, save_name=...)``,
its registry), and it wraps the same ``tokenizers`` backend, so ids equal transformers' (the tests compare them),
with no transformers import at run time. Both files are read as untrusted JSON: known keys of known types are taken,
nothing else, and no code runs (a chat template is only stored here; ``knowlm.tokenizer.chat`` renders it sandboxed).
"""
import json
from pathlib import Path

from mindformers.models.tokenization_utils_fast import PreTrainedTokenizerFast
from mindformers.tools.register import MindFormerModuleType, MindFormerRegister
from tokenizers import AddedToken, Tokenizer, processors

from knowlm.errors import KnowLMError, first_line
from knowlm.files import FAST_TOKENIZER_FILES, FAST_TOKENIZER_NAME, TOKENIZER_CONFIG_NAME, atomic_copy, file_in
from knowlm.tokenizer.chat import read_chat_template
from knowlm.models.pipelines import checkpoint_dir

# The files of a fast tokenizer, tokenizer.json first. special_tokens_map.json is not read (transformers reads it only
# for configs without added_tokens_decoder) but travels, so a copied directory stays what transformers wrote.
FAST_FILES = FAST_TOKENIZER_FILES
SPECIAL_TOKENS = ("bos_token", "eos_token", "unk_token", "sep_token", "pad_token", "cls_token", "mask_token")
_FLAGS = ("single_word", "lstrip", "rstrip", "normalized", "special")
# tokenizer_config.json keys taken as they are, with the type each must have.
_SETTINGS = {"clean_up_tokenization_spaces": bool, "split_special_tokens": bool, "model_max_length": int,
             "padding_side": str, "truncation_side": str}


@MindFormerRegister.register(MindFormerModuleType.TOKENIZER)
class KnowLMFastTokenizer(PreTrainedTokenizerFast):
    """A ``tokenizer.json`` with the special tokens and chat template of the ``tokenizer_config.json`` beside it.

    ``vocab_file``: that ``tokenizer.json`` or the model directory holding it (yaml ``type: KnowLMFastTokenizer``).
    Without a pad token, pad is eos (SmolLM2 pads with eos): knowlm masks by positions, so pad may equal eos.
    ``add_bos_token``/``add_eos_token``, when the config has them, decide the bos/eos added around a text, as
    transformers' LLaMA fast tokenizer does; otherwise ``tokenizer.json``'s post-processor does.
    """

    vocab_files_names = {"vocab_file": FAST_TOKENIZER_NAME}

    def __init__(self, vocab_file=None, pipeline_name=None, **kwargs):
        if not vocab_file and pipeline_name:        # yaml files of registered pipeline names: beside the weights
            vocab_file = checkpoint_dir(pipeline_name)
        path = _resolve(vocab_file)
        settings, template, template_source = read_tokenizer_config(path.parent)
        add_bos, add_eos = settings.pop("add_bos_token", None), settings.pop("add_eos_token", None)
        settings.update(kwargs)
        super().__init__(tokenizer_object=read_tokenizer_json(path), chat_template=template, **settings)
        self.vocab_file = str(path)
        self.chat_template_source = str(template_source)
        self.pad_is_eos = self.pad_token is None and self.eos_token is not None
        if self.pad_is_eos:
            self.pad_token = self.eos_token
        if add_bos is not None or add_eos is not None:
            self._set_bos_eos(bool(add_bos), bool(add_eos), path)

    def chat_template_variables(self) -> dict:
        """The special tokens a chat template sees, as transformers passes them (without a pad it only defaulted)."""
        variables = dict(self.special_tokens_map)
        if self.pad_is_eos:
            variables.pop("pad_token", None)
        return variables

    def save_pretrained(self, save_directory=None, save_name=None, **kwargs):
        """Copies of the files it was built from (MindFormers' own yaml + vocabulary format has no fast tokenizer):
        what ``pipeline.save_pretrained`` calls; ``save_name`` and the rest are MindFormers' and do not apply."""
        if save_directory is None:
            raise KnowLMError("KnowLMFastTokenizer.save_pretrained: save_directory is not set")
        return self.save_vocabulary(save_directory)

    def save_vocabulary(self, save_directory, filename_prefix=None):
        source = Path(self.vocab_file).parent
        Path(save_directory).mkdir(parents=True, exist_ok=True)
        return tuple(str(atomic_copy(source / name, Path(save_directory) / name))
                     for name in FAST_FILES if (source / name).is_file())

    def _set_bos_eos(self, add_bos, add_eos, path):
        """transformers' ``LlamaTokenizerFast.update_post_processor``: ``<bos> $A <eos>`` as the config asks."""
        for name, wanted in (("bos_token", add_bos), ("eos_token", add_eos)):
            if wanted and getattr(self, name) is None:
                raise KnowLMError(f"{path.parent / TOKENIZER_CONFIG_NAME}: add_{name} is true, but {name} is not set")
        bos, eos = [str(self.bos_token)] * add_bos, [str(self.eos_token)] * add_eos

        def sequence(name, type_id):
            return " ".join(f"{token}:{type_id}" for token in [*bos, f"${name}", *eos])
        self._tokenizer.post_processor = processors.TemplateProcessing(
            single=sequence("A", 0), pair=f"{sequence('A', 0)} {sequence('B', 1)}",
            special_tokens=[(token, self.convert_tokens_to_ids(token)) for token in dict.fromkeys(bos + eos)])


def _resolve(vocab_file) -> Path:
    return file_in(vocab_file, FAST_TOKENIZER_NAME, "KnowLMFastTokenizer", "a Hugging Face tokenizer.json")


def _read_json(path, what):
    """(the parsed JSON, its text) of ``path``; one line naming it if it is unreadable, not UTF-8 or not JSON."""
    try:
        text = Path(path).read_bytes().decode("utf-8")
        return json.loads(text), text
    except UnicodeDecodeError as err:
        raise KnowLMError(f"{path}: not UTF-8 text (byte {err.start}); expected {what}") from None
    except json.JSONDecodeError as err:
        raise KnowLMError(f"{path}: invalid JSON ({first_line(err)}); expected {what}") from None
    except OSError as err:
        raise KnowLMError(f"{path}: cannot be read ({err.strerror or first_line(err)})") from None


def read_tokenizer_json(path) -> Tokenizer:
    """The ``tokenizers`` backend of ``path``; one line if it is not a Hugging Face tokenizers file."""
    what = "a Hugging Face tokenizers file (tokenizer.json)"
    data, text = _read_json(path, what)
    if not isinstance(data, dict) or not isinstance(data.get("model"), dict):
        raise KnowLMError(f"{path}: no tokenizer 'model' in it; expected {what}")
    try:
        return Tokenizer.from_str(text)
    except Exception as err:     # the Rust parser's own error type; any failure means the file is not one
        raise KnowLMError(f"{path}: not a Hugging Face tokenizers file ({first_line(err)})") from None


def read_tokenizer_config(directory):
    """(settings, chat_template, where the template came from) of ``directory``'s tokenizer_config.json.

    Only special tokens, added tokens and the ``_SETTINGS`` are taken, each checked for its type. A
    ``chat_template.jinja`` beside it wins over the config's ``chat_template``, as in transformers.
    """
    directory = Path(directory)
    path = directory / TOKENIZER_CONFIG_NAME
    config = _read_json(path, "the tokenizer's settings (a JSON object)")[0] if path.is_file() else {}
    if not isinstance(config, dict):
        raise KnowLMError(f"{path}: expected a JSON object of tokenizer settings, got {type(config).__name__}")
    settings = {}
    for name in SPECIAL_TOKENS:
        if config.get(name) not in (None, ""):      # old LLaMA conversions wrote "" for unset tokens
            settings[name] = _token_content(config[name], path, name)
    extra = config.get("additional_special_tokens") or []
    if not isinstance(extra, list):
        raise KnowLMError(f"{path}: 'additional_special_tokens' must be a list of tokens")
    if extra:
        settings["additional_special_tokens"] = [_token_content(token, path, "additional_special_tokens")
                                                 for token in extra]
    settings["added_tokens_decoder"] = _added_tokens(config.get("added_tokens_decoder") or {}, path)
    settings["clean_up_tokenization_spaces"] = False    # transformers' default, not MindFormers' (True)
    for name, kind in _SETTINGS.items():
        if config.get(name) is not None:
            if not isinstance(config[name], kind) or (kind is int and isinstance(config[name], bool)):
                raise KnowLMError(f"{path}: '{name}' must be a {kind.__name__}, got {config[name]!r}")
            settings[name] = config[name]
    for side in ("padding_side", "truncation_side"):
        if settings.get(side, "right") not in ("left", "right"):
            raise KnowLMError(f"{path}: '{side}' must be 'left' or 'right', got {settings[side]!r}")
    for name in ("add_bos_token", "add_eos_token"):
        if config.get(name) is not None:
            if not isinstance(config[name], bool):
                raise KnowLMError(f"{path}: '{name}' must be true or false, got {config[name]!r}")
            settings[name] = config[name]
    template, source = read_chat_template(directory, config)
    return settings, template, source


def _token_content(value, path, name) -> str:
    """A special token written as a string or as transformers' serialised ``AddedToken`` (``{"content": ...}``)."""
    content = value.get("content") if isinstance(value, dict) else value
    if not isinstance(content, str) or not content:
        raise KnowLMError(f"{path}: '{name}' must be a token string, got {value!r}"[:300])
    return content


def _added_tokens(entries, path) -> dict:
    if not isinstance(entries, dict):
        raise KnowLMError(f"{path}: 'added_tokens_decoder' must map ids to tokens")
    tokens = {}
    for index, entry in entries.items():
        if not (isinstance(index, str) and index.isdigit() and isinstance(entry, dict)
                and all(isinstance(entry.get(flag, False), bool) for flag in _FLAGS)):
            raise KnowLMError(f"{path}: 'added_tokens_decoder' entry {index!r} must be id -> "
                              "{content, lstrip, rstrip, normalized, single_word, special}"[:300])
        content = _token_content(entry, path, f"added_tokens_decoder.{index}")
        tokens[int(index)] = AddedToken(content, **{flag: entry[flag] for flag in _FLAGS if flag in entry})
    return tokens
