"""The one exception type for user mistakes: the CLI prints it as a single line, no traceback."""


class LoramixError(Exception):
    """A problem the user can fix: the message names what is wrong and how to fix it."""
