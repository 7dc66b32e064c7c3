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
        self.check(credentials.credentials if credentials is not None else None)

    def refusal(self, headers: list[tuple[bytes, bytes]]) -> Unauthorized | None:
        """What the dependency would raise for a request with these raw headers (None: let in). The body limit
        asks it before refusing a body as too large: a client without the token learns that first. The first
        Authorization header counts, as for the dependency."""
        given = next((value for name, value in headers if name == b"authorization"), b"")
        scheme, _, token = given.decode("latin-1").partition(" ")
        try:
            self.check(token.strip() if scheme.lower() == "bearer" and token.strip() else None)
        except Unauthorized as e:
            return e
        return None

    def check(self, given: str | None) -> None:
        """Raise Unauthorized unless `given` (a bearer token, None when none was sent) is a valid token."""
        expected = self.expected()
        if expected is None:
            raise Unauthorized(f"the server has no {self.name} token yet")
        if given is None:
            where = (
                "CLIPBANK_ADMIN_TOKEN (or CLIPBANK_ADMIN_TOKEN_FILE) or --token for the clipbank commands; a server "
                "started without one saved the token it generated in the store folder's .admin-token file"
                if self.name == "admin"
                else f"CLIPBANK_{self.name.upper()}_TOKEN (or its _FILE form) or --token for the clipbank commands"
            )
            raise Unauthorized(f"this endpoint needs 'Authorization: Bearer <{self.name} token>' ({where})")
        ok = _same(given, expected)
        also = self.also() if self.also is not None else None
        if also is not None:
            ok = _same(given, also) or ok  # both compared, so timing does not tell which one was tried
        if not ok:
            raise Unauthorized(f"the bearer token is not a valid {self.name} token")
