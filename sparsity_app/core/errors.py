"""The one exception type that means "the user asked for something invalid"."""


class UserError(ValueError):
    """A bad request, stated in one line that tells the user what to change.

    The CLI prints it on stderr and exits non-zero; the app shows it on the page. Anything else
    that escapes the engine is a bug.
    """


class CompileError(RuntimeError):
    """TVM could not compile a kernel: an engine failure (not bad input), stated in one line."""


def one_line(error: BaseException | str, limit: int = 300) -> str:
    """The first non-empty line of an error's message, cut to `limit` characters.

    TVM's errors carry a whole C++ traceback in their message; a page or a terminal shows one line.
    """
    text = str(error)
    line = next((l.strip() for l in text.splitlines() if l.strip()), "") or type(error).__name__
    return line if len(line) <= limit else line[:limit - 3] + "..."
