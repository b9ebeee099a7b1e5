"""The one exception type a step turns into a clear message instead of a traceback."""


class UserError(RuntimeError):
    """A failure the user can fix. The message says what was wrong and how to fix it."""
