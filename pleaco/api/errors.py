"""Errors the API returns: ``{"error": {"code": ..., "message": ...}}`` with a 4xx/5xx."""

from __future__ import annotations

from pleaco.errors import PleacoError


class ApiError(PleacoError):
    """An error with an HTTP status, a stable machine-readable code and a human message,
    given per instance: what the client receives from the server (status 0 when there was
    no answer), and what the API raises where no module error fits."""

    def __init__(self, status: int, code: str, message: str) -> None:
        super().__init__(message)
        self.status = status
        self.code = code

    def to_json(self) -> dict[str, dict[str, str]]:
        return error_json(self)


def error_json(exc: PleacoError) -> dict[str, dict[str, str]]:
    """The API's error body for ``exc``."""
    return {"error": {"code": exc.code, "message": exc.message}}
