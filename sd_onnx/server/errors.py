"""A1111's error bodies ({error, detail, body, errors}) and the exception the routes raise to answer with one."""

from __future__ import annotations

from starlette.responses import JSONResponse


class ApiError(Exception):
    """A 4xx answer: `detail` says what was wrong (which field, which limit) in one line."""

    def __init__(self, status: int, detail: str, headers: dict[str, str] | None = None):
        super().__init__(detail)
        self.status, self.detail, self.headers = status, detail, headers


def error_body(error: str, detail: object, body: object = "", errors: object = "") -> dict:
    """A1111's api_middleware handle_exception(): the exception's type name, its detail, the request body, str(e)."""
    return {"error": error, "detail": detail, "body": body, "errors": errors if errors != "" else str(detail)}


def error_response(status: int, error: str, detail: object, body: object = "", errors: object = "",
                   headers: dict[str, str] | None = None) -> JSONResponse:
    return JSONResponse(error_body(error, detail, body, errors), status_code=status, headers=headers)
