"""``knowlm serve``: an OpenAI-compatible HTTP server over one model.

- ``engine``: continuous batching; one thread owns the model and its KV cache, requests join and leave the running
  batch at step boundaries.
- ``sampling``, ``text``: how each request picks its next token, and its text as it grows (stop strings).
- ``api``: the FastAPI routes (``/v1/completions``, ``/v1/chat/completions``, ``/v1/extract``, ``/v1/models``,
  ``/health``, ``/metrics``); ``metrics``: the Prometheus series; ``server``: load, bind, run, shut down.
"""
