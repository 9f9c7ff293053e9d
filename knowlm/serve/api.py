"""The HTTP API over an ``Engine``: OpenAI's ``/v1/models``, ``/v1/completions`` and ``/v1/chat/completions``
(server-sent events with ``stream``), knowlm's ``/v1/extract``, ``/health`` and ``/metrics``.

Every failure is OpenAI's error object with one line: 400 for a bad body (malformed JSON, wrong types, a prompt or
``max_tokens`` past the context), 401 for a missing or wrong API key, 404 for a model this server does not serve, 503
when the queue is full or the server is shutting down, 500 when the engine fails a request (the server goes on).
A client that goes away (its connection closes) has its request cancelled at the engine's next step.
"""
import asyncio
import hmac
import json
import time
import uuid

from fastapi import APIRouter, Depends, FastAPI, Request
from fastapi.responses import JSONResponse, Response, StreamingResponse
from pydantic import ValidationError
from starlette.exceptions import HTTPException

from knowlm.errors import KnowLMError
from knowlm.generate import encode_prompts
from knowlm.serve.engine import Busy
from knowlm.serve.extraction import run_extract
from knowlm.serve.sampling import SamplingParams
from knowlm.serve.schemas import APIError, ChatBody, CompletionBody, ExtractBody, validation_message
from knowlm.tokenizer.chat import apply_chat_template

# Seconds between checks that a client waiting for its answer is still connected.
DISCONNECT_POLL = 0.25
SHUT_DOWN = "the server shut down before the request finished"


class Channel:
    """A request's events, from the engine thread into the event loop."""

    def __init__(self):
        self.loop = asyncio.get_running_loop()
        self.queue = asyncio.Queue()

    def __call__(self, event):
        try:
            self.loop.call_soon_threadsafe(self.queue.put_nowait, event)
        except RuntimeError:        # the loop has closed: nobody is listening any more
            pass


class Service:
    """What the routes share: the engine and its tokenizer, the served model's name, the metrics, the API key."""

    def __init__(self, engine, tokenizer, model_name, metrics, api_key=None, health=None):
        self.engine, self.tokenizer, self.model_name = engine, tokenizer, model_name
        self.metrics, self.api_key, self.health = metrics, api_key, health or (lambda: {})
        self.created = int(time.time())

    def check_key(self, request: Request):
        if self.api_key is None:
            return
        given = request.headers.get("authorization", "")
        if not hmac.compare_digest(given.encode(), f"Bearer {self.api_key}".encode()):
            raise APIError(401, "invalid API key: expected the header 'Authorization: Bearer <key>' with the "
                                "server's --api-key", code="invalid_api_key")

    def check_model(self, name):
        if name is not None and name != self.model_name:
            raise APIError(404, f"model {name!r}: not served here; this server serves {self.model_name!r}",
                           param="model", code="model_not_found")

    def sampling(self, body, prompt, max_tokens):
        """``SamplingParams`` of ``body`` for ``prompt`` (ids); ``max_tokens`` None: the rest of the context."""
        if max_tokens is None:
            max_tokens = self.engine.seq_length - len(prompt)
            if max_tokens < 1:
                raise APIError(400, f"prompt is {len(prompt)} tokens: it fills the model's context of "
                                    f"{self.engine.seq_length} tokens", param="messages")
        seed = None if body.seed is None else body.seed % 2 ** 64
        return SamplingParams(max_tokens=max_tokens, temperature=body.temperature, top_p=body.top_p,
                              top_k=body.top_k, seed=seed, stop=body.stops(), presence_penalty=body.presence_penalty,
                              frequency_penalty=body.frequency_penalty)

    def start(self, prompt, params):
        channel = Channel()
        try:
            request = self.engine.submit(prompt, params, channel)
            self.metrics.prompt_tokens.inc(len(prompt))
            return request, channel
        except Busy as error:
            raise APIError(503, str(error), code="overloaded") from None
        except KnowLMError as error:
            raise APIError(400, str(error), param="max_tokens") from None

    async def events(self, http, request, channel):
        """The request's events; cancels it if its client disconnects or this coroutine is cancelled."""
        finished = False
        try:
            while True:
                try:
                    event = await asyncio.wait_for(channel.queue.get(), DISCONNECT_POLL)
                except TimeoutError:
                    if await http.is_disconnected():
                        return
                    continue
                finished = event[0] != "text"
                yield event
                if finished:
                    return
        finally:
            if not finished:
                self.engine.cancel(request)

    async def answer(self, http, prompt, params):
        """``(text, finish_reason, completion tokens)`` of a whole request."""
        request, channel = self.start(prompt, params)
        parts = []
        async for kind, value in self.events(http, request, channel):
            if kind == "text":
                parts.append(value)
            elif kind == "error":
                raise APIError(500, f"the request failed in the engine: {value}")
            elif value == "cancelled":
                raise APIError(503, SHUT_DOWN)
            else:
                return "".join(parts), value, len(request.output)
        raise APIError(499, "client disconnected")

    def stream(self, http, prompt, params, chunk, include_usage, first=None):
        """A server-sent-events response: ``chunk(text, finish_reason)`` per piece of text, then the usage (if
        asked for) and ``[DONE]``; a failure after the first byte is an error event."""
        request, channel = self.start(prompt, params)

        async def body():
            if first is not None:
                yield _sse(first)
            async for kind, value in self.events(http, request, channel):
                if kind == "text":
                    yield _sse(chunk(value, None))
                elif kind == "error":
                    yield _sse(APIError(500, f"the request failed in the engine: {value}").body())
                elif value == "cancelled":
                    yield _sse(APIError(503, SHUT_DOWN).body())
                else:
                    yield _sse(chunk("", value))
                if kind != "text":
                    if include_usage:
                        yield _sse({**chunk("", None), "choices": [], "usage": _usage(prompt, request.output)})
                    yield "data: [DONE]\n\n"
        return StreamingResponse(body(), media_type="text/event-stream", headers={"Cache-Control": "no-cache"})


def _sse(payload) -> str:
    return f"data: {json.dumps(payload, ensure_ascii=False)}\n\n"


def _usage(prompt, output) -> dict:
    return {"prompt_tokens": len(prompt), "completion_tokens": len(output),
            "total_tokens": len(prompt) + len(output)}


def create_app(service: Service):
    app = FastAPI(title="knowlm", docs_url=None, redoc_url=None, openapi_url=None)
    v1 = APIRouter(prefix="/v1", dependencies=[Depends(service.check_key)])

    @app.exception_handler(APIError)
    async def api_error(_, error: APIError):
        return JSONResponse(error.body(), status_code=error.status)

    @app.exception_handler(HTTPException)
    async def http_error(_, error: HTTPException):       # no such route, method not allowed
        return JSONResponse(APIError(error.status_code, f"{error.detail}").body(), status_code=error.status_code)

    @app.exception_handler(Exception)
    async def failure(_, error: Exception):
        return JSONResponse(APIError(500, f"{type(error).__name__}: {error}".splitlines()[0]).body(),
                            status_code=500)

    @app.get("/health")
    async def health():
        state = "ok" if service.engine.accepting else "shutting down"
        return {"status": state, "model": service.model_name, **service.health()}

    @app.get("/metrics")
    async def metrics():
        return Response(service.metrics.text(), media_type=service.metrics.content_type)

    @v1.get("/models")
    async def models():
        return {"object": "list", "data": [{"id": service.model_name, "object": "model",
                                            "created": service.created, "owned_by": "knowlm"}]}

    @v1.post("/completions")
    async def completions(http: Request):
        body = await _body(http, CompletionBody)
        service.check_model(body.model)
        prompt = _prompt_ids(service, body.prompt)
        params = service.sampling(body, prompt, body.max_tokens)
        head = {"id": f"cmpl-{uuid.uuid4().hex}", "object": "text_completion", "created": int(time.time()),
                "model": service.model_name}
        if body.stream:
            def chunk(text, reason):
                return {**head, "choices": [{"index": 0, "text": text, "logprobs": None, "finish_reason": reason}]}
            return service.stream(http, prompt, params, chunk, _include_usage(body))
        text, reason, generated = await service.answer(http, prompt, params)
        return {**head, "choices": [{"index": 0, "text": text, "logprobs": None, "finish_reason": reason}],
                "usage": _usage(prompt, range(generated))}

    @v1.post("/chat/completions")
    async def chat_completions(http: Request):
        body = await _body(http, ChatBody)
        service.check_model(body.model)
        try:
            prompt = service.tokenizer.encode(apply_chat_template(service.tokenizer, body.as_template_messages()),
                                              add_special_tokens=False)
        except KnowLMError as error:
            raise APIError(400, str(error), param="messages") from None
        params = service.sampling(body, prompt, body.max_completion_tokens or body.max_tokens)
        head = {"id": f"chatcmpl-{uuid.uuid4().hex}", "object": "chat.completion", "created": int(time.time()),
                "model": service.model_name}
        if body.stream:
            def chunk(text, reason):
                return {**head, "object": "chat.completion.chunk",
                        "choices": [{"index": 0, "delta": {"content": text} if text else {}, "logprobs": None,
                                     "finish_reason": reason}]}
            first = {**head, "object": "chat.completion.chunk",
                     "choices": [{"index": 0, "delta": {"role": "assistant", "content": ""}, "logprobs": None,
                                  "finish_reason": None}]}
            return service.stream(http, prompt, params, chunk, _include_usage(body), first)
        text, reason, generated = await service.answer(http, prompt, params)
        return {**head, "choices": [{"index": 0, "message": {"role": "assistant", "content": text},
                                     "logprobs": None, "finish_reason": reason}],
                "usage": _usage(prompt, range(generated))}

    @v1.post("/extract")
    async def extract(http: Request):
        body = await _body(http, ExtractBody)
        service.check_model(body.model)
        return await run_extract(service, body, http)

    app.include_router(v1)
    return CountRequests(app, service.metrics)


async def _body(http, schema):
    """The request body as ``schema``: JSON whatever the Content-Type says (as OpenAI's and llama.cpp's servers
    read it), checked, or a 400 with the first problem."""
    try:
        return schema.model_validate_json(await http.body())
    except ValidationError as error:
        message, param = validation_message(error.errors())
        raise APIError(400, message, param=param) from None


class CountRequests:
    """ASGI middleware: every HTTP answer counted by endpoint and status, and timed to its last byte (a streamed
    answer included)."""

    ENDPOINTS = ("/v1/completions", "/v1/chat/completions", "/v1/extract", "/v1/models", "/health", "/metrics")

    def __init__(self, app, metrics):
        self.app, self.metrics = app, metrics

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        started, status = time.perf_counter(), [500]

        async def sending(message):
            if message["type"] == "http.response.start":
                status[0] = message["status"]
            await send(message)
        try:
            await self.app(scope, receive, sending)
        finally:
            endpoint = scope["path"] if scope["path"] in self.ENDPOINTS else "other"
            self.metrics.requests.labels(endpoint, str(status[0])).inc()
            self.metrics.latency.labels(endpoint).observe(time.perf_counter() - started)


def _include_usage(body) -> bool:
    return bool(body.stream_options and body.stream_options.include_usage)


def _prompt_ids(service, prompt) -> list:
    """The ids of a completion's ``prompt``: text encoded as ``knowlm generate`` encodes a raw prompt, or ids."""
    if isinstance(prompt, list) and len(prompt) == 1 and isinstance(prompt[0], str):
        prompt = prompt[0]
    if isinstance(prompt, str):
        return encode_prompts(service.tokenizer, [prompt])[0]
    if not prompt or isinstance(prompt[0], str):
        raise APIError(400, "prompt: expected one string or a non-empty list of token ids (one prompt per request)",
                       param="prompt")
    vocab = service.engine.vocab_size
    if any(not 0 <= token < vocab for token in prompt):
        raise APIError(400, f"prompt: token ids must be in [0, {vocab})", param="prompt")
    return list(prompt)
