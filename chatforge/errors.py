"""The one error type users see.

Code that detects bad input (a missing path, an empty corpus, a corrupt checkpoint)
raises ChatforgeError with a message that says what to fix; the CLI prints it as a
single line and exits non-zero instead of showing a traceback.
"""


class ChatforgeError(Exception):
    """A problem with the user's input or environment, explained in one line."""
