"""One error body for every refusal: ``{"error": CODE, "message": WHAT AND WHAT TO DO}``."""

from __future__ import annotations

from typing import Any

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse
from pydantic import BaseModel

from imgpipe.errors import PermanentError, TransientError
from imgpipe.redact import redact_text

__all__ = ["ApiError", "ErrorBody", "error_responses", "install_error_handlers"]

RETRY_AFTER_S = 5


class ErrorBody(BaseModel):
    error: str
    """A stable code (``unauthorized``, ``bad_field``, ``lease_lost``, ...)."""
    message: str
    """What was wrong and what to do."""
    job_id: str | None = None


class ApiError(Exception):
    def __init__(
        self,
        status_code: int,
        code: str,
        message: str,
        headers: dict[str, str] | None = None,
    ) -> None:
        super().__init__(message)
        self.status_code = status_code
        self.code = code
        self.message = message
        self.headers = headers


def error_response(
    status_code: int, code: str, message: str, headers: dict[str, str] | None = None
) -> JSONResponse:
    body = ErrorBody(error=code, message=message).model_dump(exclude_none=True)
    return JSONResponse(body, status_code=status_code, headers=headers)


_DESCRIPTIONS = {
    400: "The request is malformed; the message says which field and what to send.",
    401: "No API key, or one that is unknown or revoked.",
    403: "The API key lacks the scope this endpoint needs.",
    404: "No such resource.",
    409: "A conflict with the current state (the message says which).",
    413: "The request body is larger than the limit.",
    415: "Unsupported Content-Type.",
    503: "The database, broker or blob store is unavailable; retry after Retry-After.",
}


def error_responses(*codes: int) -> dict[int | str, dict[str, Any]]:
    """OpenAPI ``responses`` entries for these status codes, all with ErrorBody."""
    return {code: {"model": ErrorBody, "description": _DESCRIPTIONS[code]} for code in codes}


def install_error_handlers(app: FastAPI) -> None:
    async def api_error(_request: Request, exc: Exception) -> JSONResponse:
        assert isinstance(exc, ApiError)
        return error_response(exc.status_code, exc.code, exc.message, exc.headers)

    async def transient(_request: Request, exc: Exception) -> JSONResponse:
        return error_response(
            503,
            "unavailable",
            f"{redact_text(str(exc))}; retry in a few seconds",
            {"Retry-After": str(RETRY_AFTER_S)},
        )

    async def permanent(_request: Request, exc: Exception) -> JSONResponse:
        return error_response(400, "bad_request", redact_text(str(exc)))

    app.add_exception_handler(ApiError, api_error)
    app.add_exception_handler(TransientError, transient)
    app.add_exception_handler(PermanentError, permanent)
