"""``serve``: load a model, bind the port, answer until SIGTERM or Ctrl-C, then shut down within a deadline.

On SIGTERM (or SIGINT) the server stops admitting (new connections are refused, new requests on open connections get
503), lets the requests in flight finish for up to ``shutdown_timeout`` seconds, cancels what is left (a streamed
answer ends with an error event) and returns, so that ``knowlm serve`` exits 0.
"""
import math
import os
import hashlib
import socket
import threading
import time
from pathlib import Path

import uvicorn

from knowlm.errors import KnowLMError
from knowlm.models.load import load_model
from knowlm.models.packaged import PACKAGED_MODELS
from knowlm.serve.api import Service, create_app
from knowlm.serve.engine import Engine, check_sizes
from knowlm.serve.metrics import Metrics

# Default KV cache: one context per batch row, at most this many tokens in all (46 KB a token for SmolLM2, 1.6 MB
# for KnowLM-13B: pass --kv-tokens for a large model).
DEFAULT_CACHE_TOKENS = 16384


def serve(model, host="127.0.0.1", port=8000, max_batch=16, max_queue=64, api_key=None, lora=None, ctx_size=None,
          kv_tokens=None, model_name=None, shutdown_timeout=30.0, echo=print):
    """Serve ``model`` (anything ``knowlm.models.load.load_model`` takes) until a signal; ``port`` 0 takes a free
    one (printed)."""
    _check_options(port, ctx_size, kv_tokens, shutdown_timeout)
    check_sizes(max_batch, max_queue)
    sock = _bind(host, port)      # first: a port in use fails before a model is loaded
    began = time.perf_counter()
    network, tokenizer, name = _load(model, lora, max_batch, ctx_size, kv_tokens)
    metrics = Metrics()
    engine = Engine(network, tokenizer, max_batch=max_batch, max_queue=max_queue, observer=metrics)
    weights = sum(p.nbytes for p in network.get_parameters() if "cache" not in p.name)
    cache = sum(p.nbytes for p in network.get_parameters() if "cache" in p.name)
    service = Service(engine, tokenizer, model_name or name, metrics, api_key,
                      health=lambda: {"running": len(engine.running), "waiting": len(engine.waiting),
                                      "context": engine.seq_length, "kv_cache_tokens": engine.cache_tokens,
                                      "weights_bytes": weights, "kv_cache_bytes": cache, "rss_bytes": _rss()})
    server = _Server(uvicorn.Config(create_app(service), log_level="warning", lifespan="off",
                                    timeout_graceful_shutdown=shutdown_timeout + 5), engine, shutdown_timeout)
    bound_host, bound_port = sock.getsockname()[:2]

    def started():      # printed once uvicorn listens: a script may read the line and connect at once
        echo(f"knowlm serve: {service.model_name} on http://{bound_host}:{bound_port}/v1 (context "
             f"{engine.seq_length}, max batch {max_batch}, queue {max_queue}, KV cache {engine.cache_tokens} tokens = "
             f"{cache / 2**20:.0f} MiB, weights {weights / 2**20:.0f} MiB; ready in "
             f"{time.perf_counter() - began:.1f} s)" + ("" if api_key else "; no API key"))
    threading.Thread(target=_when_started, args=(server, started), daemon=True).start()
    try:
        server.run(sockets=[sock])
    finally:
        engine.shutdown(0 if server.force_exit else shutdown_timeout)
    echo(f"knowlm serve: stopped; {engine.requests_done} requests finished, {engine.tokens_generated} tokens "
         "generated")


class _Server(uvicorn.Server):
    """uvicorn's server that, at the signal, tells the engine to stop admitting and to cancel what is still running
    ``deadline`` seconds later (those answers end with an error, and their connections close, before uvicorn's own
    graceful timeout, a few seconds later, would cut them), and having shut down exits normally (uvicorn re-raises
    the signal it caught, which would end the process with it)."""

    def __init__(self, config, engine, deadline):
        super().__init__(config)
        self.engine, self.deadline = engine, deadline

    def handle_exit(self, sig, frame):
        if not self.should_exit:
            self.engine.drain()
            timer = threading.Timer(self.deadline, self.engine.cancel_all)
            timer.daemon = True
            timer.start()
        super().handle_exit(sig, frame)
        self._captured_signals.clear()


def _when_started(server, call):
    while not server.started and not server.should_exit:
        time.sleep(0.02)
    if server.started:
        call()


def _check_options(port, ctx_size, kv_tokens, shutdown_timeout):
    checks = [("--port", port, 0, 65535), ("--ctx-size", ctx_size, 2, None), ("--kv-tokens", kv_tokens, 1, None)]
    for flag, value, low, high in checks:
        if value is None:
            continue
        if isinstance(value, bool) or not isinstance(value, int) or value < low or (high and value > high):
            raise KnowLMError(f"{flag} {value}: expected an integer >= {low}" + (f" and <= {high}" if high else ""))
    if not isinstance(shutdown_timeout, (int, float)) or shutdown_timeout < 0:
        raise KnowLMError(f"--shutdown-timeout {shutdown_timeout}: expected a number of seconds >= 0")


def _bind(host, port):
    try:
        info = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)[0]
    except socket.gaierror as error:
        raise KnowLMError(f"--host {host}: {error.strerror}") from None
    sock = socket.socket(info[0], socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind(info[4])
    except OSError as error:
        sock.close()
        raise KnowLMError(f"--port {port}: cannot listen on {host}:{port} ({error.strerror})") from None
    sock.set_inheritable(True)
    return sock


def _load(model, lora, max_batch, ctx_size, kv_tokens):
    """``(network, tokenizer, served name)``, the KV cache sized ``kv_tokens`` (default: a context per row, at
    most ``DEFAULT_CACHE_TOKENS``, at least one context)."""
    if lora is not None:
        model = _merged(model, lora)
    sizes = {"seq_length": ctx_size} if ctx_size else {}
    if ctx_size is None and model in PACKAGED_MODELS:
        ctx_size = PACKAGED_MODELS[model].seq_length
    network, tokenizer = load_model(model, use_past=True, batch_size=max_batch, **sizes,
                                    **_cache_blocks(model, ctx_size, kv_tokens, max_batch))
    return network, tokenizer, Path(str(model)).name if Path(str(model)).exists() else str(model)


def _cache_blocks(model, ctx_size, kv_tokens, max_batch) -> dict:
    from knowlm.checkpoints.model_dir import load_config
    path = Path(str(model))
    config = load_config(path) if path.is_dir() else None
    block_size = getattr(config, "block_size", None) or 16
    ctx_size = ctx_size or getattr(config, "seq_length", None)
    if ctx_size is None:        # a yaml or pipeline name: its own num_blocks, unless given
        return {} if kv_tokens is None else {"num_blocks": math.ceil(kv_tokens / block_size)}
    tokens = kv_tokens or max(ctx_size, min(ctx_size * max_batch, DEFAULT_CACHE_TOKENS))
    return {"num_blocks": math.ceil(max(tokens, ctx_size) / block_size)}


def _merged(model, lora):
    """A model directory with adapter ``lora`` merged in (``knowlm merge-lora``), cached by both's contents."""
    from knowlm.checkpoints.lora import merge_lora
    from knowlm.files import cache_dir
    from knowlm.models.packaged import packaged_model_dir
    base = packaged_model_dir(model) if model in PACKAGED_MODELS else Path(model)
    if not base.is_dir():
        raise KnowLMError(f"--lora needs --model to be a model directory or a packaged model, got {model!r}")
    if not Path(lora).is_dir():
        raise KnowLMError(f"--lora {lora}: expected an adapter directory (adapter_config.json and weights)")
    output = cache_dir() / "served-lora" / _fingerprint(base, Path(lora))
    if not output.is_dir():
        merge_lora(base, lora, output, echo=print)
    return output


def _fingerprint(*folders) -> str:
    # The files' names, sizes and modification times: a changed base or adapter is merged again.
    digest = hashlib.sha256()
    for folder in folders:
        for path in sorted(folder.resolve().iterdir()):
            if path.is_file():
                stat = path.stat()
                digest.update(f"{path}:{stat.st_size}:{stat.st_mtime_ns};".encode())
    return digest.hexdigest()[:20]


def _rss() -> int:
    """This process's resident memory in bytes (0 where /proc is not there)."""
    try:
        with open(f"/proc/{os.getpid()}/statm") as statm:
            return int(statm.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except (OSError, ValueError, IndexError):
        return 0

