"""The one exception type users see: a one-line message naming the problem and the fix."""


class UserError(Exception):
    """Bad input from the user (recipe, paths, models). The CLI prints it as one line, no traceback."""


def first_line(err: BaseException) -> str:
    """The first line of an exception's message (its type name when the message is empty), for one-line errors."""
    text = str(err).strip()
    return text.splitlines()[0] if text else type(err).__name__
