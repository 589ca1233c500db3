"""The one exception type the command line turns into a clean message.

Every message is a sentence that names the file, key or value at fault and
says what would have been accepted (STYLE.md, habit 11).
"""


class MeddapError(Exception):
    """Bad input or a broken file, explained for the user; no traceback needed."""
