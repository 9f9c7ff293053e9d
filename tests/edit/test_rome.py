"""ROME (``knowlm.edit.rome``, ``values``, ``trace``) against a PyTorch implementation written here from EasyEdit's
formulas (``easyeditor/models/rome``: compute_u, compute_v, rome_main), run on the same weights (the tiny
reference LLaMA in transformers and its knowlm conversion), the same token rows and templates: the same value
vector, the same rank-one delta."""
import dataclasses

import mindspore as ms
import numpy as np
import torch

from knowlm.edit.context import subject_rows
from knowlm.edit.editor import Editor
from knowlm.edit.hparams import EditHParams
from knowlm.edit.memit import memit_delta
from knowlm.edit.requests import check_request
from knowlm.edit.rome import rome_delta, rome_update
from knowlm.edit.stats import second_moments
from knowlm.edit.trace import Cells, rewritten_weight
from knowlm.edit.values import value_rows

REQUEST = check_request({"prompt": "The capital of France is", "subject": "France", "target_new": "the moon"},
                        "request 0")
TEMPLATES = ["", "I think that. ", "Because of the weather. "]
HPARAMS = EditHParams(layers=(0,), v_num_grad_steps=8, v_lr=0.5, v_weight_decay=1e-3, clamp_norm_factor=4.0,
                      kl_factor=0.0625)


def easyedit_compute_v(hf, rows, lookups, count, target, layer, hp):
    """EasyEdit's ``compute_v`` (and ``compute_u`` without C) on a transformers LLaMA: rows right-padded, delta
    added to the MLP output at each row's lookup, Adam, KL at the last row, weight decay |d|/|t0|^2, clamp."""
    width = max(map(len, rows))
    tokens = torch.tensor([row + [0] * (width - len(row)) for row in rows])
    mask = torch.tensor([[1] * len(row) + [0] * (width - len(row)) for row in rows])
    targets = torch.full((count, width), -100)
    for i in range(count):
        targets[i, len(rows[i]) - len(target):len(rows[i])] = torch.tensor(target)
    mlp = hf.model.layers[layer].mlp
    delta = torch.zeros(hf.config.hidden_size, requires_grad=True)
    state = {}

    def edit_output(module, inputs, output):
        if "t0" not in state:
            state["t0"] = output[0, lookups[0]].detach().clone()
            state["keys"] = torch.stack([state["down_in"][i, idx] for i, idx in enumerate(lookups)])
        for i, idx in enumerate(lookups):
            output[i, idx, :] += delta
        return output

    def capture_input(module, inputs):
        state["down_in"] = inputs[0].detach()

    handles = [mlp.register_forward_hook(edit_output), mlp.down_proj.register_forward_pre_hook(capture_input)]
    optimizer = torch.optim.Adam([delta], lr=hp.v_lr)
    kl_init = None
    try:
        for it in range(hp.v_num_grad_steps):
            optimizer.zero_grad()
            logits = hf(input_ids=tokens, attention_mask=mask).logits
            kl_log_probs = torch.log_softmax(logits[count, lookups[count]][None], dim=1)
            if kl_init is None:
                kl_init = kl_log_probs.detach().clone()
            log_probs = torch.log_softmax(logits, dim=2)
            picked = torch.gather(log_probs[:count], 2, torch.where(targets != -100, targets, 0)[..., None])[..., 0]
            nll = -(picked * (targets != -100).float()).sum(1) / len(target)
            kl = hp.kl_factor * torch.nn.functional.kl_div(kl_init, kl_log_probs, log_target=True,
                                                           reduction="batchmean")
            decay = hp.v_weight_decay * (torch.norm(delta) / torch.norm(state["t0"]) ** 2)
            loss = nll.mean() + kl + decay
            if loss < 5e-2 or it == hp.v_num_grad_steps - 1:
                break
            loss.backward()
            optimizer.step()
            max_norm = hp.clamp_norm_factor * state["t0"].norm()
            with torch.no_grad():
                if delta.norm() > max_norm:
                    delta[...] = delta * max_norm / delta.norm()
    finally:
        for handle in handles:
            handle.remove()
    return state["t0"] + delta.detach(), state["keys"]


def easyedit_rome_delta(weight, keys_mean, key_star, target, inverse=None):
    """compute_u (normalised, with C^-1 when given) and rome_main's ``upd_matrix`` transposed to ``weight``."""
    u = keys_mean if inverse is None else (inverse @ keys_mean[:, None])[:, 0]
    u = u / u.norm()
    right = (target - weight @ key_star) / torch.dot(key_star, u)
    return (u[:, None] @ right[None, :]).T


def test_value_and_rank_one_delta_equal_easyedit_in_pytorch_on_the_same_weights(tiny, hf_model):
    model, tok = tiny
    rows, target, count = value_rows(tok, REQUEST, TEMPLATES, 64, 0, "request 0")
    real = [list(row[:length]) for row, length in zip(rows.tokens, rows.lengths)]
    value_ref, keys_ref = easyedit_compute_v(hf_model, real, rows.lookups, count, target, 0, HPARAMS)
    layer, delta, value = rome_update(Cells(model), tok, REQUEST, TEMPLATES, HPARAMS)
    assert value.steps == HPARAMS.v_num_grad_steps - 1          # ran to the end: a full Adam trajectory compared
    np.testing.assert_allclose(value.keys, keys_ref.numpy(), rtol=1e-4, atol=1e-5)
    assert np.linalg.norm(value.target - value_ref.numpy()) <= 1e-3 * np.linalg.norm(value_ref.numpy())
    weight = hf_model.model.layers[0].mlp.down_proj.weight.detach().double()
    expected = easyedit_rome_delta(weight, keys_ref[:count].double().mean(0), keys_ref[0].double(),
                                   value_ref.double()).numpy()
    assert layer == 0 and delta.shape == tuple(weight.shape)
    assert np.linalg.norm(delta - expected) <= 1e-3 * np.linalg.norm(expected)


def test_rome_delta_with_inverse_second_moment_equals_easyedit(tiny):
    rng = np.random.default_rng(0)
    weight, keys = rng.normal(size=(64, 176)), rng.normal(size=(500, 176))
    moment = keys.T @ keys / len(keys)
    key_mean, key_star, value = keys[:5].mean(0), keys[0], rng.normal(size=64)
    expected = easyedit_rome_delta(*(torch.tensor(a) for a in (weight, key_mean, key_star, value)),
                                   inverse=torch.inverse(torch.tensor(moment)))
    got = rome_delta(weight, key_mean, key_star, value, np.linalg.inv(moment))
    np.testing.assert_allclose(got, expected.numpy(), rtol=1e-6, atol=1e-9)
    # W_new k* = v*: the edited layer maps the fact's key to the optimised value
    np.testing.assert_allclose((weight + got) @ key_star, value, rtol=1e-6, atol=1e-9)


def test_memit_delta_equals_easyedit_formula():
    rng = np.random.default_rng(1)
    keys, residuals = rng.normal(size=(176, 3)), rng.normal(size=(64, 3))
    samples = rng.normal(size=(400, 176))
    moment = samples.T @ samples / len(samples)
    k, r, c = (torch.tensor(a) for a in (keys, residuals, moment))
    adj_k = torch.linalg.solve(15000 * c + k @ k.T, k)
    expected = (r / 2) @ adj_k.T
    np.testing.assert_allclose(memit_delta(keys, residuals, moment, 15000, 2), expected.numpy(), rtol=1e-6)


def test_subject_position_is_the_last_subject_token_in_every_template(tiny):
    _, tok = tiny
    rows, lookups = subject_rows(tok, REQUEST, TEMPLATES, "request 0")
    for template, row, last in zip(TEMPLATES, rows, lookups):
        assert row[:last + 1] == list(tok(template + "The capital of France")["input_ids"])


def test_edits_are_deterministic_and_restored_after_each(tiny):
    model, tok = tiny
    hparams = dataclasses.replace(HPARAMS, context_template_length_params=((5, 5),), v_num_grad_steps=3)
    original = rewritten_weight(model, 0).asnumpy().copy()
    runs = []
    for _ in range(2):
        editor = Editor(model, tok, "rome", hparams)
        editor.apply([REQUEST])
        runs.append(editor.weights())
        editor.restore({rewritten_weight(model, 0).name: original})
    name = rewritten_weight(model, 0).name
    assert not np.array_equal(runs[0][name], original)
    np.testing.assert_array_equal(runs[0][name], runs[1][name])
    editor = Editor(model, tok, "rome", hparams)
    scores = editor.each([REQUEST, REQUEST])
    assert len(scores["requests"]) == 2 and scores["requests"][0] == scores["requests"][1]
    np.testing.assert_array_equal(rewritten_weight(model, 0).asnumpy(), original)
    assert editor.templates() == Editor(model, tok, "rome", hparams).templates()
    assert ms.get_context("mode") == ms.GRAPH_MODE


def test_mom2_adjustment_turns_the_key_direction_by_the_corpus_second_moment(tiny):
    model, tok = tiny
    hparams = dataclasses.replace(HPARAMS, v_num_grad_steps=2, mom2_adjustment=True, mom2_n_samples=8, stats_width=64)
    cells = Cells(model)
    moments = second_moments(cells, tok, (0,), 8, 64)
    _, plain, value = rome_update(cells, tok, REQUEST, TEMPLATES, dataclasses.replace(hparams, mom2_adjustment=False))
    _, adjusted, _ = rome_update(cells, tok, REQUEST, TEMPLATES, hparams, moments)
    direction = np.linalg.solve(moments[0], value.keys[:len(TEMPLATES)].mean(0))
    u = adjusted[np.abs(adjusted).sum(1).argmax()]            # every row of v u^T is a multiple of u
    assert abs(abs(u @ direction) / np.linalg.norm(u) / np.linalg.norm(direction) - 1) < 1e-6
    assert not np.allclose(adjusted, plain)
