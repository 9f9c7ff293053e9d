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
from functools import lru_cache


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
    slack: int = 4              # bytes that always suffice to end a span begun anywhere (``span_of``)


INF = float("inf")
BOUNDARY = 0xFF                             # never in UTF-8: marks where no span may reach across
WORD_EDGE = 0xFE                            # never in UTF-8: where a word of ASCII letters and digits starts or ends


def _ascii_word(c):
    return c.isascii() and c.isalnum()


def span_source(text, forbidden=frozenset()) -> bytes:
    """``text`` as UTF-8 with each ``forbidden`` character (a format's own delimiters) replaced by ``BOUNDARY``, and
    ``WORD_EDGE`` wherever an ASCII word starts or ends: the substrings of the result are the spans that hold no
    forbidden character (none can run into one and stall), and a span reads whole words of alphabetic text
    ("Paris", never "aris" or "Par"), while CJK text, which has no such edges, may be cut anywhere."""
    out, previous = [], ""
    for c in text:
        if _ascii_word(c) != _ascii_word(previous) and (previous or _ascii_word(c)):
            out.append(bytes([WORD_EDGE]))
        out.append(bytes([BOUNDARY]) if c in forbidden else c.encode("utf-8"))
        previous = c
    if _ascii_word(previous):
        out.append(bytes([WORD_EDGE]))
    return b"".join(out)


_LOOSE_END = frozenset(" \t\r\n,，")      # a span ending on these would parse as another string (stripped, split)


@lru_cache(maxsize=32)
def span_of(text, forbidden=frozenset()) -> Span:
    """The ``Span`` element of ``text``'s substrings that hold no ``forbidden`` character; built once for the prompts
    a record's schema is split over (a span holds no decoding state: grammars share it)."""
    longest = run = 0
    for c in text:          # the longest run of characters a span may not end on: what ending it can take
        run = run + 1 if c in _LOOSE_END else 0
        longest = max(longest, run)
    return Span(SuffixAutomaton(span_source(text, forbidden)), 4 * (longest + 1))


def _starts_word(byte):
    """A span starts on a letter or digit, or on any non-ASCII character (CJK text, accented names)."""
    return byte >= 0xC0 or (byte < 0x80 and chr(byte).isalnum())


def _pending(byte):
    """Continuation bytes that follow a UTF-8 lead byte (0 for ASCII)."""
    return 3 if byte >= 0xF0 else 2 if byte >= 0xE0 else 1 if byte >= 0xC0 else 0


# Inside a span, progress is (automaton state, bytes of an unfinished character, last whole character); None before
# its first byte.
def _span_step(automaton, progress, byte):
    """The progress after one more byte, or None where the span cannot take it."""
    if byte >= WORD_EDGE or (progress is None and not _starts_word(byte)):
        return None                                     # it starts on a letter, digit or CJK character
    state, last = (0, "") if progress is None else (progress[0], progress[2])
    if not (progress and progress[1]) and (byte < 0x80 and chr(byte).isalnum()) != _ascii_word(last):
        # The byte starts a character of the other kind than the last one (ASCII word or not): an ASCII word starts
        # or ends between them, which the input marks with an edge.
        state = automaton.step(state, WORD_EDGE)
        if state is None:
            return None
    state = automaton.step(state, byte)
    if state is None:
        return None
    pending = (progress[1] if progress else b"") + bytes([byte])
    if len(pending) < 1 + _pending(pending[0]):         # inside a multi-byte character
        return (state, pending, last)
    return (state, b"", pending.decode("utf-8"))


def _span_may_end(automaton, progress):
    """A span ends on a whole character that is not a blank or a comma, and an ASCII word only where it ends."""
    if progress is None or progress[1] or progress[2] in _LOOSE_END:
        return False
    return not _ascii_word(progress[2]) or automaton.step(progress[0], WORD_EDGE) is not None


def _next_bytes(automaton, progress):
    state = 0 if progress is None else progress[0]
    found = set(automaton.next[state])
    edge = automaton.step(state, WORD_EDGE)
    return found | set(automaton.next[edge]) if edge is not None else found


def _span_finish(automaton, progress):
    """The fewest bytes after which the span could end (breadth first through the input); None if it never can."""
    frontier, seen, depth = [progress], set(), 0
    while frontier:
        if any(_span_may_end(automaton, p) for p in frontier):
            return depth
        following = []
        for p in frontier:
            for byte in _next_bytes(automaton, p):
                q = _span_step(automaton, p, byte)
                if q is not None and q not in seen:
                    seen.add(q)
                    following.append(q)
        frontier, depth = following, depth + 1
    return None


class Grammar:
    """Nodes ``0..n``; ``edges[node]``: ``(element, next node)`` pairs; the answer may end at ``accept`` nodes."""

    def __init__(self):
        self.edges, self.accept, self.masks = [[]], set(), {}
        self.distances, self.node_distances, self.first_bytes = {}, None, {}

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
    # Literal: bytes matched; OneOf: the prefix so far; Span: see ``_span_step``.
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
            if _span_may_end(element.automaton, progress):
                yield from self._step(("at", target), byte)     # a span ends on a character, not on a blank
            following = _span_step(element.automaton, progress, byte)
            if following is not None:
                yield ("in", node, index, following)

    def next_bytes(self, state) -> set:
        """The bytes that may follow ``state``: a superset (``advance`` decides), so that a walk of the vocabulary's
        trie follows a few of a node's children, not all 256."""
        found = set()
        for config in state.configs:
            found |= self._config_bytes(config)
        return found

    def _config_bytes(self, config):
        if config[0] == "at":
            node = config[1]
            if node not in self.first_bytes:
                self.first_bytes[node] = set().union(*(self._element_bytes(element, None)
                                                       for element, _ in self.edges[node]))
            return self.first_bytes[node]
        _, node, index, progress = config
        element, target = self.edges[node][index]
        found = self._element_bytes(element, progress)
        if isinstance(element, Span) and _span_may_end(element.automaton, progress):
            found = found | self._config_bytes(("at", target))
        return found

    @staticmethod
    def _element_bytes(element, progress):
        if isinstance(element, Literal):
            return {element.text[progress or 0]}
        if isinstance(element, OneOf):
            prefix = progress or b""
            return {name[len(prefix)] for name in element.names if len(name) > len(prefix) and name.startswith(prefix)}
        return _next_bytes(element.automaton, progress)

    # ---- how far an answer is from its end, in bytes: what keeps it inside a token budget (``constraint``)

    def distance(self, state) -> float:
        """The fewest bytes that take ``state`` to a place where the answer may end (inf: none do)."""
        found = self.distances.get(state)
        if found is None:
            found = self.distances[state] = min((self._config_distance(c) for c in state.configs), default=INF)
        return found

    def horizon(self) -> float:
        """A bound on ``distance`` of any state: closer to the budget's end than this, tokens are checked."""
        nodes = [d for d in self._node_distances() if d < INF]
        inner = [len(e.text) if isinstance(e, Literal) else max(map(len, e.names)) if isinstance(e, OneOf)
                 else e.slack for edges in self.edges for e, _ in edges]
        return max(nodes, default=0) + max(inner, default=0)

    def _node_distances(self):
        if self.node_distances is None:
            found = [0 if node in self.accept else INF for node in range(len(self.edges))]
            for _ in range(len(self.edges)):            # Bellman-Ford: edges have positive lengths
                for node, edges in enumerate(self.edges):
                    for element, target in edges:
                        found[node] = min(found[node], self._shortest(element) + found[target])
            self.node_distances = found
        return self.node_distances

    def _shortest(self, element):
        if isinstance(element, Literal):
            return len(element.text)
        if isinstance(element, OneOf):
            return min(map(len, element.names))
        finish = _span_finish(element.automaton, None)
        return INF if finish is None else finish

    def _config_distance(self, config):
        nodes = self._node_distances()
        if config[0] == "at":
            return nodes[config[1]]
        _, node, index, progress = config
        element, target = self.edges[node][index]
        if isinstance(element, Literal):
            inner = len(element.text) - (progress or 0)
        elif isinstance(element, OneOf):
            inner = min(len(name) - len(progress) for name in element.names if name.startswith(progress))
        else:
            finish = _span_finish(element.automaton, progress)
            inner = INF if finish is None else finish
        return inner + nodes[target]


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
        grammar.masks[key] = [token for token, _ in walk(grammar, trie, state)]
    return grammar.masks[key]


def walk(grammar, trie, state, node=0) -> list:
    """``(token, state after it)`` for every token below trie node ``node`` whose bytes from there keep ``state`` on
    a path of ``grammar``."""
    found, stack = [], [(node, state)]
    while stack:
        node, current = stack.pop()
        children = trie.children[node]
        for byte in grammar.next_bytes(current):
            child = children.get(byte)
            if child is None:
                continue
            following = grammar.advance(current, byte)
            if following:
                found.extend((token, following) for token in trie.ends[child])
                stack.append((child, following))
    return found
