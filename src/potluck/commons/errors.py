"""Errors of the commons service, each with the HTTP status the API answers with.

The registry and the checks raise them; the API turns them into `{"detail": "..."}` responses and the
client turns those back into one-line `UserError`s.
"""

from __future__ import annotations


class CommonsError(Exception):
    """Something the caller asked for cannot be done; `str()` says what and why."""

    status = 400


class Unauthorized(CommonsError):
    status = 401


class Forbidden(CommonsError):
    status = 403


class NotFound(CommonsError):
    status = 404


class Conflict(CommonsError):
    status = 409


class LeaseLost(Conflict):
    """The job's lease expired or went to another worker: its result is no longer wanted."""


class TooLarge(CommonsError):
    status = 413


class Rejected(CommonsError):
    """A contribution failed a check on arrival; the reason is recorded and returned."""

    status = 422

    def __init__(self, reason: str, *, status: int = 422, base_version: int | None = None):
        super().__init__(reason)
        self.reason, self.status, self.base_version = reason, status, base_version
