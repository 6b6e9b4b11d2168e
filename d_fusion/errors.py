"""The one error type for bad input: entry scripts print its message and exit, without a traceback."""


class UserError(Exception):
    """Input the user can fix (a path, a config value, a data file); the message says how."""
