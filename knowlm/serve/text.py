"""A request's text as its tokens come: incremental detokenization and stop strings.

Text is released only when it is final: a token that ends inside a multi-byte character waits for the next one, and
the last ``len(stop) - 1`` characters wait while they could still begin a stop string. The text of a finished
request is exactly what was released, streamed or not.
"""


class TextStream:
    """The generated text of one request (prompt excluded, special tokens skipped, as ``knowlm generate`` decodes
    it), released piece by piece; ``stop`` strings end it and are not part of it (OpenAI's ``stop``)."""

    def __init__(self, tokenizer, stop=()):
        self.tokenizer = tokenizer
        self.ids = []
        self.prefix = self.read = 0      # ids[prefix:read] decoded already: context for the next token's text
        self.text = ""
        self.sent = 0                    # characters of text released
        self.checked = 0                 # characters of text searched for stop strings
        self.stop = tuple(stop)
        self.hold = max(map(len, self.stop), default=1) - 1
        self.stopped = False

    def _decode(self, ids):
        return self.tokenizer.decode(ids, skip_special_tokens=True)

    def add(self, token) -> tuple:
        """``(released text, stopped)`` after ``token``."""
        self.ids.append(token)
        before = self._decode(self.ids[self.prefix:self.read])
        after = self._decode(self.ids[self.prefix:])
        if len(after) > len(before) and not after.endswith("\ufffd"):
            self.text += after[len(before):]
            self.prefix, self.read = self.read, len(self.ids)
        return self._release()

    def finish(self) -> str:
        """The text still held back, at the end of the request (a character cut off by the end stays as U+FFFD, as
        decoding all the ids at once writes it)."""
        if self.stopped:
            return ""
        if self.read < len(self.ids):
            before = self._decode(self.ids[self.prefix:self.read])
            self.text += self._decode(self.ids[self.prefix:])[len(before):]
            self.read = len(self.ids)
        released, stopped = self._release()
        if stopped:
            return released
        released += self.text[self.sent:]
        self.sent = len(self.text)
        return released

    def _release(self) -> tuple:
        if self.stop:
            start = max(0, self.checked - self.hold)
            hits = [found for found in (self.text.find(stop, start) for stop in self.stop) if found >= 0]
            if hits:
                self.text, self.stopped = self.text[:min(hits)], True
                released, self.sent = self.text[self.sent:], len(self.text)
                return released, True
            self.checked = len(self.text)
        end = max(self.sent, len(self.text) - self.hold)
        released, self.sent = self.text[self.sent:end], end
        return released, False
