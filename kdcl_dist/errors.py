"""One exception type for user-facing errors.

The CLI prints `kdcl-dist: error: <message>` on one line and exits with status 2.
A message names the file or key at fault and what to do about it.
"""

from collections.abc import Iterator


class UserError(Exception):
    """A problem with the user's input, flags or files (not a bug in kdcl_dist)."""


def exception_chain(exc: BaseException) -> Iterator[BaseException]:
    """`exc`, then everything it was raised from or during (__cause__ / __context__), each once."""
    seen, todo = set(), [exc]
    while todo:
        e = todo.pop()
        if e is None or id(e) in seen:
            continue
        seen.add(id(e))
        yield e
        todo += [e.__cause__, e.__context__]
