"""EasyEdit's scores of an edited model (``evaluate_utils.test_prediction_acc``, ``editor.finalize_locality_metrics``).

Each score is a token accuracy under teacher forcing: ``prompt + " " + answer`` is tokenized as one text, the model
predicts every position greedily, and the predictions for the answer's tokens (those after the prompt's own tokens)
are compared with them. Per request: reliability (``prompt`` -> ``target_new``), generalization (each rephrase ->
``target_new``), portability (each portability prompt -> its answer), locality (each locality prompt: the predicted
tokens of its ground truth's positions, compared with the unedited model's, ``base``), and ``knows`` (``prompt`` ->
``ground_truth``: the old fact, before an edit the model should know it). The summary averages over requests, in
percent, as EasyEdit's ``summary_metrics`` does.
"""
import numpy as np

from knowlm.edit.trace import all_logits
from knowlm.errors import KnowLMError

METRICS = ("reliability", "generalization", "locality", "portability", "knows")


class TeacherForcing:
    """Greedy next-token predictions of ``model`` (a ``KnowLMForCausalLM`` built without a KV cache, so that one call
    gives every position's logits) at every position of a text."""

    def __init__(self, model, tokenizer):
        if model.config.use_past:
            raise KnowLMError("scoring needs a model built without the KV cache (use_past=False)")
        self.model, self.tokenizer, self.width = model, tokenizer, model.config.seq_length

    ROWS = 8         # texts per model call

    def predict(self, prompt, answer) -> tuple:
        """``(predicted ids, answer ids)`` for the answer's tokens after ``prompt``."""
        return self.predict_all([(prompt, answer)])[0]

    def predict_all(self, pairs) -> list:
        """``predict`` of every ``(prompt, answer)``, ``ROWS`` texts per model call."""
        texts = []
        for prompt, answer in pairs:
            ids = self.tokenizer(f"{prompt} {answer}")["input_ids"]
            if len(ids) > self.width:
                raise KnowLMError(f"{prompt!r} + {answer!r} is {len(ids)} tokens; the scoring model has "
                                  f"{self.width} positions")
            texts.append((ids, len(self.tokenizer(prompt)["input_ids"])))
        out = []
        for first in range(0, len(texts), self.ROWS):
            batch = texts[first:first + self.ROWS]
            padded = np.zeros((self.ROWS, self.width), np.int32)
            for row, (ids, _) in enumerate(batch):
                padded[row, :len(ids)] = ids
            logits = all_logits(self.model, padded)
            out += [(logits[row, start - 1:len(ids) - 1].argmax(-1).tolist(), ids[start:])
                    for row, (ids, start) in enumerate(batch)]
        return out


def accuracy(predicted, expected) -> float:
    return float(np.mean(np.equal(predicted, expected))) if len(expected) else float("nan")


def locality_predictions(model, tokenizer, requests) -> list:
    """The predicted tokens of every locality text of ``requests`` (in order): what the unedited model says."""
    pairs = [pair for request in requests for metric, pair in _texts(request) if metric == "locality"]
    return [predicted for predicted, _ in TeacherForcing(model, tokenizer).predict_all(pairs)]


def score_requests(model, tokenizer, requests, base=None, before=None) -> dict:
    """``{"requests": [per-request scores], "summary": {metric: percent}}``; ``base``: the unedited model, or
    ``before``: its ``locality_predictions`` (without either, no locality)."""
    if before is None and base is not None:
        before = locality_predictions(base, tokenizer, requests)
    before = list(before) if before is not None else None
    # Every text of every request in one list, so that the model calls are full batches.
    asked = [(request, metric, pair) for request in requests for metric, pair in _texts(request)
             if metric != "locality" or before is not None]
    after = TeacherForcing(model, tokenizer).predict_all([pair for _, _, pair in asked])
    values = {id(request): {} for request in requests}
    for (request, metric, _), (predicted, expected) in zip(asked, after):
        if metric == "locality":
            expected = before.pop(0)
        values[id(request)].setdefault(metric, []).append(accuracy(predicted, expected))
    rows = [{metric: float(np.mean(found)) for metric, found in values[id(request)].items()} for request in requests]
    return {"requests": rows, "summary": summarize(rows)}


def summarize(rows) -> dict:
    """The mean of each metric over the requests that have it, in percent (EasyEdit's ``summary_metrics``)."""
    return {metric: 100 * float(np.mean([row[metric] for row in rows if metric in row]))
            for metric in METRICS if any(metric in row for row in rows)}


def _texts(request):
    """``(metric, (prompt, answer))`` of every text a request is scored on."""
    yield "reliability", (request.prompt, request.target_new)
    yield from (("generalization", (prompt, request.target_new)) for prompt in request.rephrase_prompts)
    yield from (("portability", pair) for pair in request.portability)
    yield from (("locality", pair) for pair in request.locality)
    if request.ground_truth:
        yield "knows", (request.prompt, request.ground_truth)


def format_scores(scores) -> str:
    """The summary as a small table (percent)."""
    summary = scores["summary"]
    lines = [f"{metric:>15}  {summary[metric]:6.2f}" for metric in METRICS if metric in summary]
    return f"{'metric':>15}  {'score':>6}\n" + "\n".join(lines) + f"\n({len(scores['requests'])} requests)"
