"""The files ``bench/real.py`` measures, made once and kept in knowlm's cache folder (``<cache>/bench/<model>/``,
keyed by the name of the knowlm model directory they come from), and the prompts' token ids.

From knowlm's packaged SmolLM2 directory (fp32, converted from the packaged GGUF):

- ``hf/``: ``knowlm export`` of it (Hugging Face safetensors + tokenizer files): transformers loads it, and it is
  what every other file is converted from, so all engines run the same weights;
- ``llama-{f32,bf16,q8_0}.gguf``: llama.cpp's own ``convert_hf_to_gguf.py`` (from the llama-cpp-python sdist of the
  installed version, unpacked in ``<cache>/bench/``) on ``hf-for-gguf/``: ``hf/``'s files, with a
  ``tokenizer.json`` that says what the tokenizer is (see ``gguf_input``);
- ``knowlm-{bf16,int8}-<digest>/``: ``knowlm convert hf/ OUT --dtype bf16|int8`` (``<digest>``: of knowlm's
  conversion code, ``knowlm/checkpoints/*.py``: another version converts again). A conversion that fails is
  reported, and the benchmark skips that (engine, precision) with the reason.
"""
import hashlib
import importlib.util
import json
import os
import shutil
import subprocess
import sys
import tarfile
from importlib.metadata import version
from pathlib import Path

GGUF_TYPES = {"fp32": "f32", "bf16": "bf16", "int8": "q8_0"}     # knowlm's precision -> llama.cpp's outtype
CHAT_QUESTION = "What is the capital of Japan? Tell me about that city in a few sentences."   # 47 tokens in ChatML
CORPUS = "knowlm/assets/corpus.txt"


def knowlm_cli(*args):
    """``knowlm ARGS`` in a subprocess; None, or the last lines of what it printed when it failed."""
    done = subprocess.run([sys.executable, "-c", "import sys; from knowlm.cli import main; sys.exit(main())", *args],
                          capture_output=True, text=True, check=False)
    if done.returncode == 0:
        return None
    lines = (done.stderr.strip() or done.stdout.strip() or f"exit status {done.returncode}").splitlines()
    return " | ".join(lines[-2:])


def converter_dir(bench_dir, log):
    """``vendor/llama.cpp`` of the llama-cpp-python sdist of the installed version (pip download; its cache makes
    a rerun quick), unpacked once."""
    release = version("llama-cpp-python")
    root = bench_dir / f"llama_cpp_python-{release}"
    script = root / "vendor" / "llama.cpp" / "convert_hf_to_gguf.py"
    if script.is_file():
        return script.parent
    log(f"llama.cpp converter: pip download llama-cpp-python=={release} (sdist)")
    download = bench_dir / "sdist"
    subprocess.run([sys.executable, "-m", "pip", "download", "--no-deps", "--no-binary", ":all:", "--quiet",
                    f"llama-cpp-python=={release}", "-d", str(download)], check=True)
    with tarfile.open(download / f"llama_cpp_python-{release}.tar.gz") as archive:
        archive.extractall(bench_dir, filter="data")
    return script.parent


def gguf_input(hf, out):
    """``hf``'s files (linked) with its ``tokenizer.json`` restated as the byte-level BPE it is.

    knowlm's ``tokenizer.json`` is transformers' conversion of the GGUF tokenizer: a byte-level BPE whose model says
    ``byte_fallback`` and whose decoder mixes SentencePiece steps in. It tokenizes exactly as SmolLM2's own (same
    ids on llama.cpp's pre-tokenizer check string), but llama.cpp's converter reads those two marks as a LLaMA
    SentencePiece vocabulary and writes one (``tokenizer.ggml.model = llama``), whose loading then fails on any
    text with a newline (``std::out_of_range``). Restated with SmolLM2's own pre-tokenizer and decoder, the
    converter recognises it (``tokenizer.ggml.pre = smollm``). A ``tokenizer.json`` of another kind is linked as it
    is."""
    out.mkdir(parents=True, exist_ok=True)
    for source in hf.iterdir():
        if source.name != "tokenizer.json" and not (out / source.name).exists():
            (out / source.name).symlink_to(source)
    tokenizer = json.loads((hf / "tokenizer.json").read_text())
    model, decoder = tokenizer["model"], tokenizer.get("decoder") or {}
    byte_level = tokenizer.get("pre_tokenizer", {}).get("type") == "ByteLevel"
    if model.get("type") == "BPE" and model.get("byte_fallback") and byte_level and decoder.get("type") == "Sequence":
        model["byte_fallback"] = False
        tokenizer["normalizer"] = None
        tokenizer["pre_tokenizer"] = {"type": "Sequence", "pretokenizers": [
            {"type": "Digits", "individual_digits": True},
            {"type": "ByteLevel", "add_prefix_space": False, "trim_offsets": True, "use_regex": True}]}
        tokenizer["decoder"] = {"type": "ByteLevel", "add_prefix_space": True, "trim_offsets": True,
                                "use_regex": True}
    (out / "tokenizer.json").write_text(json.dumps(tokenizer, ensure_ascii=False))
    return out


def convert_gguf(llama_dir, source, outtype, output):
    """llama.cpp's converter, writing ``output`` under a temporary name; None or the reason it failed."""
    tmp = output.with_name(f".{output.name}.{os.getpid()}.partial")
    env = {**os.environ, "PYTHONPATH": str(llama_dir / "gguf-py")}
    done = subprocess.run([sys.executable, str(llama_dir / "convert_hf_to_gguf.py"), str(source), "--outtype",
                           outtype, "--outfile", str(tmp)], env=env, capture_output=True, text=True, check=False)
    if done.returncode != 0:
        tmp.unlink(missing_ok=True)
        return " | ".join(done.stderr.strip().splitlines()[-2:])
    os.replace(tmp, output)
    return None


def converter_digest():
    """A digest of knowlm's conversion code: a directory it made is reused only by the same code."""
    package = Path(importlib.util.find_spec("knowlm").origin).parent
    digest = hashlib.sha256()
    for path in sorted((package / "checkpoints").glob("*.py")):
        digest.update(path.read_bytes())
    return digest.hexdigest()[:10]


def prepare(precisions, log, reconvert=False, transformers_bf16=False):
    """``(models, skipped)``: ``models[(engine, precision)]`` = the path to load; ``skipped[(engine, precision)]`` =
    why it cannot run."""
    from knowlm.files import cache_dir  # pylint: disable=import-outside-toplevel
    # In a subprocess: packaged_model_dir imports knowlm's GGUF converter, hence MindSpore, even when it has nothing
    # to convert, and this process's memory would stay taken while the engines run.
    found = subprocess.run([sys.executable, "-c", "from knowlm.models.packaged import packaged_model_dir; "
                            "print(packaged_model_dir('smollm2', echo=print))"], capture_output=True, text=True,
                           check=False)
    if found.returncode != 0:
        sys.exit(f"bench: the packaged model smollm2: {found.stderr.strip().splitlines()[-1:]}")
    source = Path(found.stdout.strip().splitlines()[-1])
    bench_dir = cache_dir() / "bench"
    base = bench_dir / source.name
    if reconvert:
        shutil.rmtree(base, ignore_errors=True)
    base.mkdir(parents=True, exist_ok=True)
    hf = base / "hf"
    if not (hf / "config.json").is_file():
        log(f"knowlm export {source} {hf}")
        failed = knowlm_cli("export", str(source), str(hf), "--force")
        if failed:
            sys.exit(f"bench: knowlm export failed: {failed}")
    models, skipped = {("knowlm", "fp32"): source, ("transformers", "fp32"): hf}, {}
    if transformers_bf16 and "bf16" in precisions:
        models[("transformers", "bf16")] = hf
    llama_dir = None
    for precision in precisions:
        output = base / f"llama-{GGUF_TYPES[precision]}.gguf"
        if not output.is_file():
            llama_dir = llama_dir or converter_dir(bench_dir, log)
            log(f"convert_hf_to_gguf.py --outtype {GGUF_TYPES[precision]} -> {output}")
            failed = convert_gguf(llama_dir, gguf_input(hf, base / "hf-for-gguf"), GGUF_TYPES[precision], output)
            if failed:
                skipped[("llama.cpp", precision)] = f"convert_hf_to_gguf.py failed: {failed}"
                continue
        models[("llama.cpp", precision)] = output
    digest = converter_digest()
    for precision in (p for p in precisions if p != "fp32"):
        output = base / f"knowlm-{precision}-{digest}"
        if not (output / "config.json").is_file():
            for stale in base.glob(f"knowlm-{precision}-*"):     # made by another version of the converter
                shutil.rmtree(stale, ignore_errors=True)
            log(f"knowlm convert {hf} {output} --dtype {precision}")
            failed = knowlm_cli("convert", str(hf), str(output), "--dtype", precision, "--force")
            if failed:
                skipped[("knowlm", precision)] = f"knowlm convert --dtype {precision} failed: {failed}"
                continue
        models[("knowlm", precision)] = output
    return {key: str(path) for key, path in models.items() if key[1] in precisions}, skipped


def prompts(hf_dir, repo_root):
    """Token ids every engine is given (tokenized once, by the Hugging Face tokenizer), and the chat text."""
    from transformers import AutoTokenizer  # pylint: disable=import-outside-toplevel
    tokenizer = AutoTokenizer.from_pretrained(hf_dir)
    turn = [{"role": "user", "content": CHAT_QUESTION}]
    chat_text = tokenizer.apply_chat_template(turn, add_generation_prompt=True, tokenize=False)
    chat = tokenizer.encode(chat_text, add_special_tokens=False)
    corpus = tokenizer.encode((Path(repo_root) / CORPUS).read_text(), add_special_tokens=False)
    text = (corpus * (2000 // len(corpus) + 1))           # real text, repeated to the length asked for
    return {"chat": chat, "text1000": text[:1000], "text1984": text[:1984]}, chat_text
