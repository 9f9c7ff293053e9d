"""The one exception type knowlm raises for bad user input.

Its message is a single line naming the file, key or value that was wrong and what was expected; the CLI prints
it as ``knowlm: error: <message>`` without a traceback.
"""


class KnowLMError(ValueError):
    """Bad input: a file, key or value that is not what knowlm expected."""
