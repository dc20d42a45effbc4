"""The one exception type for a user's mistake or an environment problem.

The CLI prints `error: <message>` on one line and exits with code 2; library callers catch
`LowvramError`. Messages say what is wrong and what to do about it.
"""


class LowvramError(Exception):
    exit_code = 2


class CheckpointError(LowvramError):
    """A checkpoint file or directory is missing, unreadable or malformed."""
