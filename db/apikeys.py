"""HTTP API keys: a random token shown once, its sha256 stored, scopes checked per request.

A token is ``ipk_`` + 43 URL-safe characters (32 random bytes from ``secrets``). Only its
sha256 is stored: a stolen database (or backup) yields no usable key, and because the token
has 256 bits of entropy a fast hash is enough (a slow KDF protects guessable passwords,
not random tokens). A key's ``name`` says who holds it; the review console stores it as
the reviewer of every decision made with the key.
"""

from __future__ import annotations

import hashlib
import secrets
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime
from enum import StrEnum

from sqlalchemy import select, update

from db.engine import session_scope
from db.models import ApiKey, utcnow
from imgpipe.errors import PermanentError

__all__ = [
    "TOKEN_PREFIX",
    "ApiKeyError",
    "ApiKeyInfo",
    "Scope",
    "create_key",
    "find_key",
    "list_keys",
    "parse_scopes",
    "revoke_key",
    "token_sha256",
]

TOKEN_PREFIX = "ipk_"
TOKEN_BYTES = 32
SHOWN_PREFIX_CHARS = 12
MAX_NAME_CHARS = 128


class Scope(StrEnum):
    SUBMIT = "submit"
    """POST /v1/jobs."""
    READ = "read"
    """GET a job, its events and its images."""
    REVIEW = "review"
    """The review queue and console (and the images of the jobs in it)."""


_SCOPE_NAMES = frozenset(s.value for s in Scope)


class ApiKeyError(PermanentError):
    """A key that cannot be created or revoked; the message says why and what to do."""


@dataclass(frozen=True)
class ApiKeyInfo:
    id: int
    name: str
    prefix: str
    scopes: tuple[Scope, ...]
    created_at: datetime
    revoked_at: datetime | None

    def allows(self, scope: Scope) -> bool:
        return self.revoked_at is None and scope in self.scopes


def token_sha256(token: str) -> str:
    return hashlib.sha256(token.encode("utf-8")).hexdigest()


def _info(row: ApiKey) -> ApiKeyInfo:
    return ApiKeyInfo(
        id=row.id,
        name=row.name,
        prefix=row.prefix,
        scopes=tuple(Scope(s) for s in row.scopes if s in _SCOPE_NAMES),
        created_at=row.created_at,
        revoked_at=row.revoked_at,
    )


def parse_scopes(values: Sequence[str]) -> tuple[Scope, ...]:
    """Scope names (``submit``, ``read``, ``review``; comma-separated lists allowed)."""
    names = [n.strip() for v in values for n in v.split(",") if n.strip()]
    if not names:
        raise ApiKeyError(f"give at least one scope: --scope {' / --scope '.join(Scope)}")
    scopes: list[Scope] = []
    for name in names:
        try:
            scope = Scope(name)
        except ValueError:
            raise ApiKeyError(f"unknown scope {name!r}; scopes are {', '.join(Scope)}") from None
        if scope not in scopes:
            scopes.append(scope)
    return tuple(scopes)


def create_key(database_url: str, name: str, scopes: Sequence[Scope]) -> tuple[str, ApiKeyInfo]:
    """A new key: returns the token (shown once, never stored) and what is stored."""
    name = name.strip()
    if not name or len(name) > MAX_NAME_CHARS:
        raise ApiKeyError(f"a key's name must be 1 to {MAX_NAME_CHARS} characters (--name NAME)")
    if not scopes:
        raise ApiKeyError(f"give at least one scope ({', '.join(Scope)})")
    token = TOKEN_PREFIX + secrets.token_urlsafe(TOKEN_BYTES)
    row = ApiKey(
        name=name,
        token_sha256=token_sha256(token),
        prefix=token[:SHOWN_PREFIX_CHARS],
        scopes=[str(s) for s in scopes],
        created_at=utcnow(),
        revoked_at=None,
    )
    with session_scope(database_url) as session:
        session.add(row)
        session.flush()
        info = _info(row)
    return token, info


def find_key(database_url: str, token: str) -> ApiKeyInfo | None:
    """The key whose token this is (revoked ones included: the caller says why it
    refuses), or None."""
    with session_scope(database_url) as session:
        row = session.execute(
            select(ApiKey).where(ApiKey.token_sha256 == token_sha256(token))
        ).scalar_one_or_none()
        return _info(row) if row is not None else None


def list_keys(database_url: str) -> list[ApiKeyInfo]:
    with session_scope(database_url) as session:
        rows = session.execute(select(ApiKey).order_by(ApiKey.id)).scalars()
        return [_info(row) for row in rows]


def revoke_key(database_url: str, key_id: int) -> ApiKeyInfo:
    """Revoke key ``key_id`` (revoking twice keeps the first time)."""
    with session_scope(database_url) as session:
        session.execute(
            update(ApiKey)
            .where(ApiKey.id == key_id, ApiKey.revoked_at.is_(None))
            .values(revoked_at=utcnow())
        )
        row = session.get(ApiKey, key_id)
        if row is None:
            raise ApiKeyError(f"no API key with id {key_id}; `imgpipe apikey list` shows them")
        return _info(row)
