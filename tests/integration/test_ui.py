"""The dashboard in a real browser (Debian's Chromium through playwright) against a real
agent: login, the pages, their actions through the API's own handlers, the CSRF defence and
the Content-Security-Policy. Screenshots of every page go to each test's tmp_path."""

from __future__ import annotations

import contextlib
import json
import re
import urllib.error
import urllib.request
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from agentproc import AgentProcess, metric, wait_for
from gitserver import AppRepo, GitServer, deliver, push_payload
from test_build import stop_and_clean

from pleaco.api import session

CHROMIUM = Path("/usr/bin/chromium")  # Debian's (apt-get install chromium; `make test` does)
HELLO = "pleaco/hello:latest"
SECRET = "s3cret-for-ui-tests"
PHONE = {"width": 390, "height": 844}

sync_api = pytest.importorskip("playwright.sync_api", reason="playwright is in the [test] extra")


@pytest.fixture(scope="module")
def git(tmp_path_factory: pytest.TempPathFactory) -> Iterator[GitServer]:
    server = GitServer(tmp_path_factory.mktemp("ui-git")).start()
    yield server
    server.stop()


@pytest.fixture(scope="module")
def agent(tmp_path_factory: pytest.TempPathFactory) -> Iterator[AgentProcess]:
    """One agent for the module (each test makes and removes its own apps); its history is
    sampled every second so that the Charts page has points within the test."""
    # A cron "minute" of 2 s (scheduled jobs' [jobs] tick_seconds): a job runs within the test.
    a = AgentProcess(tmp_path_factory.mktemp("ui") / "node",
                     env={"PLEACO_UI_HISTORY_INTERVAL": "1", "PLEACO_JOBS_TICK_SECONDS": "2"})
    try:
        a.start()
        yield a
    finally:
        print(f"==== log of agent {a.data_dir.name} ====\n{a.log_tail(200)}")
        stop_and_clean(a)


@pytest.fixture(scope="module")
def browser() -> Iterator[Any]:
    if not CHROMIUM.exists():
        pytest.fail(f"{CHROMIUM} is missing: apt-get install chromium (make test does)", pytrace=False)
    with sync_api.sync_playwright() as p:
        # --no-sandbox: the tests run as root, where Chromium refuses its sandbox.
        b = p.chromium.launch(executable_path=str(CHROMIUM), args=["--no-sandbox"])
        yield b
        b.close()


class Page:
    """A fresh browser context (no cookie), its page, and what the page reported: errors
    and Content-Security-Policy violations fail the test at the end."""

    def __init__(self, browser: Any, agent: AgentProcess, shots: Path) -> None:
        self.agent = agent
        self.context = browser.new_context()
        self.page = self.context.new_page()
        self.page.set_default_timeout(30_000)
        self.shots = shots
        self.problems: list[str] = []
        self.page.on("pageerror", lambda e: self.problems.append(f"script error: {e}"))
        self.page.on("console", self._console)

    def _console(self, msg: Any) -> None:
        if "Content Security Policy" in msg.text or "Content-Security-Policy" in msg.text:
            self.problems.append(f"CSP violation: {msg.text}")

    def goto(self, path: str) -> None:
        self.page.goto(self.agent.url + path)

    def login(self, token: str | None = None) -> None:
        self.goto("/ui/login")
        self.page.fill("input[name=token]", token or self.agent.token)
        self.page.click("button[type=submit]")

    def open(self, path: str) -> None:
        """Log in with the right token, land on the cluster page, then open ``path``."""
        self.login()
        self.page.wait_for_url(self.agent.url + "/ui/")
        self.goto(path)

    def shot(self, name: str, full: bool = True) -> None:
        path = self.shots / f"{name}.png"
        self.page.screenshot(path=str(path), full_page=full)
        print(f"screenshot: {path}")

    def mark(self) -> None:
        """Mark the document: a full reload would lose the mark."""
        self.page.evaluate("window.__uiTestMark = 1")

    def still_marked(self) -> bool:
        return bool(self.page.evaluate("window.__uiTestMark === 1"))


@pytest.fixture
def page(browser: Any, agent: AgentProcess, tmp_path: Path) -> Iterator[Page]:
    shots = tmp_path / "screenshots"
    shots.mkdir()
    p = Page(browser, agent, shots)
    try:
        yield p
    finally:
        p.context.close()
    assert not p.problems, p.problems


@contextlib.contextmanager
def app_named(agent: AgentProcess, **spec: Any) -> Iterator[str]:
    """A fresh app deployed through the API (as the CLI does), removed at the end."""
    name = f"ui{uuid.uuid4().hex[:6]}"
    agent.client.deploy(name, {"image": HELLO, **spec})
    try:
        yield name
    finally:
        with contextlib.suppress(Exception):
            agent.client.remove(name)


def raw(agent: AgentProcess, method: str, path: str, body: Any = None, **headers: str) -> tuple[int, Any, Any]:
    """A request as a browser would make it, with the session cookie and no bearer token."""
    data = None if body is None else json.dumps(body).encode()
    req = urllib.request.Request(agent.url + path, data=data, method=method,
                                 headers={"Cookie": f"{session.COOKIE}={session.session_value(agent.token)}",
                                          "Content-Type": "application/json", **headers})
    try:
        with urllib.request.urlopen(req, timeout=10) as resp:
            text = resp.read().decode()
            return resp.status, resp.headers, text
    except urllib.error.HTTPError as err:
        return err.code, err.headers, err.read().decode()


def test_a_wrong_token_is_refused_and_the_right_one_opens_the_live_cluster_page(page: Page) -> None:
    page.goto("/ui/apps")
    assert page.page.url.endswith("/ui/login")  # no session: the login form
    page.login("not-the-token")
    assert page.page.locator("p.error").inner_text() == "Invalid token."
    assert page.context.cookies() == []
    page.shot("login-refused")
    status, _, _ = raw(page.agent, "GET", "/v1/apps", Cookie=f"{session.COOKIE}=guess")
    assert status == 401

    page.login()
    page.page.wait_for_url(page.agent.url + "/ui/")
    (cookie,) = page.context.cookies()
    assert cookie["name"] == session.COOKIE and cookie["httpOnly"] and cookie["sameSite"] == "Strict"
    assert not cookie["secure"]  # served over plain HTTP here
    assert page.agent.token not in cookie["value"]
    row = page.page.locator(f'#nodes tr[data-node="{page.agent.node_id}"]')
    assert row.locator(".state").inner_text() == "alive"
    before = row.locator(".load").inner_text()
    page.mark()
    # The page follows the cluster live: a replica started through the API shows without a reload.
    with app_named(page.agent, replicas=1, port=8080, health="/healthz"):
        wait_for(lambda: row.locator(".load").inner_text() != before, 30, "the node's replicas to change on the page")
        assert page.still_marked()
        page.shot("cluster")

    page.page.click("#logout")
    page.page.wait_for_url(page.agent.url + "/ui/login")
    assert page.context.cookies() == []
    page.goto("/ui/charts")
    assert page.page.url.endswith("/ui/login")


def test_a_login_posted_from_another_site_is_refused(agent: AgentProcess) -> None:
    req = urllib.request.Request(agent.url + "/ui/login", data=f"token={agent.token}".encode(), method="POST",
                                 headers={"Origin": "http://evil.example",
                                          "Content-Type": "application/x-www-form-urlencoded"})
    with pytest.raises(urllib.error.HTTPError) as err:
        urllib.request.urlopen(req, timeout=10)
    assert err.value.code == 403 and "Set-Cookie" not in err.value.headers
    assert "Origin http://evil.example is not this server" in err.value.read().decode()


def test_pages_carry_a_strict_csp_and_no_inline_code(agent: AgentProcess) -> None:
    for path in ("/ui/", "/ui/apps", "/ui/builds", "/ui/charts", "/ui/login"):
        status, headers, html = raw(agent, "GET", path)
        assert status == 200, (path, html)
        csp = dict(d.strip().split(" ", 1) for d in headers["Content-Security-Policy"].split(";"))
        assert csp["default-src"] == "'none'" and csp["script-src"] == "'self'" and csp["style-src"] == "'self'"
        assert csp["connect-src"] == "'self'" and csp["frame-ancestors"] == "'none'"
        assert "unsafe" not in headers["Content-Security-Policy"]
        assert headers["X-Content-Type-Options"] == "nosniff"
        assert not re.search(r"<script(?![^>]*\bsrc=)", html), f"{path} has an inline script"
        assert not re.search(r"\s(style|on\w+)=", html), f"{path} has an inline style or handler"
        for src in re.findall(r'(?:src|href)="(/ui/static/[^"]+)"', html):
            assert raw(agent, "GET", src)[0] == 200, src


def test_a_cookie_change_without_the_csrf_token_is_refused_and_changes_nothing(agent: AgentProcess) -> None:
    with app_named(agent, replicas=0) as app:
        origin = agent.url
        for headers in ({}, {"Origin": origin},
                        {session.CSRF_HEADER: "0" * 64, "Origin": origin},
                        {session.CSRF_HEADER: session.csrf_value(agent.token), "Origin": "http://evil.example"},
                        {session.CSRF_HEADER: session.csrf_value(agent.token), "Sec-Fetch-Site": "cross-site"}):
            status, _, body = raw(agent, "POST", f"/v1/apps/{app}/scale", {"replicas": 2}, **headers)
            assert status == 403 and json.loads(body)["error"]["code"] == "csrf", (headers, body)
            status, _, body = raw(agent, "DELETE", f"/v1/apps/{app}", **headers)
            assert status == 403, (headers, body)
        assert agent.client.app(app)["replicas"] == 0
        assert agent.client.app(app)["revision"] == 1
        # The same request with the page's token, from this origin, goes through.
        status, _, body = raw(agent, "POST", f"/v1/apps/{app}/scale", {"replicas": 0},
                              **{session.CSRF_HEADER: session.csrf_value(agent.token), "Origin": origin})
        assert status == 200, body


def api_calls(agent: AgentProcess, method: str, route: str) -> float:
    return metric(agent, f'pleaco_api_requests_total{{route="{route}",method="{method}",status="200"}}')


def replica_rows(page: Page, healthy: bool = True) -> int:
    rows = page.page.locator("#replicas tbody tr[data-replica]")
    return sum(1 for i in range(rows.count()) if not healthy or "healthy" in rows.nth(i).inner_text().split())


def test_apps_page_shows_replicas_scales_rolls_back_and_removes(page: Page) -> None:
    agent = page.agent
    with app_named(agent, replicas=1, port=8080, health="/healthz") as app:
        agent.client.deploy(app, {"image": HELLO, "port": 8080, "health": "/healthz", "env": {"V": "2"}})
        page.open(f"/ui/apps?app={app}")
        wait_for(lambda: replica_rows(page) == 1 and page.page.inner_text("#app-revision") == "2", 60,
                 "one healthy replica of revision 2 on the page")
        page.mark()
        wait_for(lambda: page.page.inner_text("#app-https") == "HTTP and HTTPS · no proxy on this node", 10,
                 "the HTTPS state as this node's proxy (none here) serves it")
        assert page.page.inner_text("#app-host") == f"{app}.<cluster domain>"

        # The page's actions are the CLI's API calls: the same routes count them.
        scales = api_calls(agent, "POST", "/v1/apps/{name}/scale")
        page.page.fill("#scale-replicas", "2")
        page.page.click("#scale-button")
        wait_for(lambda: replica_rows(page) == 2, 60, "two healthy replicas on the page")
        assert agent.client.app(app)["replicas"] == 2
        assert api_calls(agent, "POST", "/v1/apps/{name}/scale") == scales + 1
        page.shot("apps")

        rollbacks = api_calls(agent, "POST", "/v1/apps/{name}/rollback")
        page.page.once("dialog", lambda d: d.accept())
        page.page.click("#rollback")
        wait_for(lambda: page.page.inner_text("#app-revision") == "3", 30, "revision 3 on the page")
        assert api_calls(agent, "POST", "/v1/apps/{name}/rollback") == rollbacks + 1
        shown = agent.client.app(app)
        assert shown["revision"] == 3 and shown["env"] == {}  # release 1's spec again
        page.page.wait_for_selector('#releases tr[data-revision="3"]:has-text("rollback to 1")')

        # An API error is shown as the API says it, and nothing is done.
        page.page.fill("#deploy-image", "Not An Image!")
        page.page.click("#deploy-button")
        error = page.page.locator("#error")
        error.wait_for(state="visible")
        assert "Deploying failed" in error.inner_text() and "is not an image reference" in error.inner_text()
        assert agent.client.app(app)["revision"] == 3

        page.page.set_viewport_size(PHONE)
        assert page.page.evaluate("document.documentElement.scrollWidth") <= PHONE["width"]
        page.shot("apps-phone")

        page.page.once("dialog", lambda d: d.dismiss())
        page.page.click("#remove")
        assert agent.client.app(app)["name"] == app  # not confirmed: still there
        page.page.once("dialog", lambda d: d.accept())
        page.page.click("#remove")
        page.page.wait_for_selector("#app-message:has-text('was removed')")
        assert app not in [a["name"] for a in agent.client.apps()]
        assert page.still_marked()


def test_builds_page_follows_a_build_log_while_it_runs(page: Page, git: GitServer, tmp_path: Path) -> None:
    agent = page.agent
    app = f"ui{uuid.uuid4().hex[:6]}"
    url = git.create(app)
    repo = AppRepo.from_example("hello", tmp_path / "work", url)
    agent.client.connect(app, {"repo": url, "branch": "main", "webhook_secret": SECRET})
    try:
        # A step that takes a few seconds: the log is read while the build is under way.
        slow = (repo.work / "Dockerfile").read_text().replace("COPY serve.sh", "RUN sleep 5\nCOPY serve.sh")
        commit = repo.commit_and_push("slow", change={"Dockerfile": slow})
        d = deliver(agent.url, SECRET, "push", push_payload(repo.url, repo.before, commit))
        assert d.status == 202, d.body
        build = f"{app}-{commit[:12]}"
        page.open(f"/ui/builds?app={app}&build={build}")
        page.mark()
        log = page.page.locator("#build-log")
        wait_for(lambda: "==> " in log.inner_text(), 60, "the build log to start on the page")
        assert agent.client.build(build)["state"] not in ("succeeded", "failed", "cancelled")
        assert "==> succeeded" not in log.inner_text()
        page.shot("build-running")
        wait_for(lambda: "==> succeeded" in log.inner_text(), 120, "the build to finish on the page")
        page.page.wait_for_selector("#test-output:has-text('PASS: 2 tests')")
        assert "packages" in page.page.inner_text("#scan-summary")
        assert page.page.inner_text("#build-state") == "succeeded"
        assert "scan" in page.page.inner_text("#build-summary")  # the steps as the finished build has them
        assert "null" not in page.page.inner_text("#build-results")
        assert page.still_marked()
        page.shot("builds")
    finally:
        with contextlib.suppress(Exception):
            agent.client.remove(app)


def test_charts_page_draws_an_apps_history(page: Page) -> None:
    agent = page.agent
    with app_named(agent, replicas=0) as app:
        page.open(f"/ui/charts?app={app}")
        page.page.wait_for_selector("#chart-replicas polyline", state="attached")
        assert "wanted 0" in page.page.inner_text("#chart-replicas figcaption")
        agent.client.scale(app, 1)
        wait_for(lambda: "wanted 1" in page.page.inner_text("#chart-replicas figcaption"), 30,
                 "the chart to show the new count")
        for chart in ("#chart-rps", "#chart-latency", "#chart-replicas"):
            assert page.page.locator(f"{chart} svg").count() == 1
        page.shot("charts")


def test_live_events_history_and_releases_answer_and_refuse_bad_input(agent: AgentProcess) -> None:
    req = urllib.request.Request(agent.url + "/v1/events?topics=nodes",
                                 headers={"Cookie": f"{session.COOKIE}={session.session_value(agent.token)}"})
    with urllib.request.urlopen(req, timeout=10) as resp:
        assert resp.headers["Content-Type"].startswith("text/event-stream")
        event, data = resp.readline().decode(), resp.readline().decode()
    assert event == "event: nodes\n" and data.startswith("data: ")
    assert [n["id"] for n in json.loads(data.removeprefix("data: "))] == [n["id"] for n in agent.client.nodes()]

    status, _, body = raw(agent, "GET", "/v1/events?topics=nodes,bogus")
    assert status == 400 and "bogus unknown (known: apps, jobs, nodes)" in body
    assert raw(agent, "GET", "/v1/apps/nosuchapp/history")[0] == 404
    assert raw(agent, "GET", "/v1/apps/nosuchapp/releases")[0] == 404
    with app_named(agent, replicas=0) as app:
        status, _, body = raw(agent, "GET", f"/v1/apps/{app}/history?since=yesterday")
        assert status == 400 and "since" in body
        status, _, body = raw(agent, "GET", f"/v1/apps/{app}/releases")
        assert status == 200 and [(r["revision"], r["image"]) for r in json.loads(body)] == [(1, HELLO)]


def test_apps_page_shows_the_autoscaling_policy(page: Page) -> None:
    agent = page.agent
    with app_named(agent, replicas=0) as app:
        page.open(f"/ui/apps?app={app}")
        page.page.wait_for_selector("#autoscale:has-text('set by hand')")
        # Scale to zero allowed, no traffic: the policy holds the app at 0, no container starts.
        agent.client.autoscale(app, {"min_replicas": 0, "max_replicas": 2, "scale_to_zero_after": 30})
        page.page.wait_for_selector("#autoscale-policy:has-text('0 to 2 replicas, concurrency target 100 per replica')")
        page.shot("apps-autoscaled")


def test_apps_page_shows_scheduled_jobs_and_their_runs(page: Page) -> None:
    agent = page.agent
    with app_named(agent, replicas=0) as app:
        page.open(f"/ui/apps?app={app}")
        page.page.wait_for_selector("#jobs:has-text('none')")
        # Scheduled through the CLI's endpoint; it runs every tick (2 s here) on this node.
        agent.client.request("PUT", f"/v1/apps/{app}/jobs/hello", {"cron": "* * * * *", "command": ["echo", "hi"]})
        page.page.wait_for_selector("#jobs li[data-job=hello]:has-text('* * * * * · echo hi')")
        page.page.wait_for_selector("#jobs li[data-job=hello] li:has-text('succeeded'):has-text('exit 0')",
                                    timeout=30_000)
        page.shot("apps-jobs")


@pytest.mark.parametrize("path", ["/ui/", "/ui/apps", "/ui/builds", "/ui/charts"])
def test_every_page_fits_a_phone_screen(page: Page, path: str) -> None:
    page.page.set_viewport_size(PHONE)
    with app_named(page.agent, replicas=0) as app:
        page.open(f"{path}?app={app}")
        page.page.wait_for_selector("main table tbody tr, #charts figure")
        assert page.page.evaluate("document.documentElement.scrollWidth") <= PHONE["width"]
        page.shot(f"phone-{path.strip('/').replace('/', '-')}")
