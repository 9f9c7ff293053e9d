"""The KV-cache loops ``KnowLMForCausalLM`` runs off Ascend instead of MindFormers' own.

With knowlm's CPU kernels, every model call is one kernel over the whole model (``knowlm.models.kernels``): a
prompt runs ``Forward.CHUNK`` tokens per call into the KV cache (``prefill``: time and memory follow the prompt,
not seq_length, and no graph of MindFormers' is compiled), a decode step is one ``Forward`` call (``step``), and
greedy decoding runs up to ``DecodeSteps.STEPS`` steps per call, argmax included. ``KnowLMForCausalLM.forward``
routes MindFormers' own ``generate`` loop (sampling, logits processors) through ``prefill`` and ``step`` too.
Without the kernels, ``greedy_search`` makes the same prefill and decode-step graph calls as MindFormers, with less
Python per token (MindFormers' loop spends time per token on asynchronous dispatch, an eager reshape of the logits,
copies and per-step logging). Its tokens are MindFormers' (tested). Every other kind of call (sampling, logits
processors, dict outputs, model keyword arguments) goes to MindFormers' ``generate``.

A ``pick`` function (``greedy_search``'s last argument) chooses each row's next token from its logits instead of the
argmax, one decode step per model call, or, for a pick that takes the argmax wherever it allows it, the steps kernel
running ahead and its tokens checked (``_picked``): constrained decoding (``knowlm.constrain``) runs this loop.
"""
import copy
import time

import numpy as np
from mindspore import Tensor
from mindformers.core.context import is_legacy_model
from mindformers.generation.generation_config import GenerationConfig
from mindformers.generation.logits_process import LogitsProcessorList
from mindformers.generation.text_generator import get_valid_length_each_example

from knowlm.errors import KnowLMError
from knowlm.models.kernels import GEMV_MAX_ROWS

# How long one call of the decode-steps kernel may take, at most ~: see _decode.
CHUNK_SECONDS = 0.25


def greedy_config(model, generation_config, logits_processor, kwargs):
    """The generation config of a ``generate`` call that ``greedy_search`` computes as MindFormers would (greedy,
    no logits processor, token lists out, a KV-cache model), else None."""
    pet_config = getattr(model.config, "pet_config", None)
    if not (model.config.use_past and is_legacy_model()) or logits_processor or model._pre_set_phase \
            or getattr(model.config, "parallel_decoding_params", None) or "use_past" in kwargs \
            or getattr(pet_config, "pet_type", None) == "slora":
        return None
    config = copy.deepcopy(generation_config or GenerationConfig.from_model_config(model.config))
    if config.update(**kwargs) or config.do_sample or config.return_dict_in_generate \
            or model.get_logits_processor(config, 0, LogitsProcessorList()):
        return None
    if config.pad_token_id is None:
        config.pad_token_id = 0
    return config


def picked_config(model, generation_config, kwargs):
    """The generation config of a ``generate`` call with a ``pick`` function: its lengths, end and padding ids (the
    choice of tokens is the function's)."""
    if not model.config.use_past:
        raise KnowLMError("a pick function (constrained decoding) needs the model's KV cache; load it with "
                          "use_past=True")
    unknown = sorted(set(kwargs) - {"max_new_tokens", "max_length", "pad_token_id", "eos_token_id"})
    if unknown:
        raise KnowLMError(f"generate with a pick function: {', '.join(unknown)} not supported; the pick function "
                          "chooses the tokens")
    config = copy.deepcopy(generation_config or GenerationConfig.from_model_config(model.config))
    config.update(**kwargs)
    if config.pad_token_id is None:
        config.pad_token_id = 0
    return config


def _step_inputs(ids, valid, block_tables, slot_mapping):
    # The model's keyword inputs, as MindFormers' text generator builds them.
    return dict(input_ids=Tensor.from_numpy(np.ascontiguousarray(ids, np.int32)),
                batch_valid_length=Tensor.from_numpy(np.array([valid], np.int32)),
                block_tables=Tensor.from_numpy(block_tables), slot_mapping=Tensor.from_numpy(slot_mapping))


def _ints(array):
    return Tensor.from_numpy(np.ascontiguousarray(array, np.int32))


def prefill(forward, ids, valid, block_tables):
    """Logits (batch, vocab) of each row's last prompt token after running its first ``valid[row]`` tokens of
    ``ids`` (batch, width) through the ``Forward`` kernel into the KV cache, ``Forward.CHUNK`` tokens per call."""
    batch, chunk = ids.shape[0], forward.CHUNK
    logits = None
    for start in range(0, int(np.max(valid)), chunk):
        counts = np.clip(valid - start, 0, chunk)
        tokens = np.zeros((batch, chunk), np.int32)
        for row, count in enumerate(counts):
            tokens[row, :count] = ids[row, start:start + count]
        out = forward(_ints(tokens), _ints(np.full(batch, start)), _ints(counts), _ints(block_tables)).asnumpy()
        logits = out if logits is None else np.where((counts > 0)[:, None], out, logits)
    return logits


def step(forward, tokens, valid, block_tables):
    """Logits (batch, vocab) after one decode step of the ``Forward`` kernel: ``tokens`` (batch,) at positions
    ``valid - 1``. A row whose block table does not cover its position (a finished row of MindFormers' loop) is
    left alone (zero logits)."""
    block_size = forward.block_size
    positions = np.asarray(valid) - 1
    covered = np.array([0 <= p // block_size < len(table) and table[p // block_size] >= 0
                        for p, table in zip(positions, block_tables)], np.int32)
    return forward(_ints(np.reshape(tokens, (-1, 1))), _ints(positions), _ints(covered),
                   _ints(block_tables)).asnumpy()


def _logits(output, rows, starts):
    # (rows, vocab) on the host; a prefill that returns every position's logits is gathered at ``starts``.
    logits = (output[0] if isinstance(output, tuple) else output).asnumpy()
    logits = logits.reshape(-1, logits.shape[-1])
    return logits[starts] if logits.shape[0] > rows else logits


def greedy_search(model, input_ids, config, streamer=None, pick=None):
    """Greedy decoding of ``input_ids`` (batch, width; right-padded with ``config.pad_token_id``) with ``model``'s
    KV cache: one prefill graph call, then decode steps (``_decode``). Returns each row's ids, prompt included,
    as MindFormers' ``generate`` does (a row stops at an end-of-sequence token, ``max_new_tokens`` or
    ``max_length``, whichever comes first; ``max_length`` is capped at the model's ``seq_length``).

    ``pick(logits, remaining, finished)``: instead of the argmax, the next token of every row (a list) from the
    logits (batch, vocab) of the step, each row's count of tokens it may still take (this one included) and which
    rows have finished (their tokens are ignored)."""
    seq_length = model.config.seq_length
    batch = input_ids.shape[0]
    valid, prompt_length = get_valid_length_each_example(input_ids, config.pad_token_id)
    if config.max_new_tokens is not None:
        max_length = min(prompt_length + config.max_new_tokens, seq_length)
        limits = valid + config.max_new_tokens
    else:
        max_length = min(config.max_length, seq_length)
        limits = np.full(batch, max_length)
    if prompt_length > max_length:
        raise KnowLMError(f"max_length {max_length} is shorter than the {prompt_length}-token prompt; expected "
                          "max_length above the prompt's length (or max_new_tokens)")
    eos = config.eos_token_id if isinstance(config.eos_token_id, (list, tuple)) else [config.eos_token_id]
    origin_phase = model.phase
    model.set_train(False)
    if streamer is not None:
        streamer.put(input_ids)
    ids = model._pad_inputs_using_max_length(input_ids, config.pad_token_id)
    model._set_block_mgr(batch, seq_length)
    try:
        _decode(model, ids, valid, limits, max_length, eos, streamer, pick)
    finally:        # an interrupted call leaves no cache blocks taken
        model.block_mgr.clear_cache()
        model.set_train(origin_phase == "train")
    if streamer is not None:
        streamer.end()
    return [ids[i, :valid[i] + 1].astype(np.int32) for i in range(batch)]


def _decode(model, ids, valid, limits, max_length, eos, streamer, pick):
    # Fills ``ids`` (batch, seq_length) in place and advances ``valid`` (each row's length) as tokens come.
    rows = _Rows(model, ids, valid, np.minimum(limits, max_length), eos, streamer)
    logits = rows.prefill()
    # A batch's finished rows get no tokens from the steps kernel, where MindFormers' loop streams what their decode
    # step computed; more rows than GEMV_MAX_ROWS take MatMul, not the kernel's product, in the decode-step graph.
    steps = model.__dict__.get("decode_steps") if (streamer is None or len(ids) == 1) and len(ids) <= GEMV_MAX_ROWS \
        else None
    if pick is None:
        _greedy(rows, logits.argmax(-1).tolist(), steps)
    else:
        _picked(rows, logits, pick, steps if getattr(pick, "speculative", False) else None)


def _greedy(rows, tokens, steps):
    chunk = 1
    while not rows.take(tokens):
        if steps is None:
            tokens = rows.next_logits().argmax(-1).tolist()
            continue
        columns, counts, seconds = rows.run_steps(steps, chunk)
        for tokens in columns[:-1]:
            if rows.take(tokens):
                return
        tokens = columns[-1]
        # As many steps per call as take ~CHUNK_SECONDS: more would hold off Ctrl-C and a streamer that long (the
        # first call's time includes compiling the steps graph).
        chunk = int(np.clip(CHUNK_SECONDS * counts.max() / seconds, 1, steps.STEPS))


# Steps in a row where every row's pick was its argmax before ``_picked`` lets the steps kernel guess ahead, and the
# steps one guess runs: a refused token wastes the steps after it, a call costs ~1/40 of a step of its own (SmolLM2
# after the quickstart's LoRA refuses about one token in 80; bench/constrain.py measures the whole).
AGREED = 1
GUESS_STEPS = 8


def _picked(rows, logits, pick, steps):
    """Tokens chosen by ``pick`` from each step's logits. A pick that is greedy (``pick.speculative``; e.g. constrained
    decoding) chooses the argmax whenever the argmax is allowed: after ``AGREED`` steps in a row where it did for every
    row, the steps kernel runs ahead (``GUESS_STEPS`` argmax steps per call) and ``pick.accepts`` checks its tokens; a
    row takes them up to the first it refuses, and the next step is computed again with the pick. The tokens are those
    of one step per call; only the time differs (a refused guess costs the steps after it)."""
    agreed = 0
    while True:
        tokens = pick(logits, rows.ends - rows.valid, rows.finished)
        live = [i for i, done in enumerate(rows.finished) if not done]
        agreed = agreed + 1 if all(int(np.argmax(logits[i])) == tokens[i] for i in live) else 0
        if rows.take(tokens):
            return
        while steps is not None and agreed >= AGREED:
            columns, counts, _ = rows.run_steps(steps, GUESS_STEPS)
            refused = rows.take_checked(columns, counts, pick)
            if all(rows.finished):
                return
            if refused:          # that row's next token comes from one step with the pick
                agreed = 0
                break
        logits = rows.next_logits()


class _Rows:
    """The batch being decoded: its ids (batch, seq_length), lengths, end lengths, finished rows, and model calls."""

    def __init__(self, model, ids, valid, ends, eos, streamer):
        self.model, self.ids, self.valid, self.ends, self.eos, self.streamer = model, ids, valid, ends, eos, streamer
        self.finished = [False] * len(ids)
        self.forward = model.__dict__.get("forward_kernel")
        self.eos_ids = [token for token in eos if token is not None] or [-1]      # -1: no token stops a row

    def prefill(self):
        model, ids, valid = self.model, self.ids, self.valid
        block_tables, slot_mapping = model.block_mgr.assemble_pa_full_inputs(ids.shape[1], valid, self.finished)
        if self.forward is not None:
            return prefill(self.forward, ids, valid, block_tables)
        model.phase = "prefill"
        model.add_flags_custom(is_first_iteration=True)
        output = model(**_step_inputs(ids, valid, block_tables, slot_mapping))
        model.phase = "increment"
        model.add_flags_custom(is_first_iteration=False)
        return _logits(output, len(ids), valid - 1 + np.arange(len(ids)) * ids.shape[1])

    def next_logits(self):
        # One decode step of every unfinished row, from its last token.
        batch, valid = len(self.ids), self.valid
        last = self.ids[np.arange(batch), valid - 1]
        block_tables, slot_mapping = self.model.block_mgr.assemble_pa_inc_inputs(valid, self.finished)
        if self.forward is not None:
            return step(self.forward, last, valid, block_tables)
        return _logits(self.model(**_step_inputs(last.reshape(batch, 1), valid, block_tables, slot_mapping)),
                       batch, None)

    def run_steps(self, steps, chunk):
        # Up to ``chunk`` greedy steps of every unfinished row in one call of the steps kernel: the tokens as columns
        # (-1 past a row's count or end-of-sequence), each row's count and the call's time.
        counts = np.array([0 if done else min(chunk, end - length)
                           for done, end, length in zip(self.finished, self.ends, self.valid)], np.int32)
        last = self.ids[np.arange(len(self.ids)), self.valid - 1]
        start = time.perf_counter()
        decoded = steps(*(Tensor.from_numpy(np.ascontiguousarray(array, np.int32)) for array in (
            last, self.valid, counts, _reserve(self.model.block_mgr, counts), self.eos_ids)))
        return decoded.asnumpy().T[:counts.max()].tolist(), counts, time.perf_counter() - start

    def take(self, tokens):
        # Each unfinished row takes its token; it finishes at an end-of-sequence token or at its end length. True
        # once every row has finished.
        for i, token in enumerate(tokens):
            if not self.finished[i]:
                self._take_one(i, token)
        if self.streamer is not None:
            self.streamer.put(tokens[0] if len(tokens) == 1 else tokens)
        return all(self.finished)

    def take_checked(self, columns, counts, pick):
        # Each row takes the steps kernel's tokens that ``pick.accepts``, up to the first it refuses; the cache
        # positions it reserved past that are given back to its count (their blocks stay: later steps fill them).
        # True if some row refused one.
        refused = False
        for i, count in enumerate(counts):
            taken = 0
            for column in columns[:count]:
                if self.finished[i]:
                    break
                if not pick.accepts(i, column[i], self.ends[i] - self.valid[i]):
                    refused = True
                    break
                self._take_one(i, column[i])
                taken += 1
                if self.streamer is not None:
                    self.streamer.put(column[i])
            self.model.block_mgr.cache_engines[i].num_token -= int(count) - taken
        return refused

    def _take_one(self, i, token):
        self.ids[i, self.valid[i]] = token
        if token in self.eos or self.valid[i] + 1 >= self.ends[i]:
            self.finished[i] = True
        else:
            self.valid[i] += 1


def _reserve(block_mgr, counts):
    # Cache blocks for each row's next ``counts`` positions; the rows' block tables, padded with -1.
    tables = []
    for engine, count in zip(block_mgr.cache_engines, counts):
        if count:
            engine.prepare_cache(int(count))
        tables.append(engine.block_table + [-1] * (block_mgr.max_num_blocks_per_seq - len(engine.block_table)))
    return tables
