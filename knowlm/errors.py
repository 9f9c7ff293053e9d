"""The one exception type knowlm raises for bad user input, and how any error is told in one line.

Its message is a single line naming the file, key or value that was wrong and what was expected; the CLI prints
it as ``knowlm: error: <message>`` without a traceback.
"""


class KnowLMError(ValueError):
    """Bad input: a file, key or value that is not what knowlm expected."""


def first_line(err) -> str:
    """The first line of an exception's message (its type's name when it has none): for one-line reports."""
    text = str(err).strip()
    return text.splitlines()[0] if text else type(err).__name__
