"""The HTTP API and the review console (FastAPI), started by ``imgpipe serve`` and by
``imgpipe up``. Importing ``imgpipe.face.cli`` does not import this package."""

from __future__ import annotations

from imgpipe.face.web.app import create_app

__all__ = ["create_app"]
