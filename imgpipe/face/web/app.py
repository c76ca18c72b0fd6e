"""The app factory: every router, the body cap, the error bodies, the console's files."""

from __future__ import annotations

from fastapi import FastAPI
from fastapi.staticfiles import StaticFiles

from imgpipe.face.web import console, health, images, job_events, jobs, review
from imgpipe.face.web.bodylimit import BodyLimit
from imgpipe.face.web.context import WebContext
from imgpipe.face.web.errors import install_error_handlers
from imgpipe.settings import Settings

__all__ = ["create_app"]

DESCRIPTION = """Submit images, follow their jobs, read verdicts and provenance, and work
the human review queue. Every endpoint but /healthz needs an API key
(`Authorization: Bearer <token>` or `X-API-Key`) with the endpoint's scope: `submit`,
`read` or `review` (`imgpipe apikey create`). docs/api.md has curl examples."""


def create_app(settings: Settings | None = None) -> FastAPI:
    settings = settings or Settings()
    web = WebContext(settings)
    app = FastAPI(
        title="imgpipe",
        version="1",
        description=DESCRIPTION,
        openapi_url="/openapi.json",
        docs_url=None,  # Swagger UI loads from a CDN; the schema is at /openapi.json
        redoc_url=None,
    )
    app.state.web = web
    install_error_handlers(app)
    app.add_middleware(BodyLimit, limit_for=web.body_limit_for)
    for module in (jobs, job_events, images, review, health, console):
        app.include_router(module.router)
    if health.metrics_available():
        app.include_router(health.metrics_router)
    app.mount("/console/static", StaticFiles(directory=console.STATIC_DIR), name="static")
    return app
