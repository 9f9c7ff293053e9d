"""The tiny reference model (``model_dir``, conftest.py above) loaded for editing: no KV cache, 64 positions."""
import pytest

from knowlm import KnowLMForCausalLM
from knowlm.runtime import use_graph_mode
from knowlm.tokenizer.spm import BUILTIN_TOKENIZER, KnowLMTokenizer


@pytest.fixture(scope="session")
def tiny(model_dir):
    use_graph_mode()
    model = KnowLMForCausalLM.from_pretrained(model_dir, use_past=False, seq_length=64)
    model.set_train(False)
    return model, KnowLMTokenizer(vocab_file=BUILTIN_TOKENIZER)
