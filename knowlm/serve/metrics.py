"""The server's Prometheus series (``GET /metrics``), in a registry of its own (two servers in one process, as in the
tests, do not share counts). The engine reports through ``Metrics``' ``step``/``first_token``/``token``/``queue``."""
from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, ProcessCollector, generate_latest
from prometheus_client.exposition import CONTENT_TYPE_LATEST

LATENCY_BUCKETS = (0.005, 0.01, 0.02, 0.05, 0.1, 0.2, 0.5, 1.0, 2.0, 5.0, 10.0, 30.0, 60.0)
BATCH_BUCKETS = (1, 2, 4, 8, 12, 16, 24, 32, 48, 64)


class Metrics:
    content_type = CONTENT_TYPE_LATEST

    def __init__(self):
        self.registry = registry = CollectorRegistry()
        ProcessCollector(registry=registry)        # process_resident_memory_bytes, cpu seconds, ...
        self.requests = Counter("knowlm_requests", "HTTP requests answered, by endpoint and status code",
                                ["endpoint", "status"], registry=registry)
        self.prompt_tokens = Counter("knowlm_prompt_tokens", "Prompt tokens of the requests admitted",
                                     registry=registry)
        self.generated_tokens = Counter("knowlm_generation_tokens", "Tokens generated", registry=registry)
        self.waiting = Gauge("knowlm_requests_waiting", "Requests queued for a row of the batch", registry=registry)
        self.running = Gauge("knowlm_requests_running", "Requests in the running batch", registry=registry)
        self.cache_usage = Gauge("knowlm_kv_cache_usage_ratio", "Share of the KV cache's blocks reserved",
                                 registry=registry)
        self.batch = Histogram("knowlm_batch_size", "Requests computed per engine step", buckets=BATCH_BUCKETS,
                               registry=registry)
        self.ttft = Histogram("knowlm_time_to_first_token_seconds", "From arrival to the first token",
                              buckets=LATENCY_BUCKETS, registry=registry)
        self.tpot = Histogram("knowlm_time_per_output_token_seconds", "Between two tokens of one request",
                              buckets=LATENCY_BUCKETS, registry=registry)
        self.latency = Histogram("knowlm_request_duration_seconds", "From arrival to the last byte, by endpoint",
                                 ["endpoint"], buckets=LATENCY_BUCKETS, registry=registry)

    # The engine's observer.
    def step(self, rows):
        self.batch.observe(rows)

    def first_token(self, seconds):
        self.ttft.observe(seconds)
        self.generated_tokens.inc()

    def token(self, seconds):
        self.tpot.observe(seconds)
        self.generated_tokens.inc()

    def queue(self, waiting, running, usage):
        self.waiting.set(waiting)
        self.running.set(running)
        self.cache_usage.set(usage)

    def text(self) -> bytes:
        return generate_latest(self.registry)
