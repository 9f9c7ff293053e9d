"""Each token's bytes, as the model writes them: what ``automaton.VocabularyTrie`` is built from.

Byte-level BPE vocabularies (GPT-2 style: SmolLM2, LLaMA-3, Qwen) spell each byte as one printable character
(``bytes_to_unicode``; ``Ġ`` is a space); SentencePiece vocabularies (LLaMA, KnowLM-13B) write ``▁`` for a space
and ``<0xNN>`` for a byte fallback. Special tokens (BOS, EOS, chat markers) map to ``None``: never part of an answer.
"""
from functools import lru_cache


@lru_cache(maxsize=1)
def _byte_decoder() -> dict:
    printable = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + \
        list(range(ord("®"), ord("ÿ") + 1))
    characters = printable[:]
    extra = 0
    for byte in range(256):
        if byte not in printable:
            printable.append(byte)
            characters.append(256 + extra)
            extra += 1
    return {chr(c): b for b, c in zip(printable, characters)}


def token_bytes(tokenizer) -> list:
    """``[bytes or None]`` indexed by token id, for every id of the vocabulary (added tokens included)."""
    size = max(tokenizer.get_vocab().values()) + 1
    pieces = tokenizer.convert_ids_to_tokens(list(range(size)))
    special = set(getattr(tokenizer, "all_special_ids", []) or [])
    byte_level = any(piece and piece.startswith("Ġ") for piece in pieces[:5000] if isinstance(piece, str))
    decoder = _byte_decoder()
    out = []
    for token, piece in enumerate(pieces):
        if token in special or not isinstance(piece, str) or (piece.startswith("<") and piece.endswith(">")
                                                               and not piece.startswith("<0x")):
            out.append(None)
        elif byte_level:
            out.append(bytes(decoder[c] for c in piece) if all(c in decoder for c in piece) else None)
        elif piece.startswith("<0x") and piece.endswith(">") and len(piece) == 6:
            out.append(bytes([int(piece[3:5], 16)]))
        else:
            out.append(piece.replace("▁", " ").encode("utf-8"))
    return out
