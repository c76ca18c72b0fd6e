"""GET /healthz (no key needed: it says only whether the database and Redis answer) and,
where ``prometheus_client`` is installed, GET /metrics (scope ``read``)."""

from __future__ import annotations

import importlib.util
from typing import Annotated

import redis
from fastapi import APIRouter, Depends
from fastapi.responses import JSONResponse, Response
from sqlalchemy import text

from db.apikeys import ApiKeyInfo, Scope
from db.engine import session_scope
from imgpipe.face.web.auth import require
from imgpipe.face.web.context import WebContext, web_context
from imgpipe.face.web.schemas import HealthOut

__all__ = ["metrics_available", "metrics_router", "router"]

router = APIRouter(tags=["health"])
metrics_router = APIRouter(include_in_schema=False)
PING_TIMEOUT_S = 2.0


def _check_database(url: str) -> str:
    try:
        with session_scope(url) as session:
            session.execute(text("SELECT 1"))
    except Exception as exc:
        return f"unavailable: {type(exc).__name__}"
    return "ok"


def _check_redis(url: str) -> str:
    client = redis.Redis.from_url(url, socket_timeout=PING_TIMEOUT_S)
    try:
        client.ping()
    except (redis.RedisError, OSError) as exc:
        return f"unavailable: {type(exc).__name__}"
    finally:
        client.close()
    return "ok"


@router.get(
    "/healthz",
    summary="Liveness and readiness: do the database and Redis answer?",
    response_model=HealthOut,
    responses={503: {"model": HealthOut, "description": "A dependency does not answer."}},
)
def healthz(ctx: Annotated[WebContext, Depends(web_context)]) -> JSONResponse:
    database = _check_database(ctx.database_url)
    broker = _check_redis(ctx.settings.effective_redis_url)
    ok = database == "ok" and broker == "ok"
    body = HealthOut(status="ok" if ok else "unavailable", database=database, redis=broker)
    return JSONResponse(body.model_dump(), status_code=200 if ok else 503)


def metrics_available() -> bool:
    return importlib.util.find_spec("prometheus_client") is not None


@metrics_router.get("/metrics")
def metrics(_key: Annotated[ApiKeyInfo, Depends(require(Scope.READ))]) -> Response:
    from prometheus_client import CONTENT_TYPE_LATEST, REGISTRY, generate_latest

    return Response(generate_latest(REGISTRY), media_type=CONTENT_TYPE_LATEST)
