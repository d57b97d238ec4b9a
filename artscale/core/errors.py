"""The one exception type for a user's mistake: the CLI prints it as one line and exits 2."""


class UserError(Exception):
    """Something the user can fix (a path, a flag, a file); the message says what and how."""
