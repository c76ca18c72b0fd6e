"""Hiding credentials in text meant for people: URLs printed, logged or stored in reports.

``redact_url("redis://:s3cret@host:6379/0")`` gives ``redis://:***@host:6379/0``: the
scheme, user, host, port and path stay (what an operator needs to tell two servers
apart), the password and credential-like query parameters do not.
"""

from __future__ import annotations

import re
from urllib.parse import urlsplit

__all__ = ["MASK", "redact_text", "redact_url"]

MASK = "***"

_SECRET_QUERY_KEYS = frozenset({"password", "passwd", "pwd", "secret", "token", "access_key"})
_SECRET_QUERY_KEYS_SUFFIXES = ("password", "secret", "token")

# scheme://[user]:password@ inside running text; the password ends at the last "@" before
# the host (passwords may contain "@" when a client did not percent-encode them).
_URL_CREDENTIALS = re.compile(r"(?P<head>\b[a-zA-Z][a-zA-Z0-9+.\-]*://[^\s:/@]*):[^\s/]*@")


def _secret_query_key(key: str) -> bool:
    lowered = key.lower()
    return lowered in _SECRET_QUERY_KEYS or lowered.endswith(_SECRET_QUERY_KEYS_SUFFIXES)


def redact_url(url: str) -> str:
    """``url`` with its password and secret query parameters replaced by ``***``."""
    try:
        parts = urlsplit(url)
    except ValueError:
        return redact_text(url)
    netloc = parts.netloc
    if "@" in netloc:
        userinfo, host = netloc.rsplit("@", 1)
        if ":" in userinfo:
            netloc = f"{userinfo.split(':', 1)[0]}:{MASK}@{host}"
    query = "&".join(
        f"{pair.split('=', 1)[0]}={MASK}" if _secret_query_key(pair.split("=", 1)[0]) else pair
        for pair in parts.query.split("&")
    )
    if netloc == parts.netloc and query == parts.query:
        return url  # rebuilding could change it (``sqlite:////abs`` loses a slash)
    rebuilt = f"{parts.scheme}://{netloc}{parts.path}"
    rebuilt += f"?{query}" if query else ""
    return rebuilt + (f"#{parts.fragment}" if parts.fragment else "")


def redact_text(text: str) -> str:
    """Every ``scheme://user:password@`` in ``text`` with the password replaced by ``***``
    (for error messages of libraries that may quote a URL)."""
    return _URL_CREDENTIALS.sub(lambda m: f"{m.group('head')}:{MASK}@", text)
