"""OpenAI-shaped errors: every failure path answers {"error": {"message", "type", "param", "code"}}."""

from __future__ import annotations

import json
from http import HTTPStatus

from pydantic import ValidationError

_TYPES = {400: "invalid_request_error", 401: "authentication_error", 404: "not_found_error",
          413: "invalid_request_error", 405: "invalid_request_error", 429: "rate_limit_error",
          503: "service_unavailable_error"}


class APIError(Exception):
    """Raised anywhere in a handler; the app turns it into the JSON error body with its status."""

    def __init__(self, message: str, status: int = 400, *, param: str | None = None,
                 code: str | int | None = None, type: str | None = None,
                 headers: dict[str, str] | None = None):
        super().__init__(message)
        self.message = message
        self.status = status
        self.param = param
        self.code = code
        self.type = type or _TYPES.get(status, "server_error" if status >= 500 else "invalid_request_error")
        self.headers = headers or {}

    def body(self) -> dict:
        return {"error": {"message": self.message, "type": self.type, "param": self.param,
                          "code": self.code if self.code is not None else self.status}}


def error_body(status: int, message: str, param: str | None = None) -> dict:
    return APIError(message, status, param=param).body()


def from_validation_error(exc: ValidationError) -> APIError:
    """A pydantic error names its field in `param` so clients know which input was wrong."""
    first = exc.errors()[0]
    loc = [str(p) for p in first.get("loc", ()) if not str(p).startswith("function-")]
    # Union members add their type name to the location; keep only the field path.
    path = [p for p in loc if not any(c in p for c in "[]") and p not in {"str", "int", "list"}]
    param = ".".join(path) or None
    msg = first.get("msg", "invalid value")
    return APIError(f"{param}: {msg}" if param else msg, 400, param=param.split(".")[0] if param else None)


def status_phrase(status: int) -> str:
    try:
        return HTTPStatus(status).phrase
    except ValueError:
        return "Error"


def sse_error(err: APIError) -> str:
    return f"data: {json.dumps(err.body())}\n\n"
