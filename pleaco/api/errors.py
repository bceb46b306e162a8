"""Errors the API returns: ``{"error": {"code": ..., "message": ...}}`` with a 4xx/5xx."""

from __future__ import annotations


class ApiError(Exception):
    """An error with an HTTP status, a stable machine-readable code and a human message."""

    def __init__(self, status: int, code: str, message: str) -> None:
        super().__init__(message)
        self.status = status
        self.code = code
        self.message = message

    def to_json(self) -> dict[str, dict[str, str]]:
        return {"error": {"code": self.code, "message": self.message}}
