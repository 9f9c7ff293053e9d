"""knowlm: the KnowLM models (zjunlp) as a MindSpore + MindFormers model-zoo plugin.

Importing this package registers ``KnowLMConfig``, ``KnowLMForCausalLM`` and ``KnowLMTokenizer`` with
MindFormers (yaml ``type:`` names, ``AutoConfig``/``AutoModel``) and the pipeline names ``knowlm_13b_base``,
``knowlm_13b_zhixi``, ``knowlm_13b_ie`` and ``knowlm_tiny``.
"""
from knowlm.config import PRESETS, KnowLMConfig
from knowlm.errors import KnowLMError
from knowlm.model import KnowLMForCausalLM
from knowlm.registry import register_pipelines
from knowlm.tokenizer import KnowLMTokenizer

register_pipelines()

__version__ = "0.1.0"
__all__ = ["KnowLMConfig", "KnowLMForCausalLM", "KnowLMTokenizer", "KnowLMError", "PRESETS"]
