"""The continuous-batching engine (``knowlm.serve.engine``) on the real model, in this process: requests that join
and leave a running batch get the tokens ``knowlm generate`` gives each alone, a prompt longer than a step's budget
is read over several steps beside the others' decoding, the queue is bounded, a failing request fails alone."""
import copy
import threading
import time

import peft
import pytest
import torch

from knowlm import KnowLMForCausalLM
from knowlm.checkpoints.lora import import_peft_adapter
from knowlm.checkpoints.model_dir import load_config
from knowlm.errors import KnowLMError
from knowlm.files import PACKAGE_DIR
from knowlm.generate import encode_prompts, generate
from knowlm.models.packaged import packaged_model_dir
from knowlm.serve import engine as engine_module
from knowlm.serve import server
from knowlm.serve.engine import Busy, Engine
from knowlm.serve.sampling import SamplingParams
from knowlm.tokenizer.load import load_tokenizer
from reference import IDS, hf_greedy, needs_smollm2

LONG = (PACKAGE_DIR / "assets" / "corpus.txt").read_text(encoding="utf-8")[:200]
# (prompt, chat template?, max_tokens): chat prompts carry special tokens mid-prompt; one prompt is longer than a
# step's prompt budget (PREFILL_TOKENS), so it is read over several steps while the others decode.
CASES = [("What is the capital of Japan?", True, 24), ("石桥是南溪国的首都。南溪国的首都是哪里？", True, 16),
         ("The three primary colours are", False, 20), (LONG, False, 12), ("Write a haiku about rain.", True, 30),
         ("1, 2, 3, 4,", False, 8)]


@pytest.fixture(scope="module")
def loaded():
    """The real model at 512 positions with a small cache (48 blocks: the requests of a test wait for blocks)."""
    folder = packaged_model_dir("smollm2")
    model = KnowLMForCausalLM.from_pretrained(folder, use_past=True, seq_length=512, num_blocks=48)
    return model, load_tokenizer(folder, load_config(folder))


@pytest.fixture(scope="module")
def expected(loaded):
    """``knowlm generate``'s greedy text for each case alone (computed before an engine shares the cache)."""
    model, tokenizer = loaded
    return [generate(model, tokenizer, [prompt], max_new_tokens=n, chat="model" if chat else None)[0]
            for prompt, chat, n in CASES]


class Collector:
    def __init__(self):
        self.text, self.end, self.done = [], None, threading.Event()

    def __call__(self, event):
        if event[0] == "text":
            self.text.append(event[1])
        else:
            self.end = event
            self.done.set()


def submit(engine, tokenizer, case, **options):
    prompt, chat, max_tokens = case
    ids = encode_prompts(tokenizer, [prompt], "model" if chat else None)[0]
    collector = Collector()
    request = engine.submit(ids, SamplingParams(max_tokens=max_tokens, temperature=0, **options), collector)
    return request, collector


@needs_smollm2
def test_requests_joining_a_running_batch_get_the_greedy_tokens_of_knowlm_generate(loaded, expected):
    model, tokenizer = loaded
    engine = Engine(model, tokenizer, max_batch=4, max_queue=8)
    steps = []
    engine.observer = type("Steps", (), {"step": lambda _, rows: steps.append(rows), "first_token": lambda *_: None,
                                         "token": lambda *_: None, "queue": lambda *_: None})()
    try:
        first = [submit(engine, tokenizer, case) for case in CASES[:3]]
        while not all(collector.text for _, collector in first):
            time.sleep(0.01)
        later = [submit(engine, tokenizer, case) for case in CASES[3:]]       # join while the first three decode
        for request, collector in first + later:
            assert collector.done.wait(120)
        texts = ["".join(collector.text) for _, collector in first + later]
    finally:
        engine.shutdown(0)
    assert texts == expected
    assert max(steps) == 4 and sorted(engine.free) == list(range(48))     # every block back


@needs_smollm2
def test_a_full_queue_and_a_shutting_down_engine_refuse_with_busy(loaded):
    model, tokenizer = loaded
    engine = Engine(model, tokenizer, max_batch=1, max_queue=1)
    try:
        running = [submit(engine, tokenizer, CASES[4]) for _ in range(2)]       # one runs, one waits
        with pytest.raises(Busy, match="--max-queue 1"):
            submit(engine, tokenizer, CASES[4])
        for request, _ in running:
            engine.cancel(request)
        for _, collector in running:
            assert collector.done.wait(60) and collector.end == ("done", "cancelled")
        engine.drain()
        with pytest.raises(Busy, match="shutting down"):
            submit(engine, tokenizer, CASES[4])
    finally:
        engine.shutdown(0)


@needs_smollm2
def test_a_prompt_past_the_context_is_refused_before_it_queues(loaded):
    model, tokenizer = loaded
    engine = Engine(model, tokenizer, max_batch=2)
    try:
        with pytest.raises(KnowLMError, match="lower max_tokens to at most"):
            submit(engine, tokenizer, ("hello", False, 600))
        with pytest.raises(KnowLMError, match="empty"):
            engine.submit([], SamplingParams(max_tokens=4), Collector())
    finally:
        engine.shutdown(0)


@needs_smollm2
def test_an_exception_inside_the_engine_fails_that_request_and_the_rest_go_on(loaded, expected, monkeypatch):
    model, tokenizer = loaded
    original = engine_module.Sampler.__call__

    def failing(self, logits):
        if self.params.seed == 13:
            raise RuntimeError("sampler broke")
        return original(self, logits)
    monkeypatch.setattr(engine_module.Sampler, "__call__", failing)
    engine = Engine(model, tokenizer, max_batch=4)
    try:
        good, bad = submit(engine, tokenizer, CASES[0]), submit(engine, tokenizer, CASES[2], seed=13)
        assert bad[1].done.wait(60) and bad[1].end == ("error", "RuntimeError: sampler broke")
        assert good[1].done.wait(60) and "".join(good[1].text) == expected[0]
        after = submit(engine, tokenizer, CASES[5])
        assert after[1].done.wait(60) and "".join(after[1].text) == expected[5]
        assert engine.thread.is_alive() and len(engine.free) == 48
    finally:
        engine.shutdown(0)


def test_a_served_lora_adapter_gives_the_greedy_tokens_of_peft(hf_model, model_dir, tmp_path):
    """``knowlm serve --lora``: a PEFT adapter (imported, merged into its base once, cached) on the tiny reference
    model; the engine's greedy tokens are PEFT's, and a second start reuses the merged directory."""
    torch.manual_seed(2)
    tuned = peft.get_peft_model(copy.deepcopy(hf_model), peft.LoraConfig(
        r=4, lora_alpha=16, lora_dropout=0.0, init_lora_weights=False, target_modules=["q_proj", "v_proj"])).eval()
    tuned.save_pretrained(tmp_path / "peft")
    adapter = import_peft_adapter(tmp_path / "peft", tmp_path / "adapter").output
    network, tokenizer, _ = server._load(str(model_dir), str(adapter), 2, None, None)
    merged = server._merged(str(model_dir), str(adapter))
    assert merged.is_dir() and server._merged(str(model_dir), str(adapter)) == merged
    expected = hf_greedy(tuned, IDS[0], 8)[len(IDS[0]):]
    engine = Engine(network, tokenizer, max_batch=2)
    try:
        collector = Collector()
        request = engine.submit(IDS[0], SamplingParams(max_tokens=8, temperature=0), collector)
        assert collector.done.wait(60)
    finally:
        engine.shutdown(0)
    stop = request.output + ([expected[len(request.output)]] if len(request.output) < 8 else [])
    assert stop == expected[:len(stop)] and collector.end == ("done", "stop" if len(request.output) < 8 else "length")
