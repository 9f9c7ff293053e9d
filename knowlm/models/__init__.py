"""The KnowLM model for MindSpore + MindFormers (``registry`` registers it with MindFormers).

=============  ===============================================================================================
module         job
=============  ===============================================================================================
config         ``KnowLMConfig`` and its named presets
llama          ``KnowLMForCausalLM``: MindFormers' LLaMA made to run anywhere MindSpore runs (read it first)
layers         the portable layers it swaps in off Ascend (KV cache, training gradients)
kernels        knowlm's CPU kernels (``csrc/decode.cpp``) as MindSpore ops
decoding       the greedy KV-cache loop the model runs off Ascend
pipelines      pipeline names -> packaged yaml files, and where their weights come from
registry       importing it registers the classes and pipeline names with MindFormers
load           ``load_model``: a model (and tokenizer) from a directory, packaged name, yaml, pipeline name or preset
lora           LoRA cells and adapters attached at run time
packaged       real models by name (``smollm2``): a package's GGUF file, converted once into the cache
=============  ===============================================================================================

This file imports nothing, so that importing one module of the package loads only what that module needs.
"""
