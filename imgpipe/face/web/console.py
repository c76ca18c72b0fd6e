"""The review console's pages: static HTML and JavaScript that call the review API.

The pages hold no data; the browser asks the reviewer for their API key once and keeps it
in ``sessionStorage`` (gone when the tab closes), sending it as ``Authorization: Bearer``
on every API call: no cookie, so no cross-site request can act as the reviewer. Images
are fetched the same way and shown from ``blob:`` URLs. A strict Content-Security-Policy
allows only this origin's scripts and styles.
"""

from __future__ import annotations

from pathlib import Path

from fastapi import APIRouter
from fastapi.responses import FileResponse, RedirectResponse

__all__ = ["CONSOLE_HEADERS", "STATIC_DIR", "router"]

STATIC_DIR = Path(__file__).resolve().parent / "static"
CONSOLE_HEADERS = {
    "Content-Security-Policy": (
        "default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self' blob:; "
        "connect-src 'self'; base-uri 'none'; form-action 'none'; frame-ancestors 'none'"
    ),
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "no-referrer",
    "Cache-Control": "no-store",
}

router = APIRouter(include_in_schema=False)


def _page(name: str) -> FileResponse:
    return FileResponse(STATIC_DIR / name, media_type="text/html", headers=CONSOLE_HEADERS)


@router.get("/")
def root() -> RedirectResponse:
    return RedirectResponse("/console")


@router.get("/console")
def console_page() -> FileResponse:
    return _page("console.html")


@router.get("/console/history")
def history_page() -> FileResponse:
    return _page("history.html")
