"""Files knowlm reads and writes: where they live, what they are called, and how they are written.

Every output is written by ``atomic_write`` (or ``staged`` for several files that belong together): under its final
name inside a private folder beside the target, renamed into place when complete, removed on failure. A reader
therefore never sees half a file, two processes never share a temporary name, and an interrupted write leaves only
a hidden ``.<name>.<pid>.partial`` folder, which never looks like a result.
"""
import contextlib
import json
import os
import shutil
from pathlib import Path

from knowlm.errors import KnowLMError, first_line

PACKAGE_DIR = Path(__file__).resolve().parent
CONFIG_DIR = PACKAGE_DIR / "configs"        # MindFormers yaml files: configs/<model>/<task>.yaml
ASSETS_DIR = PACKAGE_DIR / "assets"

# A knowlm model directory (the names MindFormers' own from_pretrained uses).
CONFIG_NAME = "config.json"                              # KnowLMConfig.to_dict(); written last: its presence = complete
WEIGHTS_NAME = "mindspore_model.ckpt"                    # weights, or shards listed in the index
WEIGHTS_INDEX_NAME = "mindspore_model.ckpt.index.json"
WEIGHTS_GLOB = "mindspore_model*.ckpt*"                  # every weight file of a model directory
TOKENIZER_NAME = "tokenizer.model"                       # SentencePiece model (KnowLM, OneKE)
FAST_TOKENIZER_NAME = "tokenizer.json"                   # or a Hugging Face fast tokenizer (byte-level BPE models)
TOKENIZER_CONFIG_NAME = "tokenizer_config.json"          # beside tokenizer.json: special tokens, chat_template
CHAT_TEMPLATE_NAME = "chat_template.jinja"               # transformers >= 4.50 saves a model's template here
SPECIAL_TOKENS_MAP_NAME = "special_tokens_map.json"      # not read (transformers reads it only for old configs)
# The files of each kind of tokenizer (the first required), copied whenever a model directory is written.
SENTENCEPIECE_FILES = (TOKENIZER_NAME, TOKENIZER_CONFIG_NAME, CHAT_TEMPLATE_NAME)
FAST_TOKENIZER_FILES = (FAST_TOKENIZER_NAME, TOKENIZER_CONFIG_NAME, CHAT_TEMPLATE_NAME, SPECIAL_TOKENS_MAP_NAME)
# A LoRA adapter directory (PEFT's names).
ADAPTER_CONFIG = "adapter_config.json"
ADAPTER_WEIGHTS = "adapter_model.ckpt"


def file_in(path, name, owner, expected) -> Path:
    """``path``, or ``path/name`` when ``path`` is a directory (a model directory holding the file): the file a
    class (``owner``) was given; one line saying what was ``expected`` if it is unset or absent."""
    if path is None:
        raise KnowLMError(f"{owner}: vocab_file is not set; expected the path of {expected} or of a model directory "
                          "that holds one")
    path = Path(path)
    if path.is_dir():
        path = path / name
    if not path.is_file():
        raise KnowLMError(f"{path}: not found; expected {expected} (copy it from the model's Hugging Face "
                          "directory)")
    return path


def cache_dir() -> Path:
    """knowlm's cache folder: ``$KNOWLM_CACHE_DIR``, else ``$XDG_CACHE_HOME/knowlm`` (``~/.cache/knowlm``)."""
    if os.environ.get("KNOWLM_CACHE_DIR"):
        return Path(os.environ["KNOWLM_CACHE_DIR"])
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "knowlm"


@contextlib.contextmanager
def staged(*paths):
    """Temporary paths for ``paths`` (same base names, so writers that record their own name still work); on a clean
    exit they are renamed into place in the given order, so the last one is the one whose presence says complete."""
    paths = [Path(path) for path in paths]
    stage = paths[0].parent / f".{paths[0].name}.{os.getpid()}.partial"
    shutil.rmtree(stage, ignore_errors=True)
    try:
        stage.mkdir(parents=True)
    except OSError as err:
        raise KnowLMError(f"{paths[0]}: cannot be written ({err.strerror or first_line(err)})") from None
    try:
        yield [stage / path.name for path in paths]
        for path in paths:
            os.replace(stage / path.name, path)
    finally:
        shutil.rmtree(stage, ignore_errors=True)


def atomic_write(path, write):
    """``write(tmp)`` then rename ``tmp`` to ``path``: ``path`` is either absent, as it was, or complete."""
    with staged(path) as (tmp,):
        write(tmp)
    return Path(path)


def atomic_copy(source, target):
    return atomic_write(target, lambda tmp: shutil.copyfile(source, tmp))


def write_json(path, values: dict):
    return atomic_write(path, lambda tmp: tmp.write_text(
        json.dumps(values, indent=2, ensure_ascii=False, default=str) + "\n", encoding="utf-8"))


def read_text(path, what) -> str:
    """The UTF-8 text of ``path``; a missing or undecodable file is one line naming it and ``what`` it should be."""
    path = Path(path)
    if not path.is_file():
        raise KnowLMError(f"{path}: not found; expected {what}")
    try:
        return path.read_text(encoding="utf-8")
    except UnicodeDecodeError as err:
        raise KnowLMError(f"{path}: not UTF-8 text (byte {err.start}); expected {what}") from None


def read_yaml(path, what) -> dict:
    """``path`` parsed as a yaml mapping; a syntax error is one line with the file, line and column."""
    import yaml     # here, not at the top: most of knowlm reads no yaml
    try:
        values = yaml.safe_load(read_text(path, what))
    except yaml.YAMLError as err:
        mark = getattr(err, "problem_mark", None)
        where = f"{path}:{mark.line + 1}:{mark.column + 1}" if mark else str(path)
        raise KnowLMError(f"{where}: invalid yaml ({getattr(err, 'problem', None) or first_line(err)}); "
                          f"expected {what}") from None
    if not isinstance(values, dict):
        raise KnowLMError(f"{path}: expected {what} (a yaml mapping), got {type(values).__name__}")
    return values


def read_json(path) -> dict:
    path = Path(path)
    if not path.is_file():
        raise KnowLMError(f"{path}: not found")
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise KnowLMError(f"{path}: invalid JSON ({first_line(err)})") from None


def index_shards(index) -> list:
    """The shard files named by a ``{"weight_map": {tensor: file}}`` index (knowlm's and Hugging Face's)."""
    try:
        shards = sorted(set(json.loads(index.read_text(encoding="utf-8"))["weight_map"].values()))
    except (json.JSONDecodeError, KeyError, AttributeError, TypeError) as err:
        raise KnowLMError(f"{index}: expected JSON with a 'weight_map' of name -> shard file ({err})") from None
    missing = [name for name in shards if not (index.parent / name).is_file()]
    if missing:
        raise KnowLMError(f"{index}: lists shard(s) not in the directory: {', '.join(missing)}")
    return [index.parent / name for name in shards]


def refuse_existing(path, force: bool):
    """An existing ``path`` is refused unless ``force``; its folder is made."""
    path = Path(path)
    if path.exists() and not force:
        raise KnowLMError(f"{path}: already exists; pass --force to overwrite it")
    path.parent.mkdir(parents=True, exist_ok=True)
    return path


def refuse_output(path, force: bool, *inputs):
    """``refuse_existing`` for an output file, which must also not be one of the job's ``inputs``."""
    for source in inputs:
        if source is not None and Path(path).resolve() == Path(source).resolve():
            raise KnowLMError(f"{path}: is also an input of this command; choose another output file")
    return refuse_existing(path, force)


@contextlib.contextmanager
def staged_output(output_dir, names, force, source_dir=None, marker=CONFIG_NAME, stale=None):
    """Temporary paths for the files ``names`` of ``output_dir`` (``marker``, whose presence says complete, last).

    The body writes and checks them. On a clean exit the old result goes (its marker first, then the files matching
    the glob ``stale``: its parts, which the new result may not all replace) and the new files are renamed into
    place, the marker last. On any failure nothing is published: ``output_dir`` is as it was, or absent if it did
    not exist. A result already there is refused unless ``force``; ``source_dir``: the input, never the output.
    """
    output_dir = Path(output_dir)
    if names[-1] != marker:
        raise ValueError(f"staged_output: {marker} must be the last of {names}")
    if source_dir is not None and output_dir.resolve() == Path(source_dir).resolve():
        raise KnowLMError(f"{output_dir}: is the input directory; choose another output directory")
    if (output_dir / marker).exists() and not force:
        raise KnowLMError(f"{output_dir}: already holds a result ({marker}); pass --force to overwrite it")
    created = [path for path in (output_dir, *output_dir.parents) if not path.exists()]
    output_dir.mkdir(parents=True, exist_ok=True)
    try:
        with staged(*(output_dir / name for name in names)) as tmps:
            yield tmps
            (output_dir / marker).unlink(missing_ok=True)
            for path in output_dir.glob(stale) if stale else ():
                path.unlink()
    except BaseException:
        for path in created:            # deepest first; each is empty unless someone else wrote there meanwhile
            with contextlib.suppress(OSError):
                path.rmdir()
        raise
