"""OpenAI-style errors: `{"error": {"message", "type", "param", "code"}}` with the right HTTP status."""

from __future__ import annotations

import json
from typing import Callable

import structlog
from aiohttp import web

log = structlog.get_logger(__name__)

_TYPES = {
    400: "invalid_request_error",
    401: "authentication_error",
    403: "permission_error",
    404: "not_found_error",
    405: "invalid_request_error",
    413: "invalid_request_error",
    429: "rate_limit_error",
    500: "internal_server_error",
    503: "service_unavailable",
}


class APIError(Exception):
    def __init__(self, status: int, message: str, *, param: str | None = None, code: str | None = None,
                 headers: dict[str, str] | None = None):
        super().__init__(message)
        self.status = status
        self.message = message
        self.param = param
        self.code = code
        self.headers = headers or {}

    def response(self) -> web.Response:
        body = {"error": {"message": self.message, "type": _TYPES.get(self.status, "api_error"),
                          "param": self.param, "code": self.code}}
        return web.json_response(body, status=self.status, headers=self.headers)


def bad_request(message: str, param: str | None = None, code: str = "invalid_value") -> APIError:
    return APIError(400, message, param=param, code=code)


def error_middleware(max_request_bytes: int, unexpected_status: Callable[[], int] = lambda: 500):
    """Every failure becomes an OpenAI-style body: ours, aiohttp's 404/405/413, and the unexpected."""

    @web.middleware
    async def errors(request: web.Request, handler):
        try:
            return await handler(request)
        except APIError as exc:
            return exc.response()
        except web.HTTPRequestEntityTooLarge:
            return APIError(413, f"request body too large (limit {max_request_bytes} bytes)",
                            code="body_too_large").response()
        except web.HTTPNotFound:
            return APIError(404, f"no such path: {request.path}", code="not_found").response()
        except web.HTTPMethodNotAllowed:
            return APIError(405, f"{request.method} is not allowed on {request.path}",
                            code="method_not_allowed").response()
        except web.HTTPException:
            raise
        except Exception as exc:  # noqa: BLE001 — never an HTML 500 page; logged with its traceback
            log.exception("http.request_failed", path=request.path)
            return APIError(unexpected_status(), f"internal error: {exc}", code="internal_error").response()

    return errors


async def read_json(request: web.Request) -> object:
    """The request body as JSON; malformed → 400 (too large → 413 through the middleware)."""
    raw = await request.read()
    try:
        return json.loads(raw)
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise bad_request(f"malformed JSON: {exc}", None, "invalid_json") from None
