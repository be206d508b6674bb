"""Errors answered as JSON: OpenAI's shape on /v1 and the page's routes, AUTOMATIC1111's on /sdapi.

OpenAI: {"error": {"message", "type", "param", "code"}} (platform.openai.com/docs/guides/error-codes).
A1111: {"error", "detail", "body", "errors"} as its `api_middleware` writes them (modules/api/api.py), also on
its ControlNet extension's /controlnet routes.
"""
from __future__ import annotations

import json

# status -> OpenAI error type
OPENAI_TYPES = {408: "timeout", 429: "requests", 500: "server_error", 503: "server_error"}  # else invalid_request


class ApiError(Exception):
    """A request that cannot be served: HTTP status, a message for a person, the field at fault, a code."""

    def __init__(self, status: int, message: str, *, param: str | None = None, code: str | None = None,
                 headers: dict[str, str] | None = None):
        super().__init__(message)
        self.status, self.message, self.param, self.code = status, message, param, code
        self.headers = headers or {}


def is_a1111(path: str) -> bool:
    return path.startswith(("/sdapi/", "/controlnet/"))


def error_body(path: str, status: int, message: str, param: str | None = None, code: str | None = None) -> dict:
    if is_a1111(path):
        return {"error": code or _reason(status), "detail": message, "body": "", "errors": message}
    return {"error": {"message": message, "type": OPENAI_TYPES.get(status, "invalid_request_error"),
                      "param": param, "code": code}}


def error_bytes(path: str, error: ApiError) -> bytes:
    return json.dumps(error_body(path, error.status, error.message, error.param, error.code)).encode()


def _reason(status: int) -> str:
    from http import HTTPStatus

    try:
        return HTTPStatus(status).phrase
    except ValueError:
        return "Error"
