"""Checkpoints in and out: ``names`` (the weight table every other list derives from), ``stream`` (MindSpore
``.ckpt`` files a tensor at a time), ``hf`` (Hugging Face configs and weight files), ``convert`` (``knowlm convert``
/ ``export``), ``gguf`` (``knowlm convert FILE.gguf``: llama.cpp files), ``quant`` (int8 storage: llama.cpp's Q8_0),
``lora`` (adapters: merge, PEFT import, settings) and ``model_dir`` (a knowlm model directory)."""
