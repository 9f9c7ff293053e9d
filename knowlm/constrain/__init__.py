"""Constrained extraction: at each decode step, only tokens that keep the answer valid in its format, with names from
the schema and entities from the input text, ended within the token budget.

``automaton`` (the machinery: a grammar of literals, names and input spans, walked byte by byte; the vocabulary as a
trie), ``formats`` (each answer format's grammar), ``vocab`` (each token's bytes), ``constraint`` (one answer's
state: the allowed tokens, the budget), ``decode`` (the ``pick`` function ``KnowLMForCausalLM.generate`` calls at each
step: greedy or seeded sampling among the allowed tokens). ``knowlm.generate.generate(..., grammars=)``,
``knowlm.ie.extract.extract(..., constrained=True)``, ``knowlm extract --constrained`` and ``/v1/extract``
(``"constrained": true``, on the server's engine) use them.
"""
