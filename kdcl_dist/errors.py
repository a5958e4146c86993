"""One exception type for user-facing errors.

The CLI prints `kdcl-dist: error: <message>` on one line and exits with status 2.
A message names the file or key at fault and what to do about it.
"""


class UserError(Exception):
    """A problem with the user's input, flags or files (not a bug in kdcl_dist)."""
