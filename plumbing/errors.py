"""errors.py: UserError, the one exception type that means "the user's input is wrong", not "the
code is wrong".

Raised where our own validation rejects input (an unknown model, task or expert, a missing or
malformed data file, a hub checkpoint that is not cached while offline, ...), with a message that
says what to do. train.py's command line prints such an error as `error: <message>` and exits with
status 2; every other exception is a bug and keeps its traceback. It subclasses ValueError so that
callers that catch ValueError keep working.
"""


class UserError(ValueError):
    """Bad input from the user; the message alone (no traceback) is the whole report."""
