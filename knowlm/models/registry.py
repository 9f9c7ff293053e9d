"""What knowlm registers with MindFormers: importing this module makes ``KnowLMConfig``, ``KnowLMForCausalLM``,
``KnowLMTokenizer`` and ``KnowLMFastTokenizer`` known to MindFormers' registry (yaml ``type:`` names,
``AutoConfig``/``AutoModel``, ``build_network``) and the pipeline names of ``knowlm.models.pipelines`` to ``pipeline("text_generation", ...)``.

``from knowlm import KnowLMForCausalLM`` (any of these names) imports it.
"""
from mindformers.mindformer_book import MindFormerBook

from knowlm.models.config import KnowLMConfig
from knowlm.models.llama import KnowLMForCausalLM
from knowlm.models.pipelines import pipeline_files
from knowlm.tokenizer.fast import KnowLMFastTokenizer
from knowlm.tokenizer.spm import KnowLMTokenizer

# MindFormers resolves a string model only through MindFormerBook's table of pipeline name -> yaml.
MindFormerBook.get_pipeline_support_task_list()["text_generation"].update(pipeline_files())

__all__ = ["KnowLMConfig", "KnowLMForCausalLM", "KnowLMTokenizer", "KnowLMFastTokenizer"]
