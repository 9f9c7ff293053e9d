"""A model directory with some tensors replaced: what ``knowlm edit`` writes.

Every other tensor is copied byte for byte from the source checkpoint (streamed, one at a time), so only the
replaced matrices differ; a replaced tensor is written in its source's dtype, refused if the result overflows it or
holds nan/inf. The tokenizer files, the shard index and ``config.json`` are copied; the output is published only
when complete (``knowlm.files.staged_output``). Int8 (Q8_0) sources are refused: re-quantising an edited matrix
would blur the edit; convert the model with ``--dtype fp32`` (or bf16) first.
"""
import time
from pathlib import Path

import numpy as np

from knowlm.checkpoints import stream
from knowlm.checkpoints.hf import checked_cast, import_torch
from knowlm.checkpoints.model_dir import checkpoint_files, load_config
from knowlm.checkpoints.names import expected_shapes, listing
from knowlm.checkpoints.quant import PACKED, logical_shape
from knowlm.checkpoints.summary import make_summary, progress_bar
from knowlm.errors import KnowLMError
from knowlm.files import CONFIG_NAME, WEIGHTS_GLOB, WEIGHTS_INDEX_NAME, atomic_copy, staged_output
from knowlm.tokenizer.load import tokenizer_files


def check_replaceable(source_dir, names):
    """Refuse, before any work, a source whose stored tensors ``names`` cannot be rewritten (int8, absent)."""
    source_dir = Path(source_dir)
    entries = {e.name: e for e in stream.validate(checkpoint_files(source_dir),
                                                   expected_shapes(load_config(source_dir)), source_dir)}
    missing = [name for name in names if name not in entries]
    if missing:
        raise KnowLMError(f"{source_dir}: no tensor {listing(missing)} to edit")
    packed = [name for name in names if entries[name].dtype == PACKED]
    if packed:
        raise KnowLMError(f"{source_dir}: {listing(packed)} stored int8 (Q8_0); edit a float32 or bf16 conversion "
                          "(knowlm convert --dtype fp32)")
    return entries


def write_replaced(source_dir, output_dir, tensors: dict, force=False, echo=None):
    """``output_dir``: ``source_dir`` with each ``{name: array}`` of ``tensors`` in place of the stored one."""
    start = time.time()
    source_dir, output_dir = Path(source_dir), Path(output_dir)
    entries = check_replaceable(source_dir, tensors)
    for name, array in tensors.items():
        if tuple(array.shape) != tuple(entries[name].shape):
            raise KnowLMError(f"{name}: new shape {tuple(array.shape)}, stored {tuple(entries[name].shape)}")
    files = checkpoint_files(source_dir)
    copied = [WEIGHTS_INDEX_NAME] if (source_dir / WEIGHTS_INDEX_NAME).is_file() else []
    copied += [path.name for path in tokenizer_files(source_dir)]
    torch = import_torch()
    with staged_output(output_dir, [*(path.name for path in files), *copied, CONFIG_NAME], force,
                       source_dir=source_dir, stale=WEIGHTS_GLOB) as tmps:
        with progress_bar(sum(e.nbytes for e in entries.values()), "write") as bar:
            for path, tmp in zip(files, tmps):
                with stream.writer(tmp) as f:
                    for entry in (e for e in entries.values() if e.path == str(path)):
                        data = entry.read()
                        if entry.name in tensors:
                            cast = checked_cast(torch.from_numpy(np.ascontiguousarray(tensors[entry.name])),
                                                entry.dtype, f"{entry.name} (edited)", check_finite=True)
                            data = cast.contiguous().reshape(-1).view(torch.uint8).numpy()
                        stream.write_tensor(f, entry.name, logical_shape(entry.shape, entry.dtype), entry.dtype, data)
                        bar.update(entry.nbytes)
        written = stream.validate(tmps[:len(files)], expected_shapes(load_config(source_dir)), output_dir,
                                  checksum=False)
        for name, tmp in zip([*copied, CONFIG_NAME], tmps[len(files):]):
            atomic_copy(source_dir / name, tmp)
    summary = make_summary("edited", output_dir, written, written[0].dtype, start)
    if echo:
        echo(str(summary))
    return summary
