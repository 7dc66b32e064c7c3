"""Bearer-token checks for the management API (and, when configured, for /classify), compared in constant time."""

from __future__ import annotations

import hmac
from collections.abc import Callable

from fastapi import Security
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer

from .errors import Unauthorized

_bearer = HTTPBearer(auto_error=False, description="`Authorization: Bearer <token>`")
_CREDENTIALS = Security(_bearer)


def _same(given: str, expected: str) -> bool:
    return hmac.compare_digest(given.encode(), expected.encode())


class TokenCheck:
    """A FastAPI dependency that needs `Authorization: Bearer <the expected token>` (or the `also` token).

    While `expected` returns None (before start-up has resolved the admin token) every request is refused.
    """

    def __init__(
        self, expected: Callable[[], str | None], name: str, also: Callable[[], str | None] | None = None
    ) -> None:
        self.expected = expected
        self.name = name
        self.also = also

    def __call__(self, credentials: HTTPAuthorizationCredentials | None = _CREDENTIALS) -> None:
        expected = self.expected()
        if expected is None:
            raise Unauthorized(f"the server has no {self.name} token yet")
        if credentials is None:
            where = (
                "CLIPBANK_ADMIN_TOKEN or --token for the clipbank commands; a server started without one saved "
                "the token it generated in the store folder's .admin-token file"
                if self.name == "admin"
                else f"CLIPBANK_{self.name.upper()}_TOKEN or --token for the clipbank commands"
            )
            raise Unauthorized(f"this endpoint needs 'Authorization: Bearer <{self.name} token>' ({where})")
        given = credentials.credentials
        ok = _same(given, expected)
        also = self.also() if self.also is not None else None
        if also is not None:
            ok = _same(given, also) or ok  # both compared, so timing does not tell which one was tried
        if not ok:
            raise Unauthorized(f"the bearer token is not a valid {self.name} token")
