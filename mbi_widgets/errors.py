"""The package's one error tree: every failure a user can meet is an MbiError with a next step."""
from __future__ import annotations


class MbiError(Exception):
    """Root of every error raised by mbi_widgets.

    `code` is machine-readable where the protocol has one (an OAuth `error`, a Stripe error
    `code`); the message says what happened and what to do next.
    """

    def __init__(self, message: str, *, code: str | None = None) -> None:
        super().__init__(message)
        self.code = code


class SandboxError(MbiError):
    """The embedded Stripe sandbox could not start or was used incorrectly."""
