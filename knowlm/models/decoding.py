"""The greedy KV-cache loop ``KnowLMForCausalLM.generate`` runs off Ascend instead of MindFormers' own.

MindFormers' loop spends Python time per generated token around the model (asynchronous graph dispatch, logits
reshaped by an eager op, the ids copied back from the device each step, per-step profiling and logging), a sizeable
part of a small model's decode step. ``greedy_search`` makes the same prefill call of the same compiled graph with
the same inputs, then, where knowlm's kernels compute every layer, decodes up to ``DecodeSteps.STEPS`` tokens per
call of one kernel (``knowlm.models.kernels.DecodeSteps``: the decode-step graph's functions, argmax included), else
one decode-step graph call per token, as MindFormers does. Its tokens are MindFormers' (tested). Every other kind of
call (sampling, logits processors, dict outputs, model keyword arguments) goes to MindFormers.
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


def _step_inputs(ids, valid, block_tables, slot_mapping):
    # The model's keyword inputs, as MindFormers' text generator builds them.
    return dict(input_ids=Tensor.from_numpy(np.ascontiguousarray(ids, np.int32)),
                batch_valid_length=Tensor.from_numpy(np.array([valid], np.int32)),
                block_tables=Tensor.from_numpy(block_tables), slot_mapping=Tensor.from_numpy(slot_mapping))


def _logits(output, rows, starts):
    # (rows, vocab) on the host; a prefill that returns every position's logits is gathered at ``starts``.
    logits = (output[0] if isinstance(output, tuple) else output).asnumpy()
    logits = logits.reshape(-1, logits.shape[-1])
    return logits[starts] if logits.shape[0] > rows else logits


def greedy_search(model, input_ids, config, streamer=None):
    """Greedy decoding of ``input_ids`` (batch, width; right-padded with ``config.pad_token_id``) with ``model``'s
    KV cache: one prefill graph call, then decode steps (``_decode``). Returns each row's ids, prompt included,
    as MindFormers' ``generate`` does (a row stops at an end-of-sequence token, ``max_new_tokens`` or
    ``max_length``, whichever comes first; ``max_length`` is capped at the model's ``seq_length``)."""
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
        _decode(model, ids, valid, limits, max_length, eos, streamer)
    finally:        # an interrupted call leaves no cache blocks taken
        model.block_mgr.clear_cache()
        model.set_train(origin_phase == "train")
    if streamer is not None:
        streamer.end()
    return [ids[i, :valid[i] + 1].astype(np.int32) for i in range(batch)]


def _decode(model, ids, valid, limits, max_length, eos, streamer):
    # Fills ``ids`` (batch, seq_length) in place and advances ``valid`` (each row's length) as tokens come.
    batch, seq_length = ids.shape
    finished = [False] * batch
    ends = np.minimum(limits, max_length)
    model.phase = "prefill"
    model.add_flags_custom(is_first_iteration=True)
    block_tables, slot_mapping = model.block_mgr.assemble_pa_full_inputs(seq_length, valid, finished)
    output = model(**_step_inputs(ids, valid, block_tables, slot_mapping))
    model.phase = "increment"
    model.add_flags_custom(is_first_iteration=False)
    rows = np.arange(batch)
    columns = [_logits(output, batch, valid - 1 + rows * seq_length).argmax(-1).tolist()]
    # A batch's finished rows get no tokens from the steps kernel, where MindFormers' loop streams what their decode
    # step computed; more rows than GEMV_MAX_ROWS take MatMul, not the kernel's product, in the decode-step graph.
    steps = model.__dict__.get("decode_steps") if (streamer is None or batch == 1) and batch <= GEMV_MAX_ROWS \
        else None
    eos_ids = [token for token in eos if token is not None] or [-1]      # -1: no token stops a row
    chunk = 1
    while True:
        for tokens in columns:
            if _take(tokens, ids, valid, ends, finished, eos, streamer):
                return
        last = ids[rows, valid - 1]
        if steps is None:
            block_tables, slot_mapping = model.block_mgr.assemble_pa_inc_inputs(valid, finished)
            output = model(**_step_inputs(last.reshape(batch, 1), valid, block_tables, slot_mapping))
            columns = [_logits(output, batch, None).argmax(-1).tolist()]
            continue
        counts = np.array([0 if done else min(chunk, end - length) for done, end, length in zip(finished, ends, valid)],
                          np.int32)
        start = time.perf_counter()
        decoded = steps(*(Tensor.from_numpy(np.ascontiguousarray(array, np.int32)) for array in (
            last, valid, counts, _reserve(model.block_mgr, counts), eos_ids)))
        columns = decoded.asnumpy().T[:counts.max()].tolist()
        # As many steps per call as take ~CHUNK_SECONDS: more would hold off Ctrl-C and a streamer that long (the
        # first call's time includes compiling the steps graph).
        chunk = int(np.clip(CHUNK_SECONDS * counts.max() / (time.perf_counter() - start), 1, steps.STEPS))


def _take(tokens, ids, valid, ends, finished, eos, streamer):
    # Each unfinished row takes its token; it finishes at an end-of-sequence token or at its end length. True once
    # every row has finished.
    for i, token in enumerate(tokens):
        if finished[i]:
            continue
        ids[i, valid[i]] = token
        if token in eos or valid[i] + 1 >= ends[i]:
            finished[i] = True
        else:
            valid[i] += 1
    if streamer is not None:
        streamer.put(tokens[0] if len(tokens) == 1 else tokens)
    return all(finished)


def _reserve(block_mgr, counts):
    # Cache blocks for each row's next ``counts`` positions; the rows' block tables, padded with -1.
    tables = []
    for engine, count in zip(block_mgr.cache_engines, counts):
        if count:
            engine.prepare_cache(int(count))
        tables.append(engine.block_table + [-1] * (block_mgr.max_num_blocks_per_seq - len(engine.block_table)))
    return tables
