"""``POST /v1/extract``: ``knowlm.ie.extract`` over the server's engine, so that a text and a schema give the
records ``knowlm extract`` writes for them (same prompts, greedy decoding, same parser and merge).

``extract`` is a plain generator that calls a ``generate`` function with a batch of prompt texts; here that function
runs on a worker thread and submits each prompt to the engine, where they join whatever else is running.
"""
import asyncio
import threading

from starlette.concurrency import run_in_threadpool

from knowlm.constrain.constraint import Constraint, vocabulary_of
from knowlm.errors import KnowLMError
from knowlm.generate import PromptTooLong, encode_prompts
from knowlm.ie.extract import extract
from knowlm.ie.files import check_schema, record_key, record_text
from knowlm.ie.prompts import default_family
from knowlm.serve.engine import Busy
from knowlm.serve.sampling import SamplingParams
from knowlm.serve.schemas import APIError


class _Cancelled(Exception):
    """The client went away: the extraction stops."""


async def run_extract(service, body, http) -> dict:
    try:
        records, schema = _checked(body)
    except KnowLMError as error:
        raise APIError(400, str(error)) from None
    gone = threading.Event()
    generate = _generator(service.engine, service.tokenizer, body.max_tokens, gone)
    options = dict(family=body.family or default_family(service.model_name), language=body.language,
                   template=body.template, fmt=body.format, split_num=body.split_num, chat=body.chat,
                   batch_size=service.engine.max_batch, constrained=body.constrained)
    work = asyncio.ensure_future(run_in_threadpool(
        lambda: list(extract(records, body.task, schema, generate, **options))))
    try:
        while not work.done():
            await asyncio.wait([work], timeout=0.25)
            if not work.done() and await http.is_disconnected():
                gone.set()
        results = work.result()
    except _Cancelled:
        raise APIError(499, "client disconnected") from None
    except Busy as error:
        raise APIError(503, str(error), code="overloaded") from None
    except KnowLMError as error:
        raise APIError(400, str(error)) from None
    finally:
        gone.set()
    return {"object": "extract", "model": service.model_name, "task": body.task, "results": results}


def _checked(body):
    """The records (``text`` as record 0) and the schema of an extract body, checked as ``knowlm extract`` checks
    its input file and schema file."""
    records = [{"id": 0, "text": body.text}] if body.text is not None else body.records
    keys = set()
    for index, record in enumerate(records):
        keys.add(record_key(record, f"records[{index}]"))
        record_text(record, f"records[{index}]")
    if len(keys) < len(records):
        raise KnowLMError("records: ids repeat; expected one id per record")
    return records, check_schema(body.schema_, body.task, "schema")


def _generator(engine, tokenizer, max_tokens, gone):
    """``generate(prompts, [grammars]) -> texts`` for ``extract``: greedy, ``max_tokens`` each, as ``knowlm
    extract`` (with answer grammars: as ``knowlm extract --constrained``)."""
    def generate(prompts, grammars=None):
        encoded = encode_prompts(tokenizer, prompts)
        constraints = [None] * len(prompts) if grammars is None else \
            [Constraint(grammar, vocabulary_of(tokenizer, engine.eos)) for grammar in grammars]
        params = SamplingParams(max_tokens=max_tokens, temperature=0)
        for index, ids in enumerate(encoded):
            if len(ids) + max_tokens > engine.seq_length:
                raise PromptTooLong(f"prompt {index + 1} is {len(ids)} tokens; with max_tokens {max_tokens} that "
                                    f"passes the model's context of {engine.seq_length} tokens", index)
        outcomes, requests = [_Outcome() for _ in encoded], []
        try:
            for ids, outcome, constraint in zip(encoded, outcomes, constraints):
                requests.append(engine.submit(ids, params, outcome, constraint))
            for outcome in outcomes:
                while not outcome.done.wait(0.25):
                    if gone.is_set():
                        raise _Cancelled()
                if outcome.error:
                    raise KnowLMError(f"the engine failed a prompt: {outcome.error}")
        finally:
            for request in requests:
                engine.cancel(request)        # a no-op for finished ones
        return ["".join(outcome.parts) for outcome in outcomes]
    return generate


class _Outcome:
    """One prompt's events, gathered on the engine thread."""

    def __init__(self):
        self.parts, self.error, self.done = [], None, threading.Event()

    def __call__(self, event):
        kind, value = event
        if kind == "text":
            self.parts.append(value)
            return
        if kind == "error" or value == "cancelled":
            self.error = value if kind == "error" else "cancelled (the server is shutting down)"
        self.done.set()
