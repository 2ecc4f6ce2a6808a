"""OpenAI's error shape and status codes for the workbench's own error types."""

from __future__ import annotations

import logging

from fastapi.responses import JSONResponse

from models.errors import Busy, InvalidRequest, TooLarge, Unavailable, UnknownModel, UserError, WrongTask

log = logging.getLogger(__name__)

RETRY_AFTER_SECONDS = 5


class ApiError(Exception):
    """An error with its HTTP status and OpenAI error type, raised by the routes themselves."""

    def __init__(self, status: int, message: str, kind: str = "invalid_request_error", param: str | None = None,
                 code: str | None = None):
        super().__init__(message)
        self.status, self.message, self.kind, self.param, self.code = status, message, kind, param, code


def error_response(status: int, message: str, kind: str = "invalid_request_error", param: str | None = None,
                   code: str | None = None, headers: dict | None = None) -> JSONResponse:
    body = {"error": {"message": message, "type": kind, "param": param, "code": code}}
    return JSONResponse(body, status_code=status, headers=headers)


def to_response(exc: BaseException, where: str) -> JSONResponse:
    """The JSON error for any exception: user errors keep their message, bugs are logged and stay vague."""
    if isinstance(exc, ApiError):
        return error_response(exc.status, exc.message, exc.kind, exc.param, exc.code)
    if isinstance(exc, UnknownModel):
        return error_response(404, str(exc), code="model_not_found")
    if isinstance(exc, WrongTask):
        return error_response(422, str(exc), code="wrong_task")
    if isinstance(exc, TooLarge):
        return error_response(413, str(exc), code="too_large")
    if isinstance(exc, Busy):
        return error_response(503, str(exc), "server_error", code="busy",
                              headers={"Retry-After": str(RETRY_AFTER_SECONDS)})
    if isinstance(exc, Unavailable):
        return error_response(503, str(exc), "server_error", code="unavailable")
    if isinstance(exc, (InvalidRequest, UserError)):
        return error_response(400, str(exc))
    log.error("%s failed", where, exc_info=exc)
    return error_response(500, f"Internal error ({exc.__class__.__name__}) in {where}: a bug in the workbench, "
                               "not a problem with the request. The details are in the server log.", "server_error")
