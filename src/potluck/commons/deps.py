"""Who is asking, for the commons' routes: the bearer token, the caller, the role a route needs, and the
path parameters every route group shares (FastAPI dependencies, apart from the routes that use them)."""

# No `from __future__ import annotations`: FastAPI reads these annotations as live objects.
from typing import Annotated

from fastapi import Depends, Path, Query, Request
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer

from potluck.commons.auth import NAME_PATTERN, role_allows
from potluck.commons.errors import Forbidden, Unauthorized
from potluck.commons.models import Contributor
from potluck.commons.service import Commons

Name = Annotated[str, Path(pattern=NAME_PATTERN, description="2-63 characters of a-z, 0-9 and '-'")]
Sha = Annotated[str | None, Query(pattern=r"^[0-9a-f]{64}$", description="sha256 of the body, checked on arrival")]
bearer = HTTPBearer(auto_error=False, description="a token from `potluck commons init` or `invite`")


def commons_of(request: Request) -> Commons:
    return request.app.state.commons


def caller(request: Request, credentials: Annotated[HTTPAuthorizationCredentials | None, Depends(bearer)]) -> Contributor:
    if credentials is None:
        raise Unauthorized("no token: pass --token or set POTLUCK_TOKEN (Authorization: Bearer <token>)")
    return commons_of(request).registry.authenticate(credentials.credentials)


def role(needed: str):
    def check(who: Annotated[Contributor, Depends(caller)]) -> Contributor:
        if not role_allows(who.role, needed):
            raise Forbidden(f"{who.name} is a {who.role}; this needs a {needed}")
        return who
    return check


Reader = Annotated[Contributor, Depends(role("reader"))]
Member = Annotated[Contributor, Depends(role("contributor"))]
Admin = Annotated[Contributor, Depends(role("admin"))]
CommonsDep = Annotated[Commons, Depends(commons_of)]
