"""Error types that the CLI turns into one-line messages and exit codes.

``UsageError`` is a mistake in what the user asked or gave (exit 2): a flag, a path, a data folder, a
checkpoint or export that cannot be used as it is; ``FixresError`` is a failure while doing it (exit 1).
Library code raises these with a message a user can act on.
"""


class FixresError(RuntimeError):
    """A runtime failure with a message meant for the user (exit code 1)."""

    exit_code = 1


class UsageError(FixresError):
    """A bad argument, path or combination of options (exit code 2)."""

    exit_code = 2
