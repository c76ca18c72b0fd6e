"""What every request handler needs, built once per app from Settings."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from fastapi import Request

from imgpipe.settings import Settings

if TYPE_CHECKING:
    from orchestrator.context import OrchestratorContext

__all__ = ["UPLOAD_OVERHEAD_BYTES", "WebContext", "web_context"]

UPLOAD_OVERHEAD_BYTES = 64 * 1024
"""Room for multipart boundaries, part headers and the small text fields of an upload."""
SMALL_BODY_BYTES = 64 * 1024
"""The cap on every other request body (review decisions, queue requests)."""


@dataclass
class WebContext:
    settings: Settings
    _orchestrator: OrchestratorContext | None = field(default=None, repr=False)

    @property
    def database_url(self) -> str:
        return self.settings.effective_database_url

    @property
    def orchestrator(self) -> OrchestratorContext:
        """The submit path's context (Celery app, blob store, events), built on first use."""
        if self._orchestrator is None:
            from orchestrator.context import OrchestratorContext

            self._orchestrator = OrchestratorContext(self.settings)
        return self._orchestrator

    @property
    def upload_max_bytes(self) -> int:
        """The largest POST /v1/jobs body: the image limit, metadata and overrides at their
        limits, and the multipart overhead."""
        s = self.settings
        return s.max_bytes + 2 * s.metadata_max_bytes + UPLOAD_OVERHEAD_BYTES

    def body_limit_for(self, method: str, path: str) -> int:
        if method == "POST" and path.rstrip("/") == "/v1/jobs":
            return self.upload_max_bytes
        return SMALL_BODY_BYTES


def web_context(request: Request) -> WebContext:
    """FastAPI dependency: the app's WebContext."""
    ctx: WebContext = request.app.state.web
    return ctx
