"""The dashboard's session cookie and CSRF check (pleaco/api/session.py), on requests made
by aiohttp's own request factory."""

from __future__ import annotations

import pytest
from aiohttp import web
from aiohttp.test_utils import make_mocked_request

from pleaco.api import session
from pleaco.api.errors import ApiError

TOKEN = "admin-token-for-tests"
HOST = "127.0.0.1:7400"


def request(method: str = "GET", cookie: str | None = None, **headers: str) -> web.Request:
    hdrs = {"Host": HOST, **{k.replace("_", "-"): v for k, v in headers.items()}}
    if cookie is not None:
        hdrs["Cookie"] = f"{session.COOKIE}={cookie}"
    return make_mocked_request(method, "/v1/apps/x/scale", headers=hdrs)


def good_cookie() -> str:
    return session.session_value(TOKEN)


def test_cookie_holds_neither_the_token_nor_the_csrf_value() -> None:
    value = session.session_value(TOKEN)
    assert TOKEN not in value and value != session.csrf_value(TOKEN)
    assert session.session_value("another token") != value  # rotating the token ends sessions


def test_get_with_the_session_cookie_passes_without_csrf() -> None:
    session.check_cookie_request(request("GET", good_cookie()), TOKEN)


@pytest.mark.parametrize("cookie", [None, "", "0" * 64, session.session_value("other")])
def test_a_missing_or_wrong_cookie_is_401(cookie: str | None) -> None:
    with pytest.raises(ApiError) as err:
        session.check_cookie_request(request("GET", cookie), TOKEN)
    assert err.value.status == 401 and "log in" in err.value.message


def test_post_with_cookie_and_csrf_header_from_this_origin_passes() -> None:
    req = request("POST", good_cookie(), Origin=f"http://{HOST}", Sec_Fetch_Site="same-origin",
                  X_Pleaco_CSRF=session.csrf_value(TOKEN))
    session.check_cookie_request(req, TOKEN)


@pytest.mark.parametrize(("headers", "says"), [
    ({}, "missing X-Pleaco-CSRF"),
    ({"X_Pleaco_CSRF": "0" * 64}, "does not match"),
    ({"X_Pleaco_CSRF": session.session_value(TOKEN)}, "does not match"),  # the cookie's value is not the proof
    ({"X_Pleaco_CSRF": session.csrf_value(TOKEN), "Origin": "http://evil.example"}, "Origin http://evil.example"),
    ({"X_Pleaco_CSRF": session.csrf_value(TOKEN), "Sec_Fetch_Site": "cross-site"}, "cross-site"),
    ({"X_Pleaco_CSRF": session.csrf_value(TOKEN), "Sec_Fetch_Site": "same-site"}, "same-site"),
])
@pytest.mark.parametrize("method", ["POST", "PUT", "DELETE", "PATCH"])
def test_a_change_without_the_csrf_proof_is_403(method: str, headers: dict[str, str], says: str) -> None:
    with pytest.raises(ApiError) as err:
        session.check_cookie_request(request(method, good_cookie(), **headers), TOKEN)
    assert err.value.status == 403 and err.value.code == "csrf" and says in err.value.message


def test_session_cookie_flags() -> None:
    resp = web.Response()
    session.set_session(resp, request("POST"), TOKEN)
    morsel = resp.cookies[session.COOKIE]
    assert morsel.value == session.session_value(TOKEN)
    assert morsel["httponly"] and morsel["samesite"] == "Strict" and morsel["path"] == "/"
    assert not morsel["secure"]  # plain HTTP: a Secure cookie would never come back


def test_session_cookie_is_secure_over_https() -> None:
    req = make_mocked_request("POST", "/ui/login", headers={"Host": HOST}, sslcontext=True)  # type: ignore[arg-type]
    assert req.secure
    resp = web.Response()
    session.set_session(resp, req, TOKEN)
    assert resp.cookies[session.COOKIE]["secure"]
