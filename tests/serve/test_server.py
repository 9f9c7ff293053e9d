"""``knowlm serve`` as users run it: the CLI in its own process on 127.0.0.1 at a free port, the real model
(SmolLM2-135M-Instruct), the ``openai`` client and plain HTTP; its answers compared with ``knowlm generate`` and
``knowlm extract`` run in this process."""
import json
import os
import re
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from concurrent.futures import ThreadPoolExecutor

import openai
import pytest

from knowlm import KnowLMForCausalLM
from knowlm.checkpoints.model_dir import load_config
from knowlm.cli import main
from knowlm.files import PACKAGE_DIR
from knowlm.generate import generate
from knowlm.models.packaged import packaged_model_dir
from knowlm.tokenizer.load import load_tokenizer
from reference import needs_smollm2

pytestmark = needs_smollm2

KEY = "test-key-123"
QUESTIONS = ["What is the capital of Japan?", "Name three primary colours.", "石桥是南溪国的首都。南溪国的首都是哪里？",
             "Write one sentence about rain.", "What is 12 times 12?", "Who wrote Hamlet?", "Say hello in French.",
             "What is DNA?"]


class Server:
    """``knowlm serve`` in a subprocess; ``url`` once it listens."""

    def __init__(self, *flags):
        self.process = subprocess.Popen([sys.executable, "-m", "knowlm.cli", "serve", "--model", "smollm2",
                                         "--port", "0", *flags], stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                        text=True, env={**os.environ, "PYTHONUNBUFFERED": "1"})
        self.lines = []
        threading.Thread(target=self._read, daemon=True).start()
        deadline = time.time() + 240
        while not any(" on http://" in line for line in self.lines):
            if self.process.poll() is not None or time.time() > deadline:
                self.process.kill()         # a failed start leaves no process behind
                pytest.fail("knowlm serve did not start: " + "".join(self.lines)[-2000:])
            time.sleep(0.1)
        self.url = re.search(r"on (http://\S+/v1)", "".join(self.lines)).group(1)

    def _read(self):
        for line in self.process.stdout:
            self.lines.append(line)

    def get(self, path):
        with urllib.request.urlopen(self.url.removesuffix("/v1") + path, timeout=30) as answer:
            body = answer.read()
        return json.loads(body) if path != "/metrics" else body.decode()

    def stop(self):
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
        try:
            return self.process.wait(60)
        except subprocess.TimeoutExpired:
            self.process.kill()
            raise


def post(url, body, key=KEY, raw=None):
    """``(status, parsed JSON)`` of a POST with ``body`` as JSON (or ``raw`` bytes)."""
    headers = {"Content-Type": "application/json", **({"Authorization": f"Bearer {key}"} if key else {})}
    request = urllib.request.Request(url, data=raw if raw is not None else json.dumps(body).encode(), headers=headers)
    try:
        with urllib.request.urlopen(request, timeout=120) as answer:
            return answer.status, json.loads(answer.read())
    except urllib.error.HTTPError as error:
        return error.code, json.loads(error.read())


@pytest.fixture(scope="module")
def server():
    packaged_model_dir("smollm2")         # converted once, before the server looks for it
    running = Server("--api-key", KEY, "--max-batch", "16")
    try:
        running.rss_at_start = running.get("/health")["rss_bytes"]
        yield running
    finally:
        status = running.stop()
    assert status == 0


@pytest.fixture(scope="module")
def client(server):
    return openai.OpenAI(base_url=server.url, api_key=KEY, max_retries=0, timeout=120)


@pytest.fixture(scope="module")
def reference():
    folder = packaged_model_dir("smollm2")
    return KnowLMForCausalLM.from_pretrained(folder, use_past=True, seq_length=512), \
        load_tokenizer(folder, load_config(folder))


def chat(client, question, **options):
    answer = client.chat.completions.create(model="smollm2", messages=[{"role": "user", "content": question}],
                                            **{"temperature": 0, "max_tokens": 32, **options})
    return answer.choices[0].message.content, answer.choices[0].finish_reason


def streamed(stream):
    """The text and finish reason of a streamed chat completion or completion."""
    text, reason = [], None
    for chunk in stream:
        for choice in chunk.choices:
            text.append(getattr(choice, "text", None) or (choice.delta.content if hasattr(choice, "delta") else "")
                        or "")
            reason = choice.finish_reason or reason
    return "".join(text), reason


@pytest.mark.parametrize("flags, fragment", [(["--max-batch", "0"], "--max-batch 0: expected an integer >= 1"),
                                             (["--port", "70000"], "--port 70000: expected an integer >= 0"),
                                             (["--ctx-size", "1"], "--ctx-size 1: expected an integer >= 2"),
                                             (["--port", "BUSY"], "cannot listen on 127.0.0.1")])
def test_bad_flags_and_a_port_in_use_are_one_line_before_any_model_loads(flags, fragment, capsys):
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        flags = [str(taken.getsockname()[1]) if flag == "BUSY" else flag for flag in flags]
        assert main(["serve", "--model", "no-such-model", *flags]) == 2
    error = capsys.readouterr().err
    assert error.startswith("knowlm: error: ") and fragment in error and error.count("\n") == 1


def test_models_lists_the_served_model(client):
    assert [model.id for model in client.models.list()] == ["smollm2"]


def test_a_chat_completion_is_knowlm_generate_and_its_stream_is_the_same_text(client, reference):
    text, reason = chat(client, QUESTIONS[0], max_tokens=40)
    assert text == generate(*reference, [QUESTIONS[0]], max_new_tokens=40, chat="model")[0]
    stream = client.chat.completions.create(model="smollm2", messages=[{"role": "user", "content": QUESTIONS[0]}],
                                            temperature=0, max_tokens=40, stream=True)
    assert streamed(stream) == (text, reason)


def test_stop_sequences_end_the_text_before_them_streamed_or_not(client):
    full = client.completions.create(model="smollm2", prompt="The capital of France is", temperature=0,
                                     max_tokens=24)
    text = full.choices[0].text
    stop = text.split()[2]          # a word from the middle of the greedy text
    cut = client.completions.create(model="smollm2", prompt="The capital of France is", temperature=0,
                                    max_tokens=24, stop=["zzz", stop])
    assert (cut.choices[0].text, cut.choices[0].finish_reason) == (text[:text.index(stop)], "stop")
    assert cut.usage.prompt_tokens == full.usage.prompt_tokens and cut.usage.completion_tokens < 24
    stream = client.completions.create(model="smollm2", prompt="The capital of France is", temperature=0,
                                       max_tokens=24, stop=["zzz", stop], stream=True)
    assert streamed(stream) == (text[:text.index(stop)], "stop")


def test_seeded_sampling_repeats_and_another_seed_differs(client):
    options = dict(temperature=1.0, top_p=0.95, max_tokens=24)
    first, again = chat(client, QUESTIONS[3], seed=42, **options), chat(client, QUESTIONS[3], seed=42, **options)
    others = {chat(client, QUESTIONS[3], seed=seed, **options)[0] for seed in (1, 2, 3)}
    assert first == again and len(others | {first[0]}) > 1


def test_sixteen_concurrent_greedy_requests_equal_the_same_requests_one_at_a_time(client, server):
    jobs = [(QUESTIONS[i % len(QUESTIONS)], 6 + 3 * i) for i in range(16)]      # different lengths
    with ThreadPoolExecutor(16) as pool:
        together = list(pool.map(lambda job: chat(client, job[0], max_tokens=job[1]), jobs))
    alone = [chat(client, question, max_tokens=n) for question, n in jobs]
    assert together == alone
    batches = re.findall(r'knowlm_batch_size_bucket\{le="(\S+)"\} (\S+)', server.get("/metrics"))
    counts = {float(le): float(count) for le, count in batches}
    assert counts[float("inf")] > counts[8.0]          # steps ran more than 8 requests at once


def test_extract_answers_as_knowlm_extract_writes(server, tmp_path):
    records = [json.loads(line) for line in
               (PACKAGE_DIR / "assets" / "kg" / "test.jsonl").read_text(encoding="utf-8").splitlines()[:40:13]]
    schema = json.loads((PACKAGE_DIR / "assets" / "kg" / "schema.json").read_text(encoding="utf-8"))
    inputs = tmp_path / "in.jsonl"
    inputs.write_text("".join(json.dumps({"id": r["id"], "text": r["text"]}, ensure_ascii=False) + "\n"
                              for r in records), encoding="utf-8")
    assert main(["extract", "--model", "smollm2", "--schema", str(PACKAGE_DIR / "assets" / "kg" / "schema.json"),
                 "--input", str(inputs), "--output", str(tmp_path / "out.jsonl"), "--max-new-tokens", "48"]) == 0
    expected = [json.loads(line) for line in (tmp_path / "out.jsonl").read_text(encoding="utf-8").splitlines()]
    status, answer = post(f"{server.url}/extract", {"records": [{"id": r["id"], "text": r["text"]} for r in records],
                                                    "task": "re", "schema": schema, "max_tokens": 48})
    assert status == 200 and answer["results"] == expected
    status, one = post(f"{server.url}/extract", {"text": records[0]["text"], "schema": schema, "max_tokens": 48})
    assert status == 200 and one["results"][0]["outputs"] == expected[0]["outputs"]
    # Constrained: the engine masks each request's tokens as knowlm extract --constrained does.
    assert main(["extract", "--model", "smollm2", "--schema", str(PACKAGE_DIR / "assets" / "kg" / "schema.json"),
                 "--input", str(inputs), "--output", str(tmp_path / "constrained.jsonl"), "--max-new-tokens", "48",
                 "--constrained"]) == 0
    expected = [json.loads(line) for line in (tmp_path / "constrained.jsonl").read_text(encoding="utf-8").splitlines()]
    status, answer = post(f"{server.url}/extract", {"records": [{"id": r["id"], "text": r["text"]} for r in records],
                                                    "schema": schema, "max_tokens": 48, "constrained": True})
    assert status == 200 and answer["results"] == expected
    assert all(result["unparsable"] == 0 and result["run_on"] == 0 for result in expected)


@pytest.mark.parametrize("body, raw, status, fragment", [
    (None, b'{"model": "smollm2", "prompt": ', 400, "not valid JSON"),
    (None, b"[1, 2]", 400, "expected a JSON object"),
    ({"model": "smollm2", "prompt": "hi", "max_tokens": "5"}, None, 400, "max_tokens: Input should be a valid integer"),
    ({"model": "smollm2", "prompt": "hi", "temperature": "hot"}, None, 400, "temperature"),
    ({"model": "smollm2", "prompt": "hi " * 600}, None, 400, "passes the model's context of 512 tokens"),
    ({"model": "smollm2", "prompt": "hi", "max_tokens": 4096}, None, 400, "lower max_tokens to at most"),
    ({"model": "gpt-4", "prompt": "hi"}, None, 404, "model 'gpt-4': not served here"),
    ({"model": "smollm2", "prompt": "hi", "n": 3}, None, 400, "only n = 1"),
    ({"model": "smollm2", "prompt": [99999999]}, None, 400, "token ids must be in"),
])
def test_bad_input_is_one_line_with_its_status(server, body, raw, status, fragment):
    code, answer = post(f"{server.url}/completions", body, raw=raw)
    message = answer["error"]["message"]
    assert code == status and fragment in message and "\n" not in message


def test_a_missing_or_wrong_api_key_is_401(server):
    for key in (None, "wrong"):
        code, answer = post(f"{server.url}/completions", {"model": "smollm2", "prompt": "hi"}, key=key)
        assert code == 401 and answer["error"]["code"] == "invalid_api_key"
    with pytest.raises(openai.AuthenticationError):
        openai.OpenAI(base_url=server.url, api_key="wrong", max_retries=0).models.list()


KILLED_CLIENT = """
import json, sys, urllib.request
request = urllib.request.Request(sys.argv[1] + "/chat/completions", headers={"Authorization": "Bearer " + sys.argv[2]},
    data=json.dumps({"model": "smollm2", "messages": [{"role": "user", "content": "Tell me a long story."}],
                     "max_tokens": 470, "temperature": 0, "stream": True}).encode())
with urllib.request.urlopen(request) as answer:
    answer.readline()
    print("streaming", flush=True)
    answer.read()
"""


def test_a_client_killed_mid_stream_frees_its_row_and_does_not_stall_the_others(server, client):
    killed = subprocess.Popen([sys.executable, "-c", KILLED_CLIENT, server.url, KEY], stdout=subprocess.PIPE,
                              text=True)
    assert killed.stdout.readline().strip() == "streaming"
    with ThreadPoolExecutor(2) as pool:
        other = pool.submit(chat, client, QUESTIONS[5], max_tokens=30)
        killed.kill()
        killed.wait()
        assert other.result(timeout=120) == chat(client, QUESTIONS[5], max_tokens=30)
    # Left running, the killed request would decode for ~15 s more (470 tokens): its row is freed well before.
    deadline = time.time() + 4
    while server.get("/health")["running"] and time.time() < deadline:
        time.sleep(0.1)
    assert server.get("/health")["running"] == 0


def test_after_all_of_it_health_answers_and_memory_stayed_within_the_model_and_its_cache(server):
    health = server.get("/health")
    assert health["status"] == "ok" and health["running"] == health["waiting"] == 0
    grown = health["rss_bytes"] - server.rss_at_start
    print(f"RSS {server.rss_at_start / 2**20:.0f} -> {health['rss_bytes'] / 2**20:.0f} MiB")
    assert grown < 0.25 * (health["weights_bytes"] + health["kv_cache_bytes"]), (grown, health)


def test_sigterm_finishes_the_requests_in_flight_cancels_past_the_deadline_refuses_new_ones_and_exits_0():
    server = Server("--max-batch", "2", "--shutdown-timeout", "5")
    try:
        sigterm_while_two_requests_run(server)
    finally:
        if server.process.poll() is None:
            server.process.kill()


def sigterm_while_two_requests_run(server):
    client = openai.OpenAI(base_url=server.url, api_key="none", max_retries=0, timeout=120)
    short, long = [iter(client.completions.create(model="smollm2", prompt="Once upon a time", temperature=0,
                                                  max_tokens=n, stream=True)) for n in (6, 500)]
    next(short), next(long)         # both running
    server.process.send_signal(signal.SIGTERM)
    with pytest.raises((openai.APIConnectionError, openai.InternalServerError)):
        chat(client, QUESTIONS[0])
    assert streamed(short)[1] == "length"           # finished within the deadline
    with pytest.raises(openai.APIError, match="shut down before the request finished"):
        streamed(long)                              # cancelled at the deadline, told so
    assert server.process.wait(60) == 0
    assert "knowlm serve: stopped" in "".join(server.lines)
