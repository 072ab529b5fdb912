"""Who may do what in the commons: bearer tokens (stored hashed), roles and names.

A token is `pk_` + 32 random bytes (URL-safe base64). Only its sha256 is stored, so a stolen database
does not hand out working tokens; the token itself is shown once, when it is made. Roles are ordered:
a reader pulls and looks, a contributor also shares, pushes and lends compute on its own tasks, an admin
also invites and runs rounds.
"""

from __future__ import annotations

import hashlib
import re
import secrets

ROLES = ("reader", "contributor", "admin")  # each role may do what the ones before it may
NAME_PATTERN = r"^[a-z0-9][a-z0-9-]{1,62}$"
_NAME = re.compile(NAME_PATTERN)
TOKEN_PREFIX = "pk_"


class InvalidName(ValueError):
    """A contributor or task name that does not follow the rules."""


def new_token() -> str:
    """A fresh secret token (shown once to its owner, never stored)."""
    return TOKEN_PREFIX + secrets.token_urlsafe(32)


def hash_token(token: str) -> str:
    """The sha256 hex of a token: what the registry stores and looks up."""
    return hashlib.sha256(token.encode("utf-8")).hexdigest()


def role_allows(role: str, needed: str) -> bool:
    """True when `role` is at least `needed` in the order reader < contributor < admin."""
    return ROLES.index(role) >= ROLES.index(needed)


def check_name(name: str, kind: str = "name") -> str:
    """Return `name` when it is 2-63 characters of a-z, 0-9 and '-', starting with a letter or digit."""
    if not isinstance(name, str) or not _NAME.match(name):
        raise InvalidName(f"{kind} {name!r} is not allowed: use 2-63 characters of a-z, 0-9 and '-', "
                         "starting with a letter or digit")
    return name


def check_role(role: str) -> str:
    if role not in ROLES:
        raise InvalidName(f"unknown role {role!r}: use one of {', '.join(ROLES)}")
    return role
