"""The dashboard's session cookie and its CSRF defence.

The login form takes the admin token and sets a cookie (HttpOnly, SameSite=Strict, Secure
when served over HTTPS) holding not the token but an HMAC of it: the cookie alone does not
give away the token the CLI uses, and rotating the token ends every session. The API's
auth middleware (pleaco/api/server.py) accepts this cookie where it would accept the bearer
token, so the pages call the very handlers the CLI calls.

A browser attaches cookies to requests other sites make it send, so a cookie-authenticated
request that changes something (any method but GET, HEAD, OPTIONS) must also prove it comes
from a page of this dashboard: no cross-site ``Sec-Fetch-Site``, an ``Origin`` (when sent)
equal to this server's, and the header ``X-Pleaco-CSRF`` carrying a second HMAC of the token
that only the dashboard's pages know (it is in their ``<meta name="pleaco-csrf">``; another
site can neither read it nor set a custom header cross-origin without a CORS preflight,
which this server never grants). A bearer-authenticated request needs none of it: browsers
never add that header by themselves.
"""

from __future__ import annotations

import hashlib
import hmac

from aiohttp import web

from pleaco.api.errors import ApiError

COOKIE = "pleaco_session"
CSRF_HEADER = "X-Pleaco-CSRF"
SAFE_METHODS = frozenset({"GET", "HEAD", "OPTIONS"})


def _derive(token: str, purpose: str) -> str:
    return hmac.new(token.encode(), f"pleaco-ui/{purpose}".encode(), hashlib.sha256).hexdigest()


def session_value(token: str) -> str:
    """The session cookie's value for the admin token ``token``."""
    return _derive(token, "session")


def csrf_value(token: str) -> str:
    """The CSRF token the pages send in ``X-Pleaco-CSRF``."""
    return _derive(token, "csrf")


def has_session(request: web.Request, token: str) -> bool:
    """Whether the request carries a valid session cookie."""
    given = request.cookies.get(COOKIE, "")
    return bool(given) and hmac.compare_digest(given.encode(), session_value(token).encode())


def cross_site(request: web.Request) -> str | None:
    """Why the request is not from a page of this server (None: it is, as far as the
    browser says). Browsers send ``Origin`` on every POST, PUT and DELETE, and Chromium and
    Firefox ``Sec-Fetch-Site`` on every request; a client that sends neither is no browser."""
    site = request.headers.get("Sec-Fetch-Site")
    if site is not None and site not in ("same-origin", "none"):
        return f"cross-site request (Sec-Fetch-Site: {site})"
    origin = request.headers.get("Origin")
    if origin is not None and origin != f"{request.scheme}://{request.host}":
        return f"Origin {origin} is not this server"
    return None


def check_cookie_request(request: web.Request, token: str) -> None:
    """Authenticate a request by its session cookie; a change also needs the CSRF proof.
    Raises ApiError 401 (no valid session) or 403 (CSRF)."""
    if not has_session(request, token):
        raise ApiError(401, "unauthorized", "invalid or expired session: log in again at /ui/login")
    if request.method in SAFE_METHODS:
        return
    problem = cross_site(request)
    if problem is None:
        given = request.headers.get(CSRF_HEADER, "")
        if not given:
            problem = f"missing {CSRF_HEADER} header"
        elif not hmac.compare_digest(given.encode(), csrf_value(token).encode()):
            problem = f"{CSRF_HEADER} does not match this session"
    if problem is not None:
        raise ApiError(403, "csrf", f"refused: {problem} (a change made with the session cookie must come "
                                    f"from the dashboard's pages)")


def set_session(response: web.StreamResponse, request: web.Request, token: str) -> None:
    """Log the browser in: the session cookie, for the whole server (the pages call /v1)."""
    response.set_cookie(COOKIE, session_value(token), path="/", httponly=True, secure=request.secure,
                        samesite="Strict")


def clear_session(response: web.StreamResponse, request: web.Request) -> None:
    response.del_cookie(COOKIE, path="/", secure=request.secure, httponly=True, samesite="Strict")
