"""The typed errors of the server: how a request ends other than with its answer."""

from __future__ import annotations

from typing import ClassVar

from fastapi.responses import JSONResponse


class ApiError(Exception):
    """An error answered as OpenAI does: {"error": {message, type, param, code}}."""

    TYPES: ClassVar[dict] = {
        400: "invalid_request_error",
        401: "authentication_error",
        404: "not_found_error",
        408: "invalid_request_error",
        413: "invalid_request_error",
        415: "invalid_request_error",
    }

    def __init__(
        self, status: int, message: str, param: str | None = None, code=None, headers=None
    ):
        super().__init__(message)
        self.status, self.message, self.param, self.code = status, message, param, code
        self.headers = headers or {}

    def body(self) -> dict:
        kind = self.TYPES.get(self.status, "server_error" if self.status >= 500 else "error")
        if self.status == 429:
            kind = "rate_limit_error"
        return {
            "error": {"message": self.message, "type": kind, "param": self.param, "code": self.code}
        }

    def response(self) -> JSONResponse:
        return JSONResponse(self.body(), status_code=self.status, headers=self.headers)


class ClientGone(Exception):
    """The client closed its connection before the answer was complete (counted as 499)."""
