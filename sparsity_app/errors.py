"""The one exception type that means "the user asked for something invalid"."""


class UserError(ValueError):
    """A bad request, stated in one line that tells the user what to change.

    The CLI prints it on stderr and exits non-zero; the app shows it on the page. Anything else
    that escapes the engine is a bug.
    """
