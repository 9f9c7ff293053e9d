"""Tokenizers and prompt templates: ``spm`` (KnowLM's SentencePiece tokenizer) and ``fast`` (a Hugging Face
``tokenizer.json``), both MindFormers-registered; ``load`` (which one a model directory holds, checked against its
weights); ``chat`` (a model's own Jinja chat template, rendered in a sandbox, and the templates KnowLM-family models
were trained with, by name)."""
