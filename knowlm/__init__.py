"""knowlm: the KnowLM models (zjunlp) as a MindSpore + MindFormers model-zoo plugin.

Importing ``knowlm`` loads nothing heavy: its public names resolve on first use. ``KnowLMConfig``,
``KnowLMForCausalLM`` and ``KnowLMTokenizer`` come from ``knowlm.models.registry``, whose import registers them
(and the pipeline names ``knowlm_13b_base``, ``knowlm_13b_zhixi``, ``knowlm_13b_ie``, ``knowlm_tiny``) with
MindFormers.

==============  ============================================================================================
package         what lives there
==============  ============================================================================================
models          the model, its CPU layers and kernels, decoding, MindFormers registration, ``load_model``
checkpoints     the weight-name table, Hugging Face / MindSpore / LoRA checkpoints, model directories
tokenizer       the SentencePiece tokenizer and the chat templates
train           instruction data, fine-tuning, launch checks
ie              information extraction: prompts, parsing, scoring, training data from knowledge graphs
==============  ============================================================================================

Beside them: ``cli`` (the ``knowlm`` command), ``generate`` (text in, text out), ``quickstart``, ``runtime``
(MindSpore's mode and compile cache), ``frameworks`` (MindSpore and MindFormers loaded quietly), ``files`` (names and
atomic writes), ``errors``.
"""
import importlib

__version__ = "0.1.0"

# public name -> the module that defines it
_PUBLIC = {
    "KnowLMConfig": "knowlm.models.registry",
    "KnowLMForCausalLM": "knowlm.models.registry",
    "KnowLMTokenizer": "knowlm.models.registry",
    "KnowLMFastTokenizer": "knowlm.models.registry",
    "PRESETS": "knowlm.models.config",
    "KnowLMError": "knowlm.errors",
    "load_model": "knowlm.models.load",
}
__all__ = list(_PUBLIC)


def __getattr__(name):
    if name not in _PUBLIC:
        raise AttributeError(f"module 'knowlm' has no attribute {name!r}")
    value = getattr(importlib.import_module(_PUBLIC[name]), name)
    globals()[name] = value
    return value


def __dir__():
    return sorted([*globals(), *_PUBLIC])
