"""The one exception type users see: a one-line message naming the problem and the fix."""


class UserError(Exception):
    """Bad input from the user (recipe, paths, models). The CLI prints it as one line, no traceback."""
