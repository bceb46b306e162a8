"""The dashboard's routes: page shells, login and logout, static files, and the two API
endpoints only the pages need (live events, an app's history).

    GET  /ui/                   Cluster: nodes, live
    GET  /ui/apps               Apps: releases, replicas, actions (?app=NAME: one app)
    GET  /ui/builds             Builds: per app, one build's log streaming (?app=NAME&build=ID)
    GET  /ui/charts             Charts: requests/s, latency, replicas over the last hour (?app=NAME)
    GET  /ui/login, POST /ui/login, POST /ui/logout
    GET  /ui/static/...         the pages' JavaScript modules and style sheet (no session needed)
    GET  /v1/events             server-sent events (pleaco/ui/events.py)
    GET  /v1/apps/{name}/history  ?since=T: the app's samples (pleaco/ui/history.py)

A page is a shell rendered here (the navigation, empty containers, the CSRF token in a
``<meta>``) and one JavaScript module that fills it by calling /v1 with the session cookie:
the same handlers as the CLI's, so there is no second path for any action. Every /ui
response carries a strict Content-Security-Policy: scripts, styles and connections from
this origin only, no inline script or style, no framing.
"""

from __future__ import annotations

import hmac
from collections.abc import Awaitable, Callable
from html import escape
from pathlib import Path

from aiohttp import web

from pleaco.api import session
from pleaco.api.errors import ApiError
from pleaco.apps import NotFound
from pleaco.ui.history import AppHistory

STATIC = Path(__file__).parent / "static"

CSP = ("default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self'; connect-src 'self'; "
       "form-action 'self'; frame-ancestors 'none'; base-uri 'none'")
SECURITY_HEADERS = {
    "Content-Security-Policy": CSP,
    "X-Content-Type-Options": "nosniff",
    "X-Frame-Options": "DENY",
    "Referrer-Policy": "same-origin",
}

# (path, page id, title): the navigation, in order.
PAGES = (("/ui/", "cluster", "Cluster"), ("/ui/apps", "apps", "Apps"), ("/ui/builds", "builds", "Builds"),
         ("/ui/charts", "charts", "Charts"))

# Each page's skeleton: what its module fills.
BODIES = {
    "cluster": """
<section><h1>Cluster</h1>
<div class="scroll"><table id="nodes"><thead><tr><th>Node</th><th>State</th><th>Address</th><th>Version</th>
<th>Replicas</th><th>Last seen</th></tr></thead><tbody></tbody></table></div></section>""",
    "apps": """
<section><h1>Apps</h1><div class="scroll"><table id="apps"><thead><tr><th>App</th><th>State</th><th>Image</th>
<th>Replicas</th><th>Host</th></tr></thead><tbody></tbody></table></div></section>
<section id="app" hidden></section>""",
    "builds": """
<section><h1>Builds</h1><form id="pick" class="row"><label>App <select id="app-select"></select></label></form>
<div class="scroll"><table id="builds"><thead><tr><th>Build</th><th>State</th><th>Commit</th><th>Started</th>
<th>Reason</th></tr></thead><tbody></tbody></table></div></section>
<section id="build" hidden></section>""",
    "charts": """
<section><h1>Charts</h1><form id="pick" class="row"><label>App <select id="app-select"></select></label></form>
<p class="muted" id="chart-note"></p><div id="charts" class="charts"></div></section>""",
}


def _shell(page: str, title: str, csrf: str, node: str) -> str:
    nav = "".join(f'<a href="{path}"{" aria-current=page" if pid == page else ""}>{escape(label)}</a>'
                  for path, pid, label in PAGES)
    return f"""<!doctype html>
<html lang="en"><head><meta charset="utf-8">
<meta name="viewport" content="width=device-width, initial-scale=1">
<meta name="pleaco-csrf" content="{escape(csrf)}">
<title>{escape(title)} · pleaco · {escape(node)}</title>
<link rel="stylesheet" href="/ui/static/app.css"><link rel="icon" href="/ui/static/favicon.svg"></head>
<body data-page="{page}"><header><a class="brand" href="/ui/">pleaco</a><nav>{nav}</nav>
<span class="node">{escape(node)}</span><span id="live" class="live"></span>
<button id="logout" type="button" class="link">Log out</button></header>
<div id="error" class="error" role="alert" hidden></div>
<main>{BODIES[page]}</main>
<script type="module" src="/ui/static/{page}.js"></script></body></html>
"""


def _login_page(node: str, message: str = "") -> str:
    error = f'<p class="error" role="alert">{escape(message)}</p>' if message else ""
    return f"""<!doctype html>
<html lang="en"><head><meta charset="utf-8">
<meta name="viewport" content="width=device-width, initial-scale=1">
<title>Log in · pleaco · {escape(node)}</title>
<link rel="stylesheet" href="/ui/static/app.css"><link rel="icon" href="/ui/static/favicon.svg"></head>
<body class="login"><main><h1>pleaco</h1><p class="muted">{escape(node)}</p>{error}
<form method="post" action="/ui/login"><label>Admin token
<input type="password" name="token" autocomplete="current-password" required autofocus></label>
<button type="submit">Log in</button></form>
<p class="muted">The token is in <code>DATA_DIR/admin.token</code> on any node.</p></main></body></html>
"""


class UiRoutes:
    def __init__(self, token: str, node_name: str, history: AppHistory, app_exists: Callable[[str], bool],
                 history_interval: float) -> None:
        self.token = token
        self.app_exists = app_exists
        self.node_name = node_name
        self.history = history
        self.history_interval = history_interval

    def add_to(self, app: web.Application) -> None:
        r = app.router
        r.add_get("/ui", self.to_root)
        for path, page, title in PAGES:
            r.add_get(path, self._page_handler(page, title))
        r.add_get("/ui/login", self.login_form)
        r.add_post("/ui/login", self.login)
        r.add_post("/ui/logout", self.logout)
        r.add_static("/ui/static", STATIC, append_version=False)
        r.add_get("/v1/apps/{name}/history", self.app_history)
        app.on_response_prepare.append(self._headers)

    async def _headers(self, request: web.Request, response: web.StreamResponse) -> None:
        if request.path == "/ui" or request.path.startswith("/ui/"):
            response.headers.update(SECURITY_HEADERS)
            if not request.path.startswith("/ui/static/"):
                response.headers["Cache-Control"] = "no-store"  # pages hold the CSRF token

    async def to_root(self, request: web.Request) -> web.StreamResponse:
        raise web.HTTPPermanentRedirect("/ui/")

    def _page_handler(self, page: str, title: str) -> Callable[[web.Request], Awaitable[web.StreamResponse]]:
        async def handler(request: web.Request) -> web.StreamResponse:
            if not session.has_session(request, self.token):
                raise web.HTTPSeeOther("/ui/login")
            return web.Response(text=_shell(page, title, session.csrf_value(self.token), self.node_name),
                                content_type="text/html", charset="utf-8")
        return handler

    async def login_form(self, request: web.Request) -> web.Response:
        return web.Response(text=_login_page(self.node_name), content_type="text/html", charset="utf-8")

    async def login(self, request: web.Request) -> web.StreamResponse:
        # A login forced by another site would put the victim in a session they did not choose.
        if problem := session.cross_site(request):
            return web.Response(text=_login_page(self.node_name, f"Refused: {problem}."), status=403,
                                content_type="text/html", charset="utf-8")
        form = await request.post()
        given = form.get("token")
        given = given.strip() if isinstance(given, str) else ""
        if not given or not hmac.compare_digest(given.encode(), self.token.encode()):
            return web.Response(text=_login_page(self.node_name, "Invalid token."), status=401,
                                content_type="text/html", charset="utf-8")
        resp = web.HTTPSeeOther("/ui/")
        session.set_session(resp, request, self.token)
        return resp

    async def logout(self, request: web.Request) -> web.Response:
        session.check_cookie_request(request, self.token)  # a forged logout is refused too
        resp = web.json_response({"logged_out": True})
        session.clear_session(resp, request)
        return resp

    async def app_history(self, request: web.Request) -> web.Response:
        name = request.match_info["name"]
        raw = request.query.get("since", "0")
        try:
            since = float(raw)
        except ValueError:
            raise ApiError(400, "invalid", f"since: expected seconds since the epoch, got {raw!r}") from None
        if not self.app_exists(name):
            raise NotFound(f"app {name!r} does not exist")
        samples = self.history.samples(name, since)  # none yet: the app is newer than the last sample
        return web.json_response({"app": name, "interval_s": self.history_interval,
                                  "samples": [s.to_json() for s in samples]})
