"""Answers as paths through a byte-level automaton, and which tokens keep an answer on one.

An answer format is a graph (``Grammar``): nodes joined by edges, each edge one element —
``Literal`` (fixed bytes: brackets, separators, ``NAN``), ``OneOf`` (one of a set of strings: the schema's
relation / entity-type names, any of which may be a prefix of another) or ``Span`` (a non-empty substring of the
input text, on UTF-8 character boundaries, matched with a suffix automaton of the input: every occurrence at once, so
repeated entities and spans that end inside a token cost nothing). A ``State`` is the set of places an answer's
bytes so far can have reached (a span and a separator may both explain a comma); it is advanced byte by byte, so a
token that straddles the edge of a span (``Paris,``) is followed through the span, out of it and into the
separator. ``Grammar.accepts`` says where the answer may end; nowhere else.

``allowed_tokens`` walks a trie of the vocabulary's token bytes from a state and keeps the tokens whose every byte
stays on a path: the mask of one decode step (plus end-of-sequence where the answer may end).
"""
from dataclasses import dataclass, field


class SuffixAutomaton:
    """The substrings of ``data`` (bytes): ``step(state, byte)`` is the state after one more byte or ``None``."""

    def __init__(self, data: bytes):
        self.next, self.link, self.length = [{}], [-1], [0]
        last = 0
        for byte in data:
            current = len(self.next)
            self.next.append({})
            self.length.append(self.length[last] + 1)
            self.link.append(0)
            state = last
            while state != -1 and byte not in self.next[state]:
                self.next[state][byte] = current
                state = self.link[state]
            if state != -1:
                other = self.next[state][byte]
                if self.length[state] + 1 == self.length[other]:
                    self.link[current] = other
                else:
                    clone = len(self.next)
                    self.next.append(dict(self.next[other]))
                    self.length.append(self.length[state] + 1)
                    self.link.append(self.link[other])
                    while state != -1 and self.next[state].get(byte) == other:
                        self.next[state][byte] = clone
                        state = self.link[state]
                    self.link[other] = self.link[current] = clone
            last = current

    def step(self, state, byte):
        return self.next[state].get(byte)


@dataclass(frozen=True)
class Literal:
    text: bytes


@dataclass(frozen=True)
class OneOf:
    names: tuple            # bytes, any may be a prefix of another


@dataclass(frozen=True)
class Span:
    automaton: SuffixAutomaton = field(compare=False, hash=False)   # of ``span_source``'s bytes


BOUNDARY = 0xFF                             # never in UTF-8: marks where no span may reach across


def span_source(text, forbidden=frozenset()) -> bytes:
    """``text`` as UTF-8 with each ``forbidden`` character (a format's own delimiters) replaced by ``BOUNDARY``:
    the substrings of the result are the spans that hold none of them, and no span can run into one and stall."""
    return b"".join(bytes([BOUNDARY]) if c in forbidden else c.encode("utf-8") for c in text)


_LOOSE_END = frozenset(" \t\r\n,，")      # a span ending on these would parse as another string (stripped, split)


def _starts_word(byte):
    """A span starts on a letter or digit, or on any non-ASCII character (CJK text, accented names)."""
    return byte >= 0xC0 or (byte < 0x80 and chr(byte).isalnum())


def _pending(byte):
    """Continuation bytes that follow a UTF-8 lead byte (0 for ASCII)."""
    return 3 if byte >= 0xF0 else 2 if byte >= 0xE0 else 1 if byte >= 0xC0 else 0


class Grammar:
    """Nodes ``0..n``; ``edges[node]``: ``(element, next node)`` pairs; the answer may end at ``accept`` nodes."""

    def __init__(self):
        self.edges, self.accept, self.masks = [[]], set(), {}

    def node(self) -> int:
        self.edges.append([])
        return len(self.edges) - 1

    def add(self, source, element, target):
        self.edges[source].append((element, target))

    def start(self) -> "State":
        return State(frozenset({("at", 0)}))

    def accepts(self, state) -> bool:
        return any(config[0] == "at" and config[1] in self.accept for config in state.configs)

    # A config is ("at", node) between elements, or ("in", node, edge index, progress) inside one:
    # Literal: bytes matched; OneOf: the prefix so far; Span: (automaton state, bytes of an unfinished character,
    # last character).
    def advance(self, state, byte) -> "State":
        found = set()
        for config in state.configs:
            found.update(self._step(config, byte))
        return State(frozenset(found))

    def _step(self, config, byte):
        if config[0] == "at":
            for index in range(len(self.edges[config[1]])):
                yield from self._step(("in", config[1], index, None), byte)
            return
        _, node, index, progress = config
        element, target = self.edges[node][index]
        if isinstance(element, Literal):
            done = progress or 0
            if element.text[done] == byte:
                yield ("at", target) if done + 1 == len(element.text) else ("in", node, index, done + 1)
        elif isinstance(element, OneOf):
            prefix = (progress or b"") + bytes([byte])
            if any(name.startswith(prefix) for name in element.names):
                yield ("in", node, index, prefix)
            if prefix in element.names:
                yield ("at", target)
        else:
            if progress is not None and not progress[1] and progress[2] not in _LOOSE_END:
                yield from self._step(("at", target), byte)     # a span ends on a character, not on a blank
            if byte == BOUNDARY or (progress is None and not _starts_word(byte)):
                return                                          # it starts on a letter, digit or CJK character
            automaton_state = element.automaton.step(0 if progress is None else progress[0], byte)
            if automaton_state is None:
                return
            pending = (progress[1] if progress else b"") + bytes([byte])
            if len(pending) < 1 + _pending(pending[0]):         # inside a multi-byte character
                yield ("in", node, index, (automaton_state, pending, progress[2] if progress else ""))
                return
            yield ("in", node, index, (automaton_state, b"", pending.decode("utf-8")))


@dataclass(frozen=True)
class State:
    configs: frozenset

    def __bool__(self):
        return bool(self.configs)


def advance_bytes(grammar, state, data: bytes) -> State:
    for byte in data:
        state = grammar.advance(state, byte)
        if not state:
            break
    return state


class VocabularyTrie:
    """The vocabulary's token bytes as a trie: ``children`` per node, the token ids that end at it."""

    def __init__(self, token_bytes):
        self.children, self.ends = [{}], [[]]
        for token, data in enumerate(token_bytes):
            if not data:
                continue                            # special tokens (and empty pieces) are never part of an answer
            node = 0
            for byte in data:
                child = self.children[node].get(byte)
                if child is None:
                    child = len(self.children)
                    self.children[node][byte] = child
                    self.children.append({})
                    self.ends.append([])
                node = child
            self.ends[node].append(token)


def allowed_tokens(grammar, trie, state) -> list:
    """Token ids whose bytes, all of them, keep ``state`` on a path of ``grammar``; remembered per state, since the
    same states recur (the start of every tuple, of every span)."""
    key = (id(trie), state)
    if key not in grammar.masks:
        grammar.masks[key] = _walk(grammar, trie, state)
    return grammar.masks[key]


def _walk(grammar, trie, state) -> list:
    allowed, stack = [], [(0, state)]
    while stack:
        node, current = stack.pop()
        for byte, child in trie.children[node].items():
            following = grammar.advance(current, byte)
            if following:
                allowed.extend(trie.ends[child])
                stack.append((child, following))
    return allowed
