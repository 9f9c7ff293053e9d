"""Continuous batching: one thread owns the model and its KV cache and runs it one step at a time.

A step is one call of the whole-model kernel (``knowlm.models.kernels.Forward``) over every running request's new
tokens: the next chunk of a prompt that is still being read, or the one token a decoding request sampled last.
Requests join the running batch at step boundaries, as soon as a row and enough cache blocks are free (blocks for
the prompt and ``max_tokens`` are reserved on admission, so a running request never waits for memory) and leave it
the step they finish or are cancelled; beyond ``max_batch`` running requests, up to ``max_queue`` wait in order.

The kernels compute each row the same way whatever else is in its batch (``Products`` in csrc/decode.cpp), and a
prompt is read in chunks that end on multiples of the attention's 16-token runs, as ``knowlm generate`` reads it: a
greedy request gets the tokens ``knowlm generate`` gives its prompt, whatever else is running.

A request may carry a ``constraint`` (``knowlm.constrain.constraint.Constraint``: constrained extraction): its
logits are masked to the tokens that keep its answer valid and let it end within its ``max_tokens``, before its
sampler chooses.

Events reach a request through its ``emit`` callback, called on the engine thread: ``("text", str)`` as text is
released, then ``("done", finish_reason)`` (``stop``, ``length``, ``cancelled``) or ``("error", message)``.
"""
import itertools
import logging
import math
import threading
import time
from collections import deque
from dataclasses import dataclass, field

import numpy as np
from mindspore import Tensor

from knowlm.errors import KnowLMError
from knowlm.serve.sampling import Sampler, SamplingParams
from knowlm.serve.text import TextStream

log = logging.getLogger("knowlm")

# Prompt tokens read per step, across requests: bounds how long a step that admits a long prompt keeps the running
# requests waiting for their next token (one ``Forward.CHUNK``, which also bounds a step's scratch memory).
PREFILL_TOKENS = 256
# A prompt chunk that stops short of its prompt's end stops on a multiple of this: the attention kernel groups a
# sequence's consecutive tokens in runs of 16 (``Attention::kQueries``), and ``knowlm generate`` reads prompts in
# chunks of 256 from position 0, so both form the same runs.
RUN = 16


def check_sizes(max_batch, max_queue):
    """Refuse a batch of fewer than one row or a negative queue (``KnowLMError`` naming the flag)."""
    for flag, value, low in (("--max-batch", max_batch, 1), ("--max-queue", max_queue, 0)):
        if isinstance(value, bool) or not isinstance(value, int) or value < low:
            raise KnowLMError(f"{flag} {value}: expected an integer >= {low}")


class Busy(KnowLMError):
    """The server cannot take the request now (queue full, shutting down): HTTP 503."""


@dataclass(eq=False)
class Request:
    prompt: list
    params: SamplingParams
    emit: callable
    id: int = field(default_factory=itertools.count().__next__)
    tokens: list = field(default_factory=list)     # prompt, then the tokens generated
    output: list = field(default_factory=list)
    blocks: list = field(default_factory=list)
    computed: int = 0                              # tokens in the KV cache
    cancelled: bool = False
    arrived: float = field(default_factory=time.perf_counter)
    last_token_time: float = 0.0
    constraint: object = None                      # knowlm.constrain's Constraint, or None

    def __post_init__(self):
        self.tokens = list(self.prompt)
        self.sampler = Sampler(self.params)
        self.text = None        # TextStream, set by the engine


class Engine:
    """The batching loop over ``model`` (a ``KnowLMForCausalLM`` with knowlm's CPU kernels) and ``tokenizer``.

    ``observer``: optional, told of each step's batch size, each first token's and later token's latency and the
    queue (``knowlm.serve.metrics.Metrics``).
    """

    def __init__(self, model, tokenizer, max_batch=16, max_queue=64, observer=None):
        forward = model.__dict__.get("forward_kernel")
        if forward is None:
            raise KnowLMError("knowlm serve: this model does not run on knowlm's CPU kernels (no C++ compiler, "
                              "KNOWLM_CPU_KERNELS=0, a layer variant they do not compute, or an Ascend device); "
                              "expected a LLaMA-architecture model on CPU")
        check_sizes(max_batch, max_queue)
        self.forward, self.tokenizer, self.observer = forward, tokenizer, observer
        self.max_batch, self.max_queue = max_batch, max_queue
        config = model.config
        self.seq_length, self.block_size, self.vocab_size = config.seq_length, forward.block_size, config.vocab_size
        self.num_blocks = int(config.num_blocks)
        self.max_blocks = math.ceil(self.seq_length / self.block_size)
        eos = config.eos_token_id if isinstance(config.eos_token_id, (list, tuple)) else [config.eos_token_id]
        self.eos = {int(token) for token in eos if token is not None}
        self.free = list(range(self.num_blocks))
        self.waiting, self.running = deque(), []
        self.cond = threading.Condition()
        self.accepting, self.stopped = True, False
        self.tokens_generated = self.requests_done = 0
        self._warm_up()
        self.thread = threading.Thread(target=self._loop, name="knowlm-engine", daemon=True)
        self.thread.start()

    # ------------------------------------------------------------------------------------------- requests in

    @property
    def cache_tokens(self) -> int:
        return self.num_blocks * self.block_size

    def check(self, prompt, params):
        """Refuse (``KnowLMError``) a request that cannot fit the model's context or the cache."""
        if not prompt:
            raise KnowLMError("prompt: empty; expected at least one token")
        if len(prompt) + params.max_tokens > self.seq_length:
            raise KnowLMError(f"prompt is {len(prompt)} tokens; with max_tokens {params.max_tokens} that passes the "
                              f"model's context of {self.seq_length} tokens: lower max_tokens to at most "
                              f"{max(self.seq_length - len(prompt), 0)} or shorten the prompt")
        if self._blocks_for(prompt, params) > self.num_blocks:
            raise KnowLMError(f"prompt ({len(prompt)} tokens) and max_tokens {params.max_tokens} need more than the "
                              f"server's KV cache of {self.cache_tokens} tokens")

    def _blocks_for(self, prompt, params):
        return math.ceil((len(prompt) + params.max_tokens) / self.block_size)

    def submit(self, prompt, params, emit, constraint=None) -> Request:
        """Queue a request (``prompt``: token ids); its events go to ``emit``; ``constraint`` masks its tokens.
        ``Busy`` when the queue is full or the server is shutting down."""
        self.check(prompt, params)
        request = Request([int(token) for token in prompt], params, emit, constraint=constraint)
        request.text = TextStream(self.tokenizer, params.stop)
        with self.cond:
            if not self.accepting:
                raise Busy("the server is shutting down")
            # Requests that the next step admits (free rows) do not count as queued.
            if len(self.waiting) >= self.max_queue + max(0, self.max_batch - len(self.running)):
                raise Busy(f"{len(self.waiting)} requests are waiting (--max-queue {self.max_queue}); retry later")
            self.waiting.append(request)
            self._observe_queue()
            self.cond.notify()
        return request

    def cancel(self, request):
        """Stop ``request`` at the next step boundary (its client went away); its rows and blocks are freed."""
        with self.cond:
            request.cancelled = True
            self.cond.notify()

    # -------------------------------------------------------------------------------------------- shutdown

    def drain(self):
        """Admit nothing more (``Busy``); requests already in go on."""
        with self.cond:
            self.accepting = False

    def cancel_all(self):
        """Cancel every request running or waiting (each ends with ``("done", "cancelled")`` at the next step)."""
        with self.cond:
            for request in [*self.running, *self.waiting]:
                request.cancelled = True
            self.cond.notify_all()

    def shutdown(self, timeout):
        """Stop admitting, let the requests in finish for up to ``timeout`` seconds, cancel the rest, stop."""
        self.drain()
        deadline = time.monotonic() + timeout
        with self.cond:
            while (self.running or self.waiting) and time.monotonic() < deadline:
                self.cond.wait(min(0.1, max(deadline - time.monotonic(), 0)))
        self.cancel_all()
        with self.cond:
            self.stopped = True
            self.cond.notify_all()
        self.thread.join(timeout=30)

    # ---------------------------------------------------------------------------------------------- the loop

    def _warm_up(self):
        # Both shapes a step uses (one token per row; a prompt chunk per row), compiled now with no row computed.
        for width in (1, self.forward.CHUNK):
            self._call(np.zeros((self.max_batch, width), np.int32), np.zeros(self.max_batch, np.int32),
                       np.zeros(self.max_batch, np.int32), np.full((self.max_batch, self.max_blocks), -1, np.int32))

    def _call(self, tokens, starts, counts, tables):
        ints = lambda array: Tensor.from_numpy(np.ascontiguousarray(array, np.int32))    # noqa: E731
        return self.forward(ints(tokens), ints(starts), ints(counts), ints(tables)).asnumpy()

    def _loop(self):
        while True:
            with self.cond:
                while not (self.running or self.waiting or self.stopped):
                    self.cond.wait()
                if self.stopped:
                    for request in [*self.running, *self.waiting]:
                        self._finish(request, "cancelled")
                    return
                self._admit()
                batch = list(self.running)
            try:
                self._step(batch)
            except Exception as error:      # noqa: BLE001  (the model call failed: its rows' requests fail, not us)
                log.exception("knowlm serve: a model step failed")
                with self.cond:
                    for request in batch:
                        if request in self.running:
                            self._fail(request, error)

    def _admit(self):
        # Called holding the lock. First come, first served: a request too large for the free blocks waits, and
        # so does everything behind it.
        while self.waiting and len(self.running) < self.max_batch:
            request = self.waiting[0]
            if request.cancelled:
                self.waiting.popleft()
                self._finish(request, "cancelled")
                continue
            need = self._blocks_for(request.prompt, request.params)
            if need > len(self.free):
                break
            self.waiting.popleft()
            request.blocks, self.free = self.free[:need], self.free[need:]
            self.running.append(request)
        self._observe_queue()

    def _step(self, batch):
        rows, budget = [], PREFILL_TOKENS
        for request in batch:
            if request.cancelled:
                with self.cond:
                    self._finish(request, "cancelled")
                continue
            start, end = request.computed, len(request.tokens)
            if end - start > 1:             # a prompt still being read
                if budget < min(RUN, end - start):
                    continue
                if end - start > budget:
                    end = (start + budget) // RUN * RUN
                budget -= end - start
            rows.append((request, start, end))
        if not rows:
            return
        width = 1 if all(end - start == 1 for _, start, end in rows) else self.forward.CHUNK
        tokens = np.zeros((self.max_batch, width), np.int32)
        starts, counts = np.zeros(self.max_batch, np.int32), np.zeros(self.max_batch, np.int32)
        tables = np.full((self.max_batch, self.max_blocks), -1, np.int32)
        for row, (request, start, end) in enumerate(rows):
            tokens[row, :end - start] = request.tokens[start:end]
            starts[row], counts[row] = start, end - start
            tables[row, :len(request.blocks)] = request.blocks
        logits = self._call(tokens, starts, counts, tables)
        if self.observer:
            self.observer.step(len(rows))
        now = time.perf_counter()
        for row, (request, start, end) in enumerate(rows):
            request.computed = end
            if end == len(request.tokens):
                try:
                    self._next_token(request, logits[row], now)
                except Exception as error:      # noqa: BLE001  (sampling or detokenizing one request)
                    log.exception("knowlm serve: request %d failed", request.id)
                    with self.cond:
                        self._fail(request, error)

    def _next_token(self, request, logits, now):
        if request.constraint is not None:
            left = min(request.params.max_tokens - len(request.output), self.seq_length - len(request.tokens))
            logits = request.constraint.mask(logits, left)
        token = request.sampler(logits)
        if request.constraint is not None:
            request.constraint.advance(token)
        if self.observer:
            if request.output:
                self.observer.token(now - request.last_token_time)
            else:
                self.observer.first_token(now - request.arrived)
        request.last_token_time = now
        self.tokens_generated += 1
        if token in self.eos:
            return self._done(request, "stop")
        request.tokens.append(token)
        request.output.append(token)
        text, stopped = request.text.add(token)
        if text:
            request.emit(("text", text))
        if stopped:
            return self._done(request, "stop")
        if len(request.output) >= request.params.max_tokens or len(request.tokens) >= self.seq_length:
            return self._done(request, "length")

    def _done(self, request, reason):
        rest = request.text.finish()
        if rest:
            request.emit(("text", rest))
        with self.cond:
            self._finish(request, reason)

    def _finish(self, request, reason):
        # Called holding the lock: the request leaves the batch or the queue, its blocks go back.
        self._leave(request)
        self.requests_done += 1
        request.emit(("done", reason))

    def _fail(self, request, error):
        self._leave(request)
        request.emit(("error", f"{type(error).__name__}: {error}".splitlines()[0]))

    def _leave(self, request):
        if request in self.running:
            self.running.remove(request)
        elif request in self.waiting:
            self.waiting.remove(request)
        self.free.extend(request.blocks)
        request.blocks = []
        self._observe_queue()
        self.cond.notify_all()

    def _observe_queue(self):
        if self.observer:
            used = self.num_blocks - len(self.free)
            self.observer.queue(len(self.waiting), len(self.running), used / max(self.num_blocks, 1))
