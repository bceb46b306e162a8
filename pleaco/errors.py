"""The one tree of pleaco's errors.

Every error pleaco raises on purpose derives from ``PleacoError``, through one of a few
semantic bases that say what went wrong from the caller's side and carry the HTTP status
and the stable machine-readable code the API answers with (``{"error": {"code",
"message"}}``, mapped once, by the API's error middleware, pleaco/api/server.py):

    PleacoError     500 internal       a failure of pleaco or of something it depends on
    InvalidInput    400 invalid        the request or the input is malformed; nothing changed
    NotFound        404 not_found      the thing named does not exist
    Conflict        409 conflict       valid, but not in the current state
    Unavailable     503 unavailable    a dependency (the engine, a peer) does not answer

A module's own error subclasses one of these and, where its callers catch a builtin, that
builtin too (``class ValidationError(InvalidInput, ValueError)``). A subclass names its own
code (and, rarely, status) in its class line: ``class NoEarlierRelease(Conflict,
code="no_earlier_release")``.
"""

from __future__ import annotations

from typing import Any


class PleacoError(Exception):
    # Class attributes, set by the class line of each subclass; ApiError sets them per instance.
    status: int = 500
    code: str = "internal"

    def __init_subclass__(cls, *, code: str | None = None, status: int | None = None, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        if code is not None:
            cls.code = code
        if status is not None:
            cls.status = status

    @property
    def message(self) -> str:
        return str(self)


class InvalidInput(PleacoError, code="invalid", status=400):
    """The request or input is malformed; nothing was changed."""


class NotFound(PleacoError, code="not_found", status=404):
    """What was named does not exist."""


class Conflict(PleacoError, code="conflict", status=409):
    """A valid request that the current state does not allow."""


class Unavailable(PleacoError, code="unavailable", status=503):
    """A dependency (Docker Engine, a peer, the proxy) does not answer; try again later."""
