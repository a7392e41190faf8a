"""The one exception type a user sees: a message that says what, where and what to do."""


class TokbenchError(Exception):
    """A problem with the user's input or configuration.

    The CLI prints ``error: <message>`` on one line and exits with status 2, without a
    traceback. The message names the file, key or column and what was expected.
    """
