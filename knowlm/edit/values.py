"""The value an edit writes: EasyEdit's ``compute_v`` (ROME) and ``compute_z`` (MEMIT).

A vector ``delta`` is added to the residual stream after block ``layer`` at the subject's last token of every
context template's prompt (and of "{subject} is a"), and optimised with Adam so that the model predicts the new
target after each prompt, while the "{subject} is a" next-token distribution stays close to the unedited one::

    loss = mean over prompts (mean over target tokens of -log p(target token))
           + kl_factor * KL(p("{subject} is a" ...) || p_before)
           + v_weight_decay * |delta| / |t0|^2

``t0`` is the unedited vector at the bare prompt's subject token: block ``layer``'s MLP output for ROME
(``at="mlp"``), the residual stream after the block for MEMIT (``at="layer"``). Adding ``delta`` to either is the
same operation on the stream. After each step ``|delta|`` is clamped to ``clamp_norm_factor * |t0|``; the loop
stops when the loss falls under 0.05 or after ``v_num_grad_steps`` evaluations (``v_num_grad_steps - 1`` steps).
The value is ``t0 + delta``. Gradients are MindSpore's (``trace.EditLoss``, GRAPH mode); Adam is ``torch.optim.Adam``'s
update with its defaults, on the host.
"""
from dataclasses import dataclass, replace

import mindspore as ms
import numpy as np

from knowlm.edit.context import Rows, subject_rows, target_ids
from knowlm.errors import KnowLMError

STOP_LOSS = 5e-2
PICKS = 32                                  # target positions per gradient call, a multiple of
BETAS, EPS = (0.9, 0.999), 1e-8             # torch.optim.Adam's defaults


@dataclass
class Value:
    target: np.ndarray          # t0 + delta, [hidden]
    t0: np.ndarray
    steps: int                  # Adam steps taken
    losses: tuple               # (first, last) loss
    nll: tuple                  # (first, last) target NLL
    rows: Rows                  # the rewriting rows (then "{subject} is a"): templates + prompt + target[:-1]
    keys: np.ndarray            # down_proj input at each row's subject token (rows of ``rows.lookups``)


def value_rows(tokenizer, request, templates, max_width, pad_id, where) -> tuple:
    """``(Rows, target ids, number of rewriting rows)``: ``template + prompt + target[:-1]`` for each template, then
    "{subject} is a"; each row's subject-last position."""
    target = target_ids(tokenizer, request.prompt, request.target_new, where)
    rows, lookups = subject_rows(tokenizer, request, templates, where)
    kl_rows, kl_lookups = subject_rows(tokenizer, replace(request, prompt=f"{request.subject} is a"), [""], where)
    rewriting = [row + target[:-1] for row in rows]
    return Rows.pack(rewriting + kl_rows, lookups + kl_lookups, max_width, pad_id, where), target, len(rows)


def optimise_value(cells, tokenizer, request, templates, layer, hparams, at, where) -> Value:
    config = cells.model.config
    rows, target, count = value_rows(tokenizer, request, templates, config.seq_length, config.pad_token_id, where)
    width = rows.tokens.shape[1]
    hidden, keys, outs = cells.probe((layer,), width)(ms.Tensor(rows.tokens))
    first = rows.lookups[0]
    t0 = (outs.asnumpy()[0, 0] if at == "mlp" else hidden.asnumpy()[0])[first].astype(np.float32)
    keys = keys.asnumpy()[0][np.arange(len(rows.lookups)), rows.lookups]

    mask = np.zeros(rows.tokens.shape + (1,), np.float32)
    mask[np.arange(len(rows.lookups)), rows.lookups] = 1
    picks, targets, weights = [], [], []
    for row in range(count):
        start = rows.lengths[row] - len(target)          # the prompt's last token predicts the first
        picks += [row * width + start + i for i in range(len(target))]
        targets += target
        weights += [1.0 / (len(target) * count)] * len(target)
    # Padded to a multiple of PICKS with weight 0: targets of other lengths keep the shape, so the compiled
    # gradient graph is reused instead of compiled again (seconds, and memory held for the process' life).
    padding = -len(picks) % PICKS
    picks, targets, weights = picks + [0] * padding, targets + [0] * padding, weights + [0.0] * padding
    kl_picks = [count * width + rows.lookups[count]]
    inputs = [hidden, ms.Tensor(mask), ms.Tensor(np.array(picks, np.int32)), ms.Tensor(np.array(targets, np.int32)),
              ms.Tensor(np.array(weights, np.float32)), ms.Tensor(np.array(kl_picks, np.int32))]
    loss_and_grad = cells.loss_and_grad(layer, width)

    delta = np.zeros_like(t0)
    moment, second = np.zeros_like(t0), np.zeros_like(t0)
    t0_sq = float(t0 @ t0)
    kl_init, kl_weight = np.zeros((1, config.vocab_size), np.float32), 0.0
    losses, nlls, step = [], [], 0
    for it in range(hparams.v_num_grad_steps):
        (loss, nll, kl_log_probs), grad = loss_and_grad(ms.Tensor(delta), *inputs, ms.Tensor(kl_init),
                                                        ms.Tensor(np.float32(kl_weight)))
        if it == 0:
            # The KL reference is this first distribution; against itself the KL term and its gradient are zero,
            # which is what evaluating it with weight 0 gave.
            kl_init, kl_weight = kl_log_probs.asnumpy(), hparams.kl_factor
        norm = float(np.linalg.norm(delta))
        losses.append(float(loss.asnumpy()) + hparams.v_weight_decay * norm / t0_sq)
        nlls.append(float(nll.asnumpy()))
        if not np.isfinite(losses[-1]):
            raise KnowLMError(f"{where}: the value's loss became {losses[-1]} at step {it}; nothing is edited")
        if losses[-1] < STOP_LOSS or it == hparams.v_num_grad_steps - 1:
            break
        grad = grad.asnumpy() + (hparams.v_weight_decay * delta / (norm * t0_sq) if norm else 0)
        step += 1
        delta = _adam(delta, grad, moment, second, step, hparams.v_lr)
        limit = hparams.clamp_norm_factor * np.sqrt(t0_sq)
        if np.linalg.norm(delta) > limit:
            delta = (delta * (limit / np.linalg.norm(delta))).astype(np.float32)
    return Value(t0 + delta, t0, step, (losses[0], losses[-1]), (nlls[0], nlls[-1]), rows, keys)


def _adam(param, grad, moment, second, step, lr):
    """One ``torch.optim.Adam`` step (no weight decay, no amsgrad), ``moment`` and ``second`` updated in place."""
    moment *= BETAS[0]
    moment += (1 - BETAS[0]) * grad
    second *= BETAS[1]
    second += (1 - BETAS[1]) * grad * grad
    corrected = moment / (1 - BETAS[0] ** step)
    denominator = np.sqrt(second) / np.sqrt(1 - BETAS[1] ** step) + EPS
    return (param - lr * corrected / denominator).astype(np.float32)
