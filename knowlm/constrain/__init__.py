"""Constrained extraction: at each decode step, only tokens that keep the answer valid in its format, with names from
the schema and entities from the input text (``automaton``: the machinery; ``formats``: each format's grammar)."""
