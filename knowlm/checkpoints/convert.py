"""``knowlm convert`` and ``knowlm export``: Hugging Face LLaMA directories <-> knowlm model directories, streamed.

``convert_checkpoint`` checks every name, shape and dtype before writing, writes one MindSpore shard per input shard
(so memory stays near one input shard) with MindSpore's CRC trailer, checks every cast on the way (a narrowing one for
overflow, always), and re-reads the headers it wrote. ``export_checkpoint`` writes the reverse as safetensors shards,
bytes unchanged, after checking each MindSpore file's checksum. Both write the whole result under temporary names
(``staged_output``) and publish it only when complete and checked: a failure leaves the output as it was, or absent.
"""
import time
from math import prod
from pathlib import Path

from knowlm.checkpoints import stream
from knowlm.checkpoints.hf import (HF_SAFETENSORS, HF_SAFETENSORS_INDEX, HFShard, HFTensor, hf_config_from_knowlm,
                                   hf_weight_files, knowlm_config_from_hf, validate_safetensors, write_mindspore,
                                   write_safetensors)
from knowlm.checkpoints.model_dir import checkpoint_files, load_config
from knowlm.checkpoints.names import (HF_TO_MINDSPORE, UNKNOWN, check_tensors, expected_shapes, listing, lookup,
                                      mindspore_to_hf_name)
from knowlm.checkpoints.quant import INT8, PACKED, check_int8, logical_shape, storage_of
from knowlm.checkpoints.stream import DTYPES
from knowlm.checkpoints.summary import Summary, make_summary, progress_bar, resolve_dtype
from knowlm.errors import KnowLMError
from knowlm.files import (CONFIG_NAME, WEIGHTS_GLOB, WEIGHTS_INDEX_NAME, WEIGHTS_NAME, atomic_copy, read_json,
                          refuse_existing, staged, staged_output, write_json)
from knowlm.tokenizer.load import check_tokenizer_files, tokenizer_files


def convert_checkpoint(hf_dir, output, dtype=None, force=False, check_finite=False, prefer="safetensors",
                       echo=None) -> Summary:
    """Convert the Hugging Face LLaMA in ``hf_dir`` to a knowlm model directory ``output``.

    ``output`` ending in ``.ckpt`` writes a single MindSpore checkpoint file instead (the legacy command's
    output). ``dtype`` (fp32/fp16/bf16, or int8: llama.cpp's Q8_0, ``knowlm.checkpoints.quant``) defaults to the
    checkpoint's ``torch_dtype``. A cast to a narrower range
    (fp32 -> fp16 or bf16, bf16 -> fp16) is always checked for values that overflow it; ``check_finite`` checks
    every converted value for inf and nan too (for a same-dtype conversion: the source's values). A failed check
    names the file and tensor, and leaves ``output`` as it was. ``echo`` (e.g. ``print``) receives the resolved
    arguments before the work starts.
    """
    start = time.time()
    hf_dir, output = Path(hf_dir), Path(output)
    if not hf_dir.is_dir():
        raise KnowLMError(f"{hf_dir}: not a directory; expected a Hugging Face model directory")
    hf = read_json(hf_dir / CONFIG_NAME)
    files = hf_weight_files(hf_dir, prefer)
    plan, source_dtype = _plan(files)
    dtype = resolve_dtype(dtype, int8=True) if dtype else _default_dtype(hf, source_dtype)
    config = knowlm_config_from_hf(hf, dtype, source=str(hf_dir / CONFIG_NAME))
    expected = expected_shapes(config)
    if dtype == INT8:
        check_int8(expected, hf_dir, show=mindspore_to_hf_name)
    if config.tie_word_embeddings:      # .bin files of tied models store the shared matrix twice
        plan = [[e for e in entries if e.name != "lm_head.weight"] for entries in plan]
    check_tensors([e for entries in plan for e in entries], expected, hf_dir, show=mindspore_to_hf_name)
    single_file = output.suffix == ".ckpt"
    tokenizer = [] if single_file else check_tokenizer_files(hf_dir, config.vocab_size, config.bos_token_id,
                                                             config.eos_token_id)
    if single_file:
        refuse_existing(output, force)
    plan = [entries for entries in plan if entries]
    if single_file:
        names, plan = [output.name], [[e for entries in plan for e in entries]]
    else:
        names = [WEIGHTS_NAME] if len(plan) == 1 else \
            [f"{Path(WEIGHTS_NAME).stem}-{i:05d}-of-{len(plan):05d}.ckpt" for i in range(1, len(plan) + 1)]
    outputs = staged(output) if single_file else staged_output(
        output, [*names, *([WEIGHTS_INDEX_NAME] if len(names) > 1 else []), *(p.name for p in tokenizer), CONFIG_NAME],
        force,        source_dir=hf_dir, stale=WEIGHTS_GLOB)
    with outputs as tmps:
        if echo:
            echo(f"knowlm convert: {hf_dir} ({len(files)} {files[0].suffix[1:]} file(s), "
                 f"{sum(map(len, plan))} tensors, {source_dtype}) -> {output} ({dtype})")
        shards = tmps[:len(names)]
        with progress_bar(sum(e.nbytes for entries in plan for e in entries), "convert") as bar:
            for tmp, entries in zip(shards, plan):
                write_mindspore(tmp, entries, dtype, bar, check_finite)
        written = stream.validate(shards, expected, output, dtype, checksum=False)
        if not single_file:
            rest = tmps[len(names):]
            index, rest = (rest[0], rest[1:]) if len(names) > 1 else (None, rest)
            if index:
                weight_map = {e.name: Path(e.path).name for e in written}
                write_json(index, {"metadata": {"total_size": sum(e.nbytes for e in written)},
                                   "weight_map": weight_map})
            for source, tmp in zip(tokenizer, rest):
                atomic_copy(source, tmp)
            values = config.to_dict()
            values["checkpoint_name_or_path"] = ""
            write_json(rest[-1], values)
    return make_summary("converted", output, written, dtype, start)


def _plan(files):
    """Per file, the tensors to convert (``HFTensor``) and the first one's dtype; unknown names refused."""
    plan, source_dtype = [], None
    for path in files:
        shard = HFShard(path)
        targets = {name: lookup(name) for name in shard.headers}
        unknown = [name for name, target in targets.items() if target is UNKNOWN]
        if unknown:
            raise KnowLMError(f"{path}: unknown tensor name(s) {listing(unknown)}; expected LLaMA names such as "
                              f"{next(iter(HF_TO_MINDSPORE))!r}")
        plan.append([HFTensor(target, *shard.headers[name], str(path), name, shard.nbytes(name))
                     for name, target in targets.items() if target is not None])
        source_dtype = source_dtype or next((e.dtype for e in plan[-1]), None)
    return plan, source_dtype


def _default_dtype(hf, source_dtype):
    declared = hf.get("torch_dtype") or hf.get("dtype")
    return declared if declared in DTYPES else source_dtype



# ----------------------------------------------------------------------------------------------- export

def export_checkpoint(model_dir, hf_dir, force=False, echo=None) -> Summary:
    """Write knowlm model directory ``model_dir`` as a Hugging Face LLaMA directory ``hf_dir`` (safetensors).

    One safetensors file per MindSpore shard, with ``model.safetensors.index.json`` when there are several; the
    bytes are copied unchanged, so a round trip is bit-identical. An int8 (Q8_0) model is written dequantized, as
    float32 (the summary says so).
    """
    start = time.time()
    model_dir, hf_dir = Path(model_dir), Path(hf_dir)
    config = load_config(model_dir)
    expected = expected_shapes(config)
    shards = [stream.verify(path) for path in checkpoint_files(model_dir)]
    entries = [e for shard in shards for e in shard]
    storage = storage_of(entries)
    check_tensors(entries, expected, model_dir, dtype=storage)
    dtype = "float32" if storage == INT8 else storage
    exported = [_exported(e) for e in entries]
    names = [HF_SAFETENSORS] if len(shards) == 1 else \
        [f"model-{i:05d}-of-{len(shards):05d}.safetensors" for i in range(1, len(shards) + 1)]
    extra = [HF_SAFETENSORS_INDEX] if len(names) > 1 else []
    tokenizer = _tokenizer_files(model_dir)
    with staged_output(hf_dir, [*names, *extra, *(p.name for p in tokenizer), CONFIG_NAME], force, source_dir=model_dir,
                       stale="model*.safetensors*") as tmps:
        if echo:
            echo(f"knowlm export: {model_dir} ({len(shards)} ckpt file(s), {len(entries)} tensors, {storage}) "
                 f"-> {hf_dir}{' (float32, dequantized)' if storage == INT8 else ''}")
        with progress_bar(sum(e.nbytes for e in entries), "export") as bar:
            for tmp, shard in zip(tmps, shards):
                write_safetensors(tmp, shard, bar)
        validate_safetensors(tmps[:len(names)], expected, hf_dir, dtype)
        rest = iter(tmps[len(names):])
        if extra:
            write_json(next(rest), {
                "metadata": {"total_size": sum(e.nbytes for e in exported)},
                "weight_map": {mindspore_to_hf_name(e.name): name for name, shard in zip(names, shards)
                               for e in shard}})
        for source in tokenizer:
            atomic_copy(source, next(rest))
        write_json(next(rest), hf_config_from_knowlm(config, dtype))
    return make_summary("exported", hf_dir, exported, f"{dtype} dequantized from int8" if storage == INT8 else dtype,
                        start)


def _exported(entry) -> HFTensor:
    """What ``write_safetensors`` writes of ``entry``: itself, or float32 of its logical shape for a Q8_0 tensor."""
    if entry.dtype != PACKED:
        return HFTensor(entry.name, entry.shape, entry.dtype, entry.path, mindspore_to_hf_name(entry.name),
                        entry.nbytes)
    shape = logical_shape(entry.shape, PACKED)
    return HFTensor(entry.name, shape, "float32", entry.path, mindspore_to_hf_name(entry.name),
                    prod(shape) * DTYPES["float32"].itemsize)



def _tokenizer_files(model_dir):
    # A model directory without a tokenizer (weights made elsewhere) still exports its weights.
    try:
        return tokenizer_files(model_dir)
    except KnowLMError:
        return []
