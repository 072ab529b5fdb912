"""The one exception type for a user's mistake.

A `UserError` carries one line that says what is wrong, where, and what to do. The CLI prints that
line and exits non-zero; it never shows a traceback for one. `potluck.data.DataError` is a kind of
it too (see `data.py`).
"""

from __future__ import annotations


class UserError(ValueError):
    """A mistake the user can fix: a bad path, a bad option, a model folder that is not ours."""

    def __init__(self, message: str, *, hint: str | None = None):
        self.message = message
        self.hint = hint
        super().__init__(f"{message}. {hint[:1].upper()}{hint[1:]}" if hint else message)


class NonFiniteOutput(UserError):
    """The model gave NaN or inf for a text: never passed on as a probability."""


def require(*rules) -> None:
    """Raise a UserError for the first `(ok, message)` or `(ok, message, hint)` rule that does not hold:
    every settings dataclass checks its fields with this in `__post_init__`."""
    for ok, message, *hint in rules:
        if not ok:
            raise UserError(message, hint=hint[0] if hint else None)
