"""Edits applied to a loaded model, and scored: what ``knowlm edit`` runs.

``Editor(model, tokenizer, method, hparams)`` holds what every edit of a run shares: the compiled cells, the
context templates (sampled once per run from ``hparams.seed``, as EasyEdit caches them per process) and the
second moments. ``apply(requests)`` edits the model in memory: ROME one request after another, each on the weights
the previous left (EasyEdit's sequential editing); MEMIT all requests in one batch. ``each(requests)`` edits every
request alone from the original weights, scores it and restores the weights (EasyEdit's default evaluation, the
one its published numbers use).
"""
import time

import mindspore as ms
import numpy as np

from knowlm.edit.context import sample_templates
from knowlm.edit.evaluate import locality_predictions, score_requests, summarize
from knowlm.edit.memit import memit_updates
from knowlm.edit.rome import rome_update
from knowlm.edit.stats import second_moments
from knowlm.edit.trace import Cells, rewritten_weight
from knowlm.errors import KnowLMError

MEMIT_TEMPLATES = ((10, 5),)        # EasyEdit's memit_main: five sampled prefixes of up to 10 tokens


class Editor:
    def __init__(self, model, tokenizer, method, hparams, echo=None):
        if model.config.use_past:
            raise KnowLMError("editing needs a model built without the KV cache (use_past=False)")
        self.model, self.tokenizer, self.method, self.hparams = model, tokenizer, method, hparams
        self.cells, self.echo = Cells.of(model), echo or (lambda line: None)
        self._templates, self._moments = None, None

    @property
    def layers(self) -> tuple:
        return tuple(self.hparams.layers)

    def templates(self) -> list:
        if self._templates is None:
            lengths = self.hparams.context_template_length_params if self.method == "rome" else MEMIT_TEMPLATES
            self._templates = sample_templates(self.cells, self.tokenizer, lengths, self.hparams.seed)
        return self._templates

    def moments(self) -> dict:
        needed = self.method == "memit" or self.hparams.mom2_adjustment
        if needed and self._moments is None:
            self._moments = second_moments(self.cells, self.tokenizer, self.layers, self.hparams.mom2_n_samples,
                                           self.hparams.stats_width, self.echo)
        return self._moments

    def _params(self) -> dict:
        return {param.name: param for param in (rewritten_weight(self.model, layer) for layer in self.layers)}

    def weights(self) -> dict:
        """``{parameter name: float32 array}`` of the matrices an edit rewrites."""
        return {name: param.asnumpy() for name, param in self._params().items()}

    def restore(self, weights):
        params = self._params()
        for name, array in weights.items():
            params[name].set_data(ms.Tensor(array))

    def _add(self, layer, delta, where):
        param = rewritten_weight(self.model, layer)
        updated = (param.asnumpy().astype(np.float64) + delta).astype(np.float32)
        if not np.isfinite(updated).all():
            raise KnowLMError(f"{where}: layer {layer}'s weight would hold nan/inf after the update; nothing is "
                              "edited")
        param.set_data(ms.Tensor(updated))

    def apply(self, requests, where=None) -> list:
        """Edit the model in memory; one log line per request (or batch). Returns each request's ``Value``."""
        templates, moments = self.templates(), self.moments()
        where = where or ("requests" if self.method == "memit" else "request")
        labels = [where] if len(requests) == 1 else [f"{where} {i}" for i in range(len(requests))]
        started = time.time()
        if self.method == "memit":
            values = memit_updates(self.cells, self.tokenizer, requests, templates, self.hparams, moments,
                                   lambda layer, delta: self._add(layer, delta, where), where)
        else:
            values = []
            for request, label in zip(requests, labels):
                layer, delta, value = rome_update(self.cells, self.tokenizer, request, templates, self.hparams,
                                                  moments, label)
                self._add(layer, delta, label)
                values.append(value)
        for request, value, label in zip(requests, values, labels):
            self.echo(f"  {label}: {request.subject!r} -> {request.target_new!r}: value loss "
                      f"{value.losses[0]:.3f} -> {value.losses[1]:.3f} in {value.steps} steps")
        self.echo(f"  {self.method.upper()} on layer(s) {list(self.layers)}: {len(requests)} request(s) in "
                  f"{time.time() - started:.1f} s")
        return values

    def edit_and_score(self, requests) -> dict:
        """All ``requests`` applied (``apply``), then scored; locality against the model before the edits."""
        before = locality_predictions(self.model, self.tokenizer, requests)
        self.apply(requests)
        return score_requests(self.model, self.tokenizer, requests, before=before)

    def each(self, requests) -> dict:
        """Every request edited alone from the original weights and scored; the weights restored after each."""
        original = self.weights()
        rows = []
        for i, request in enumerate(requests):
            before = locality_predictions(self.model, self.tokenizer, [request])
            try:
                self.apply([request], where=f"request {i}")
                rows += score_requests(self.model, self.tokenizer, [request], before=before)["requests"]
            finally:
                self.restore(original)
        return {"requests": rows, "summary": summarize(rows)}
