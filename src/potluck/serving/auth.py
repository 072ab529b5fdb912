"""Optional bearer-token auth: tokens from a file, kept only as SHA-256 digests, compared in constant time.

    potluck serve models/urgency --api-key-file keys.txt     # one token per line; '#' starts a comment
    curl -H "Authorization: Bearer $TOKEN" localhost:8080/v1/models/urgency/predict -d '{"inputs": "hi"}'
"""

from __future__ import annotations

import hashlib
import hmac
import os
from pathlib import Path

from potluck.errors import UserError

MIN_TOKEN_LENGTH = 16


def _digest(token: str) -> bytes:
    return hashlib.sha256(token.encode("utf-8")).digest()


class KeyRing:
    """The SHA-256 digests of the accepted tokens (the tokens themselves are not kept)."""

    def __init__(self, tokens: list[str]):
        self._digests = [_digest(t) for t in tokens]

    @classmethod
    def from_file(cls, path: str | os.PathLike) -> KeyRing:
        path = Path(path)
        if not path.is_file():
            raise UserError(f"no such API key file: {path}", hint="give a text file with one token per line")
        tokens = []
        for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), start=1):
            token = line.strip()
            if not token or token.startswith("#"):
                continue
            if len(token) < MIN_TOKEN_LENGTH or any(c.isspace() for c in token):
                raise UserError(f"{path}, line {number}: a token must be at least {MIN_TOKEN_LENGTH} characters "
                                "without spaces", hint="generate one with: python -c 'import secrets; "
                                                       "print(secrets.token_urlsafe(32))'")
            tokens.append(token)
        if not tokens:
            raise UserError(f"{path} holds no tokens", hint="put one token per line")
        return cls(tokens)

    def __len__(self) -> int:
        return len(self._digests)

    def check(self, authorization: str | None) -> bool:
        """True for an `Authorization: Bearer <token>` header carrying a known token."""
        scheme, _, token = (authorization or "").partition(" ")
        if scheme.lower() != "bearer" or not token.strip():
            return False
        digest = _digest(token.strip())
        found = False
        for known in self._digests:  # look at every digest, so the time taken says nothing about which
            found |= hmac.compare_digest(digest, known)
        return found
