"""The second moment ``C = E[k k^T]`` of a layer's down-projection inputs ``k`` over a text corpus (EasyEdit's
``layer_stats``): ROME's ``C^-1`` key direction (``mom2_adjustment``) and MEMIT's ``(lambda C + K K^T)^-1``.

EasyEdit averages over up to 100,000 Wikipedia articles; knowlm ships 504 paragraphs of public-domain English prose
(``knowlm/assets/edit/corpus_en.txt.gz``, see the README beside it), ~125,000 SmolLM2 tokens. ``mom2_n_samples``
paragraphs are drawn (all when it exceeds the corpus) in the order ``random.Random(1)`` shuffles them, as EasyEdit's
sampler does, each truncated to ``stats_width`` tokens; every token counts (uncentered, ``C = sum k k^T / N``).

Each layer's ``C`` is cached under ``<cache>/edit-stats/`` by a digest of what it depends on: the corpus tokens, the
row width, and the weights of the embedding and of every block up to that layer — so an edited model, another
tokenizer or a changed corpus never reuses a stale one. A progress bar shows on terminals.
"""
import gzip
import hashlib
import random

import mindspore as ms
import numpy as np
from tqdm import tqdm

from knowlm.edit.context import ROW_MULTIPLE
from knowlm.files import PACKAGE_DIR, atomic_write, cache_dir

CORPUS = PACKAGE_DIR / "assets" / "edit" / "corpus_en.txt.gz"


def corpus_paragraphs(path=CORPUS) -> list:
    with gzip.open(path, "rt", encoding="utf-8") as f:
        return [paragraph.strip() for paragraph in f.read().split("\n\n") if paragraph.strip()]


def second_moments(cells, tokenizer, layers, n_samples, width=256, echo=None) -> dict:
    """``{layer: C}`` (float64, ``[intermediate, intermediate]``) for ``layers`` of ``cells.model``."""
    paragraphs = corpus_paragraphs()
    order = list(range(len(paragraphs)))
    random.Random(1).shuffle(order)
    rows = [list(tokenizer(paragraphs[i])["input_ids"])[:width] for i in order[:n_samples]]
    rows.sort(key=len)
    paths = {layer: path for layer, path in zip(layers, _cache_paths(cells.model, rows, width, layers))}
    found = {layer: np.load(path) for layer, path in paths.items() if path.is_file()}
    missing = sorted(layer for layer in layers if layer not in found)
    if missing:
        if echo:
            echo(f"knowlm edit: second moment of layer(s) {missing} over {len(rows)} corpus paragraphs "
                 f"({sum(map(len, rows))} tokens), cached in {paths[missing[0]].parent}")
        for layer, moment in zip(missing, _accumulate(cells, rows, width, missing)):
            atomic_write(paths[layer], lambda tmp, moment=moment: _save(tmp, moment))
            found[layer] = moment
    return found


def _save(tmp, moment):
    with open(tmp, "wb") as f:
        np.save(f, moment)


def _accumulate(cells, rows, width, layers) -> list:
    probe = cells.probe(layers, width)
    sums = [np.zeros((0, 0))] * len(layers)
    count = 0
    with tqdm(total=sum(map(len, rows)), unit="tok", desc="second moment", disable=None) as bar:
        for first in range(0, len(rows), ROW_MULTIPLE):
            batch = rows[first:first + ROW_MULTIPLE]
            tokens = np.zeros((ROW_MULTIPLE, width), np.int32)
            valid = np.zeros((ROW_MULTIPLE, width), bool)
            for i, row in enumerate(batch):
                tokens[i, :len(row)], valid[i, :len(row)] = row, True
            keys = probe(ms.Tensor(tokens))[1].asnumpy()
            for index in range(len(layers)):
                k = keys[index][valid]
                # float32 products per batch (fast), summed in float64 across batches (no drift over 10^5 tokens)
                product = (k.T @ k).astype(np.float64)
                sums[index] = product if not sums[index].size else sums[index] + product
            count += int(valid.sum())
            bar.update(int(valid.sum()))
    return [total / count for total in sums]


def _cache_paths(model, rows, width, layers) -> list:
    """One file per layer, named by a digest of the corpus tokens, the width and the weights up to the layer."""
    digest = hashlib.sha256(f"{width}".encode())
    for row in rows:
        digest.update(np.asarray(row, np.int64).tobytes())
    params = dict(model.parameters_and_names())
    for name in sorted(name for name in params if "tok_embeddings" in name):
        digest.update(params[name].asnumpy().tobytes())
    paths, block = [], 0
    for layer in sorted(layers):
        for block in range(block, layer + 1):
            prefix = f"model.layers.{block}."
            for name in sorted(name for name in params if name.startswith(prefix)):
                digest.update(name.encode() + params[name].asnumpy().tobytes())
        block = layer + 1
        paths.append(cache_dir() / "edit-stats" / f"layer{layer}_{len(rows)}_{digest.hexdigest()[:20]}.npy")
    return [dict(zip(sorted(layers), paths))[layer] for layer in layers]
