"""The child side of ``bench/real.py``: one long-lived process per (engine, precision, context) that loads its model
once and then answers measurement requests, so that the parent can interleave the engines request by request.

    python bench/engines.py SPEC.json        (started by bench/real.py; not meant to be run by hand)

Protocol: one JSON request per line on stdin (``{"op": "prefill", "prompt": "chat"}``), one JSON reply per line on
the process's original stdout. Everything else the process prints (MindSpore, MindFormers, llama.cpp, warnings) goes
to stderr, which the parent sends to a log file: fd 1 is pointed at stderr before any engine is imported.

Engines (the same token ids for all, from ``SPEC["prompts"]``; 2 threads each; greedy; no stop at end-of-sequence):

- ``knowlm``: ``KnowLMForCausalLM.from_pretrained(dir, seq_length=ctx, use_past=True, batch_size=1)`` and its public
  ``generate``; a prefill is ``generate(max_new_tokens=1)``, a decode step the time between the first and the
  last new token of ``generate(max_new_tokens=n + 1)`` (a streamer's clock) / n;
- ``transformers``: ``LlamaForCausalLM`` (sdpa attention), a forward with ``use_cache=True, logits_to_keep=1``, then
  one forward per token with ``past_key_values``, under ``torch.inference_mode``;
- ``llama.cpp``: llama-cpp-python's ``Llama(n_ctx=ctx)``, ``reset()`` + ``eval(ids)``, then ``eval([token])`` per
  token, the argmax of the last logits read from the context without a copy.
"""
import json
import os
import resource
import sys
import time
import traceback
from pathlib import Path

THREADS = 2
NEVER = -1          # an end-of-sequence id no token equals: every generation runs to its length


def timed(call):
    start = time.perf_counter()
    result = call()
    return time.perf_counter() - start, result


def current_rss():
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    return None


class Engine:
    """What every engine answers; subclasses give ``load``, ``prefill`` (ids -> first token) and ``step``
    (token -> next token), or override ``generate``/``decode_step``."""

    def __init__(self, spec):
        self.spec, self.ctx = spec, spec["ctx"]
        self.prompts = json.loads(Path(spec["prompts"]).read_text())

    def generate(self, ids, n):
        tokens = [self.prefill(ids)]
        while len(tokens) < n:
            tokens.append(self.step(tokens[-1]))
        return tokens

    def decode_step(self, ids, n):
        token = self.prefill(ids)
        start = time.perf_counter()
        for _ in range(n):
            token = self.step(token)
        return {"step_s": (time.perf_counter() - start) / n}

    def held(self):
        return {}

    # ------------------------------------------------------------------------------------------ requests

    def op_start(self, prompt, n):
        """Model load, then the first generation (``n`` tokens of ``prompt``): what a first call costs."""
        load_s, _ = timed(self.load)
        first_s, tokens = timed(lambda: self.generate(self.prompts[prompt], n))
        return {"load_s": load_s, "first_generate_s": first_s, "first_call_s": load_s + first_s,
                "tokens": tokens, "rss_after_start": current_rss(), **self.held()}

    def op_prefill(self, prompt):
        seconds, _ = timed(lambda: self.prefill(self.prompts[prompt]))
        return {"s": seconds}

    def op_decode(self, prompt, n):
        return self.decode_step(self.prompts[prompt], n)

    def op_generate(self, prompt, n):
        seconds, tokens = timed(lambda: self.generate(self.prompts[prompt], n))
        if len(tokens) != n:
            raise RuntimeError(f"asked for {n} tokens, got {len(tokens)}")
        return {"s": seconds, "tokens": tokens}

    def op_rss(self):
        return {"peak_rss": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024, "rss": current_rss()}


class KnowLM(Engine):
    def __init__(self, spec):
        super().__init__(spec)
        import logging  # pylint: disable=import-outside-toplevel
        import mindspore as ms  # pylint: disable=import-outside-toplevel
        ms.device_context.cpu.op_tuning.threads_num(THREADS)
        from mindformers.tools.logger import get_logger  # pylint: disable=import-outside-toplevel
        get_logger().setLevel(logging.WARNING)
        self.model = None

    def load(self):
        from knowlm import KnowLMForCausalLM  # pylint: disable=import-outside-toplevel
        self.model = KnowLMForCausalLM.from_pretrained(self.spec["model"], seq_length=self.ctx, use_past=True,
                                                       batch_size=1)

    def held(self):
        """Bytes of weights the model holds, by dtype (KV cache excluded), and whether knowlm's kernels run."""
        by_dtype = {}
        for p in self.model.get_parameters():
            if "key_cache" in p.name or "value_cache" in p.name:
                continue
            dtype = str(p.dtype)
            by_dtype[dtype] = by_dtype.get(dtype, 0) + p.nbytes
        layers = sum(p.nbytes for p in self.model.get_parameters()
                     if ".layers." in f".{p.name}" and "cache" not in p.name)
        return {"held_bytes": by_dtype, "layer_bytes": layers,
                "kernels": self.model.kernel_library is not None}

    def generate(self, ids, n):
        out = self.model.generate(list(ids), max_new_tokens=n, do_sample=False, eos_token_id=NEVER)
        return [int(t) for t in out[0][len(ids):]]

    def prefill(self, ids):
        return self.generate(ids, 1)[0]

    def decode_step(self, ids, n):
        # Timed inside one generation by a streamer (the prompt, then each new token as it comes): the difference of
        # two generations was dominated by the variance of a 2000-token prefill.
        clock = Clock()
        out = self.model.generate(list(ids), max_new_tokens=n + 1, do_sample=False, eos_token_id=NEVER, streamer=clock)
        if len(out[0]) - len(ids) != n + 1 or len(clock.times) != n + 2:
            raise RuntimeError(f"asked for {n + 1} tokens, got {len(out[0]) - len(ids)} ({len(clock.times)} puts)")
        return {"step_s": (clock.times[-1] - clock.times[1]) / n}


class Clock:
    """A streamer that notes when each put comes: the prompt, then every new token (a chunk of decode steps puts
    its tokens when the chunk is done)."""

    def __init__(self):
        self.times = []

    def put(self, value):
        self.times.append(time.perf_counter())

    def end(self):
        pass


class Transformers(Engine):
    def __init__(self, spec):
        super().__init__(spec)
        import torch  # pylint: disable=import-outside-toplevel
        import transformers  # pylint: disable=import-outside-toplevel
        torch.set_num_threads(THREADS)
        transformers.logging.set_verbosity_error()
        self.torch, self.transformers = torch, transformers
        self.model = self.past = None

    def load(self):
        dtype = {"fp32": self.torch.float32, "bf16": self.torch.bfloat16}[self.spec["precision"]]
        self.model = self.transformers.AutoModelForCausalLM.from_pretrained(self.spec["model"], dtype=dtype).eval()

    def held(self):
        return {"held_bytes": {str(self.model.dtype): sum(p.numel() * p.element_size()
                                                          for p in self.model.parameters())}}

    def _forward(self, ids):
        with self.torch.inference_mode():
            out = self.model(input_ids=self.torch.tensor([ids]), past_key_values=self.past, use_cache=True,
                             logits_to_keep=1)
        self.past = out.past_key_values
        return int(out.logits[0, -1].argmax())

    def prefill(self, ids):
        self.past = None
        return self._forward(list(ids))

    def step(self, token):
        return self._forward([token])


class LlamaCpp(Engine):
    def __init__(self, spec):
        super().__init__(spec)
        import numpy as np  # pylint: disable=import-outside-toplevel
        import llama_cpp  # pylint: disable=import-outside-toplevel
        self.np, self.llama_cpp, self.llm = np, llama_cpp, None

    def load(self):
        if not self.spec.get("extra_bufts", True):
            without_extra_bufts(self.llama_cpp)
        self.llm = self.llama_cpp.Llama(
            model_path=self.spec["model"], n_ctx=self.ctx, n_batch=min(self.ctx, 2048), n_ubatch=512,
            n_threads=THREADS, n_threads_batch=THREADS, logits_all=False, flash_attn=self.spec["flash_attn"],
            verbose=False)

    def held(self):
        # The tokenizer the converter wrote, against the ids every engine is given (the chat prompt's text).
        text = self.spec.get("chat_text")
        ids = self.llm.tokenize(text.encode(), add_bos=False, special=True) if text else None
        return {"held_bytes": {"gguf file": Path(self.spec["model"]).stat().st_size},
                "tokenizer_equal": None if ids is None else ids == self.prompts["chat"]}

    def _argmax(self):
        logits = self.np.ctypeslib.as_array(self.llm._ctx.get_logits(),  # pylint: disable=protected-access
                                            shape=(self.llm._n_vocab,))  # pylint: disable=protected-access
        return int(logits.argmax())

    def prefill(self, ids):
        self.llm.reset()
        self.llm.eval(list(ids))
        return self._argmax()

    def step(self, token):
        self.llm.eval([token])
        return self._argmax()


def without_extra_bufts(llama_cpp):
    """Load llama.cpp models with no extra buffer types: on x86 that is AMX alone for these files (llama.cpp repacks
    Q8_0 only on ARM and RISC-V), whose tile instructions fault in a VM that reports AMX without running it."""
    defaults = llama_cpp.llama_cpp.llama_model_default_params

    def params():
        value = defaults()
        value.use_extra_bufts = False
        return value
    llama_cpp.llama_cpp.llama_model_default_params = params


ENGINES = {"knowlm": KnowLM, "transformers": Transformers, "llama.cpp": LlamaCpp}


def serve(spec):
    started = time.perf_counter()
    replies = os.fdopen(os.dup(1), "w", buffering=1)
    os.dup2(2, 1)               # every other print, Python's or a library's, goes to the log
    engine = ENGINES[spec["engine"]](spec)
    import_s = time.perf_counter() - started
    replies.write(json.dumps({"ok": True, "import_s": import_s, "pid": os.getpid()}) + "\n")
    for line in sys.stdin:
        request = json.loads(line)
        op = request.pop("op")
        if op == "quit":
            break
        try:
            reply = {"ok": True, **getattr(engine, f"op_{op}")(**request)}
        except Exception as err:        # noqa: BLE001  (reported to the parent, which skips this engine)
            traceback.print_exc()
            reply = {"ok": False, "error": f"{type(err).__name__}: {str(err).splitlines()[0] if str(err) else ''}"}
        replies.write(json.dumps(reply) + "\n")


def probe_llama(model):
    """Evaluate a few tokens with llama.cpp's default buffers: bench/real.py reads the exit status (SIGILL: AMX
    reported by the CPU but not usable in this VM)."""
    import llama_cpp  # pylint: disable=import-outside-toplevel
    llama_cpp.Llama(model_path=model, n_ctx=64, n_threads=THREADS, verbose=False).eval([1, 2, 3, 4])


if __name__ == "__main__":
    if sys.argv[1] == "--probe-llama":
        probe_llama(sys.argv[2])
    else:
        serve(json.loads(Path(sys.argv[1]).read_text()))
