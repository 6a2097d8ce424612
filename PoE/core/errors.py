"""User-facing errors: the entry scripts print their message on one line and exit non-zero."""


class PoEError(Exception):
    """Bad input or a missing/mismatched file; the message says what was wrong and what is accepted."""

    exit_code = 2
