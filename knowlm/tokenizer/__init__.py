"""Tokenizers and prompt templates: ``spm`` (KnowLM's SentencePiece tokenizer, MindFormers-registered) and ``chat``
(the chat templates KnowLM-family models were trained with)."""
