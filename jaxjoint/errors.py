"""The one exception type for errors a user can cause and fix."""


class UserError(Exception):
    """A problem with the user's input (path, config, model, data).

    The CLI prints ``str(error)`` as one line and exits non-zero, without a
    traceback; library callers can catch it like any exception.
    """
