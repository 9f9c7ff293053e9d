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


def describe(err):
    """One line for the failures bad input or the system cause (a file that cannot be read or written, text that is
    not UTF-8), or None for anything else: a bug, which deserves its traceback."""
    if isinstance(err, KnowLMError):
        return str(err)
    if isinstance(err, UnicodeDecodeError):
        return f"not UTF-8 text ({first_line(err)}); expected UTF-8"
    if isinstance(err, OSError) and err.strerror:
        return f"{err.filename}: {err.strerror}" if err.filename is not None else err.strerror
    return None
