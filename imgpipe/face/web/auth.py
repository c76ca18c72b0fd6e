"""API keys on every request: ``Authorization: Bearer <token>`` or ``X-API-Key: <token>``.

No key, an unknown key or a revoked key: 401. A key without the endpoint's scope: 403.
Keys are created with ``imgpipe apikey create`` (db/apikeys.py).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Annotated

from fastapi import Depends
from fastapi.security import APIKeyHeader, HTTPAuthorizationCredentials, HTTPBearer

from db.apikeys import ApiKeyInfo, Scope, find_key
from imgpipe.face.web.context import WebContext, web_context
from imgpipe.face.web.errors import ApiError

__all__ = ["require"]

MAX_TOKEN_CHARS = 200

_bearer = HTTPBearer(auto_error=False, description="An API key from `imgpipe apikey create`.")
_header = APIKeyHeader(
    name="X-API-Key", auto_error=False, description="The same key, in a header of its own."
)
_CHALLENGE = {"WWW-Authenticate": "Bearer"}


def require(*scopes: Scope) -> Callable[..., ApiKeyInfo]:
    """A dependency that returns the caller's key when it has one of ``scopes``."""
    wanted = " or ".join(str(s) for s in scopes)

    def dependency(
        ctx: Annotated[WebContext, Depends(web_context)],
        bearer: Annotated[HTTPAuthorizationCredentials | None, Depends(_bearer)],
        header: Annotated[str | None, Depends(_header)],
    ) -> ApiKeyInfo:
        token = bearer.credentials if bearer is not None else header
        if not token:
            raise ApiError(
                401,
                "unauthorized",
                "no API key: send `Authorization: Bearer <token>` (or `X-API-Key: <token>`); "
                f"an operator creates one with `imgpipe apikey create --scope {scopes[0]} "
                "--name NAME`",
                _CHALLENGE,
            )
        key = find_key(ctx.database_url, token) if len(token) <= MAX_TOKEN_CHARS else None
        if key is None:
            raise ApiError(
                401,
                "unauthorized",
                "unknown API key; check the token (it is shown once, at `imgpipe apikey "
                "create`) or ask an operator for a new one",
                _CHALLENGE,
            )
        if key.revoked_at is not None:
            raise ApiError(
                401,
                "unauthorized",
                f"API key {key.prefix}... ({key.name}) was revoked at "
                f"{key.revoked_at.isoformat(timespec='seconds')}; ask an operator for a new one",
                _CHALLENGE,
            )
        if not any(key.allows(scope) for scope in scopes):
            raise ApiError(
                403,
                "forbidden",
                f"API key {key.prefix}... ({key.name}) has scopes "
                f"{', '.join(key.scopes) or 'none'}; this endpoint needs {wanted}. Use a key "
                f"with that scope (`imgpipe apikey create --scope {scopes[0]} --name NAME`)",
            )
        return key

    return dependency
