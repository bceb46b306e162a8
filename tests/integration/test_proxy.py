"""The reverse proxy with real parts: a Caddy container (pleaco/caddy, Debian's caddy
binary), a real agent process, real app containers, real HTTP on 127.0.0.1."""

from __future__ import annotations

import concurrent.futures
import json
import shutil
import socket
import ssl
import subprocess
import urllib.error
import urllib.request
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import docker.errors
import pytest
from agentproc import (
    CADDY,
    AgentProcess,
    ProxyPorts,
    docker_client,
    free_port,
    node_containers,
    remove_node_containers,
    wait_for,
)
from conftest import HELLO
from proxyload import Load
from test_cli import cli

from pleaco.api.errors import ApiError
from pleaco.identity import Identity
from pleaco.store import Store

ECHO = "pleaco-test/echo:latest"
ECHO_SERVER = """#!/bin/sh
# Answers /cgi-bin/env with the request headers busybox httpd passes to CGI (HTTP_*).
mkdir -p /www/cgi-bin
echo ok > /www/healthz
printf '#!/bin/sh\\nprintf "Content-Type: text/plain\\\\r\\\\n\\\\r\\\\n"\\nenv | grep ^HTTP_ | sort\\n' \\
    > /www/cgi-bin/env
cat > /www/cgi-bin/inflight <<'END'
#!/bin/sh
# Answers, after a second, how many requests are in here at once (this one included).
mkdir -p /tmp/inflight
touch /tmp/inflight/$$
sleep 1
n=$(ls /tmp/inflight | wc -l)
rm /tmp/inflight/$$
printf 'Content-Type: text/plain\r\n\r\n%s\n' "$n"
END
chmod +x /www/cgi-bin/env /www/cgi-bin/inflight
exec httpd -f -p 8080 -h /www
"""


@dataclass
class Proxied:
    agent: AgentProcess
    http: int
    https: int
    admin: int

    def get(self, host: str, path: str = "/", https: bool = False,
            timeout: float = 5) -> tuple[int, str, dict[str, str]]:
        """GET through the proxy with this Host header: (status, body, headers); no redirects."""
        if https:
            return self._get_tls(host, path, timeout)
        req = urllib.request.Request(f"http://127.0.0.1:{self.http}{path}", headers={"Host": host})

        class NoRedirect(urllib.request.HTTPRedirectHandler):
            def redirect_request(self, *args: object, **kwargs: object) -> None:
                return None

        opener = urllib.request.build_opener(NoRedirect)
        try:
            with opener.open(req, timeout=timeout) as resp:
                return resp.status, resp.read().decode(), dict(resp.headers)
        except urllib.error.HTTPError as exc:
            return exc.code, exc.read().decode(), dict(exc.headers)

    def _get_tls(self, host: str, path: str, timeout: float) -> tuple[int, str, dict[str, str]]:
        """HTTPS to 127.0.0.1 with ``host`` as SNI (urllib sends none for an IP address)."""
        ctx = ssl.create_default_context()
        ctx.check_hostname, ctx.verify_mode = False, ssl.CERT_NONE  # signed by the proxy's own CA
        with socket.create_connection(("127.0.0.1", self.https), timeout) as raw, \
                ctx.wrap_socket(raw, server_hostname=host) as tls:
            tls.sendall(f"GET {path} HTTP/1.1\r\nHost: {host}\r\nConnection: close\r\n\r\n".encode())
            data = b""
            while chunk := tls.recv(65536):
                data += chunk
        head, _, body = data.decode().partition("\r\n\r\n")
        lines = head.split("\r\n")
        headers = dict(line.split(": ", 1) for line in lines[1:] if ": " in line)
        return int(lines[0].split()[1]), body, headers

    def proxy_container(self) -> docker.models.containers.Container:
        found = docker_client().containers.list(
            all=True, filters={"label": ["pleaco.role=proxy", f"pleaco.node={self.agent.node_id}"]})
        assert len(found) == 1, found
        return found[0]


@pytest.fixture(scope="module", autouse=True)
def echo_image(tmp_path_factory: pytest.TempPathFactory) -> None:
    ctx: Path = tmp_path_factory.mktemp("echo")
    (ctx / "serve.sh").write_text(ECHO_SERVER)
    (ctx / "Dockerfile").write_text(
        'FROM pleaco/busybox:latest\nCOPY serve.sh /serve.sh\nCMD ["/bin/sh", "/serve.sh"]\n')
    subprocess.run(["docker", "build", "-q", "-t", ECHO, str(ctx)], check=True, capture_output=True,
                   env={"DOCKER_BUILDKIT": "0", "PATH": "/usr/bin:/bin:/usr/sbin:/sbin"})
    docker_client().images.get(CADDY)  # made by scripts/images.sh (the session fixture)


def start_proxied(agent_factory: Callable[..., AgentProcess], name: str,
                  extra_args: list[str] | None = None, env: dict[str, str] | None = None) -> Proxied:
    ports = ProxyPorts()
    agent = agent_factory(
        name, extra_args=[*ports.args(), *(extra_args or [])],
        env={**ports.env(), "PLEACO_PROXY_HEALTH_INTERVAL": "1", "PLEACO_ROLLOUT_DRAIN_GRACE": "1",
             "PLEACO_ROLLOUT_DEADLINE": "8", "PLEACO_HEALTH_GRACE": "3", **(env or {})},
    )
    p = Proxied(agent, ports.http, ports.https, ports.admin)
    wait_for(lambda: agent.client.request("GET", "/v1/proxy")["up"], 30, "the proxy to be up")
    return p  # agent_factory's cleanup removes the proxy too: it carries pleaco.node


@pytest.fixture
def proxied(agent_factory: Callable[..., AgentProcess]) -> Proxied:
    return start_proxied(agent_factory, "px")


def routes(p: Proxied) -> dict[str, list[str]]:
    return {r["host"]: r["upstreams"] for r in p.agent.client.request("GET", "/v1/proxy")["routes"]}


def test_proxy_is_a_labelled_infrastructure_container_the_app_reconciler_leaves_alone(proxied: Proxied) -> None:
    c = proxied.proxy_container()
    assert c.labels["pleaco.role"] == "proxy" and c.labels["pleaco.node"] == proxied.agent.node_id
    assert "pleaco.app" not in c.labels and c.attrs["HostConfig"]["NetworkMode"] == "host"
    # An app deployed and removed makes the app reconciler run passes that remove what it
    # does not want; the proxy must be the same container afterwards.
    proxied.agent.client.deploy("web", {"image": HELLO, "port": 8080, "health": "/healthz"})
    wait_for(lambda: proxied.get("web.pleaco.internal")[0] == 200, 30, "web through the proxy")
    proxied.agent.client.remove("web")
    wait_for(lambda: proxied.get("web.pleaco.internal")[0] == 404, 30, "web's route gone")
    # The app's container goes once drained; the proxy is not an app container and stays.
    wait_for(lambda: proxied.agent.client.status()["containers"] == 0, 30, "web's container removed")
    assert proxied.proxy_container().id == c.id and proxied.proxy_container().status == "running"
    # The admin API answers on loopback only.
    admin = urllib.request.urlopen(f"http://127.0.0.1:{proxied.admin}/config/", timeout=5).read()
    assert b'"pleaco-web' not in admin


def test_routes_by_host_to_healthy_replicas_with_forwarded_headers(proxied: Proxied) -> None:
    client = proxied.agent.client
    client.deploy("echo", {"image": ECHO, "port": 8080, "health": "/healthz", "host": "echo.test"})
    client.deploy("web", {"image": HELLO, "port": 8080, "health": "/healthz", "replicas": 2})
    wait_for(lambda: len(routes(proxied).get("web.pleaco.internal", [])) == 2, 30, "2 web upstreams")
    status, body, _ = wait_for(lambda: (r := proxied.get("echo.test", "/cgi-bin/env"))[0] == 200 and r, 30, "echo")
    assert "HTTP_X_FORWARDED_FOR=127.0.0.1" in body and "HTTP_X_FORWARDED_PROTO=http" in body
    # Both web replicas answer (least_conn spreads sequential requests over idle upstreams).
    answers = {proxied.get("web.pleaco.internal")[1] for _ in range(20)}
    assert len(answers) == 2 and all(a.startswith("hello from ") for a in answers)
    # An unknown host is a clear 404, not someone else's app.
    status, body, _ = proxied.get("nobody.test")
    assert status == 404 and "no app" in body
    # HTTPS with the internal CA for local names; the app sees the scheme.
    status, body, _ = wait_for(lambda: (r := proxied.get("echo.test", "/cgi-bin/env", https=True))[0] == 200 and r,
                               30, "echo over HTTPS")
    assert "HTTP_X_FORWARDED_PROTO=https" in body
    # Per app: redirect HTTP to HTTPS.
    client.deploy("echo", {"image": ECHO, "port": 8080, "health": "/healthz", "host": "echo.test",
                           "https": "redirect"})
    status, _, headers = wait_for(lambda: (r := proxied.get("echo.test", "/x?y=1"))[0] == 308 and r, 30, "redirect")
    assert headers["Location"] == f"https://echo.test:{proxied.https}/x?y=1"
    # Per-app traffic reaches pleaco's /metrics.
    metrics = wait_for(lambda: 'pleaco_app_requests_total{app="web",code="2xx"} 20' in (m := _metrics(proxied))
                       and m, 10, "web's requests counted")
    assert 'pleaco_app_request_duration_seconds_count{app="echo"}' in metrics
    assert "pleaco_proxy_up 1" in metrics
    # While nothing changes, a pass only asks the proxy for this start's marker (the real
    # Caddy answers GET /id/MARKER), not for its whole config.
    def marker_checks() -> float:
        return sum(float(line.rsplit(" ", 1)[1]) for line in _metrics(proxied).splitlines()
                   if line.startswith('pleaco_proxy_config_checks_total{kind="marker"}'))

    before = marker_checks()
    wait_for(lambda: marker_checks() >= before + 3, 10, "passes that only checked the marker")

    # busybox httpd closes every connection, so each request is a new dial by name: the
    # names are in the proxy's hosts file, so they cost no query to the agent's DNS (Go
    # re-reads the file at most every 5 s: the first dials after a change may still ask).
    def dials_without_queries() -> bool:
        before = proxied.agent.client.request("GET", "/v1/proxy")["dns"]["address_queries"]
        assert all(proxied.get("web.pleaco.internal")[0] == 200 for _ in range(20))
        return proxied.agent.client.request("GET", "/v1/proxy")["dns"]["address_queries"] - before < 5

    wait_for(dials_without_queries, 30, "20 dials answered from the hosts file")


def _metrics(p: Proxied) -> str:
    req = urllib.request.Request(p.agent.url + "/metrics", headers={"Authorization": f"Bearer {p.agent.token}"})
    with urllib.request.urlopen(req, timeout=5) as resp:
        return str(resp.read().decode())


def test_rollouts_under_load_drop_no_request_and_a_failing_release_is_rolled_back(proxied: Proxied) -> None:
    client = proxied.agent.client
    spec = {"image": HELLO, "port": 8080, "health": "/healthz", "replicas": 2, "host": "roll.test"}
    client.deploy("roll", {**spec, "env": {"GREETING": "v1"}})
    wait_for(lambda: "(v1)" in proxied.get("roll.test")[1], 30, "v1 through the proxy")
    with Load(f"http://127.0.0.1:{proxied.http}/", "roll.test", rate=250, max_seconds=60) as load:
        wait_for(lambda: load.seen("v1") >= 100, 10, "load flowing")
        client.deploy("roll", {**spec, "env": {"GREETING": "v2"}})
        # Done: only release 2 containers are left, and the proxy serves v2.
        wait_for(lambda: {i["release"] for i in client.app("roll")["instances"]} == {2}, 30, "v1 replaced")
        wait_for(lambda: load.seen("v2") >= 200, 10, "v2 under load")
        v2_seen = load.seen("v2")
        result = load.stop()
    assert result.failures == [], result.failures[:5]
    assert result.rate >= 200, f"only {result.rate:.0f} requests/s"
    assert result.bodies["v1"] >= 100 and v2_seen >= 200
    assert all("(v2)" in proxied.get("roll.test")[1] for _ in range(10))

    # v3 never passes its health check: v2 keeps serving, and after the deadline pleaco
    # rolls back to v2's spec as revision 4 and says why.
    with Load(f"http://127.0.0.1:{proxied.http}/", "roll.test", rate=250, max_seconds=60) as load:
        client.deploy("roll", {**spec, "health": "/nope", "env": {"GREETING": "v3"}})
        app = wait_for(lambda: (a := client.app("roll"))["revision"] == 4 and a, 40, "automatic rollback")
        wait_for(lambda: (a := client.app("roll"))["healthy"] == 2 and
                 {i["release"] for i in a["instances"]} == {4}, 30, "revision 4 healthy, 2 and 3 gone")
        result = load.stop()
    assert result.failures == [], result.failures[:5]
    assert result.bodies["v3"] == 0 and result.bodies["v2"] >= 1000
    assert app["rollback"]["from"] == 3 and app["rollback"]["to"] == 2
    assert "revision 3 was not healthy" in app["rollback"]["reason"] and "/nope" in app["rollback"]["reason"]
    shown = client.app("roll")
    assert shown["env"] == {"GREETING": "v2"} and "rolled back from revision 3" in shown["message"]


def test_killed_or_removed_proxy_comes_back_with_its_routes(proxied: Proxied) -> None:
    proxied.agent.client.deploy("web", {"image": HELLO, "port": 8080, "health": "/healthz"})
    wait_for(lambda: proxied.get("web.pleaco.internal")[0] == 200, 30, "web through the proxy")
    first = proxied.proxy_container()
    first.kill()
    wait_for(lambda: proxied.proxy_container().status == "running", 30, "the proxy restarted")
    wait_for(lambda: proxied.get("web.pleaco.internal")[0] == 200, 30, "web through the restarted proxy")
    first.remove(force=True)
    second = wait_for(lambda: (c := proxied.proxy_container()).status == "running" and c, 30, "a new proxy")
    assert second.id != first.id
    wait_for(lambda: proxied.get("web.pleaco.internal")[0] == 200, 30, "web through the new proxy")


BAD_BODIES = [
    ({"host": "bad_host!.test"}, "host"),
    ({"host": "-x.test"}, "host"),
    ({"health": "healthz"}, "health"),
    ({"health": "/healthz#%zz"}, "health"),  # pleaco's probe never sends it; Caddy refuses the escape
    ({"health": "/a%zz"}, "health"),
    ({"health": "/a b"}, "health"),
    ({"https": "always"}, "https"),
    ({"https": True}, "https"),
]


def test_bad_proxy_input_is_refused_and_changes_nothing(proxied: Proxied) -> None:
    client = proxied.agent.client
    good = {"image": HELLO, "port": 8080, "health": "/healthz", "host": "web.test"}
    client.deploy("web", good)
    wait_for(lambda: proxied.get("web.test")[0] == 200, 30, "web through the proxy")
    before = (client.app("web")["revision"], routes(proxied))
    for body, field in BAD_BODIES:
        with pytest.raises(ApiError) as err:
            client.deploy("web", {**good, **body})
        assert err.value.status == 400 and err.value.message.startswith(field + ":"), body
    # Two apps, one host name: refused, with the owner named.
    with pytest.raises(ApiError) as err:
        client.deploy("other", {"image": HELLO, "port": 8080, "host": "web.test"})
    assert err.value.status == 400 and "already used by app 'web'" in err.value.message
    # None of it changed the app or the proxy's routes.
    assert (client.app("web")["revision"], routes(proxied)) == before
    assert [a["name"] for a in client.apps()] == ["web"]
    assert proxied.get("web.test")[0] == 200


def _live_transport(p: Proxied, app: str) -> dict[str, object]:
    """The transport of the app's route in the config the running Caddy holds."""
    live = json.loads(urllib.request.urlopen(f"http://127.0.0.1:{p.admin}/config/", timeout=5).read())
    for r in live["apps"]["http"]["servers"]["http"]["routes"]:
        if r.get("@id") == f"pleaco-{app}-proxy":
            return dict(r["handle"][0].get("transport", {}))
    raise AssertionError(f"no route of {app} in the live config")


def test_an_apps_max_conns_caps_the_proxys_connections_to_each_replica(
        agent_factory: Callable[..., AgentProcess]) -> None:
    p = start_proxied(agent_factory, "px", env={"PLEACO_PROXY_UPSTREAM_MAX_CONNS": "8"})
    out = cli(p.agent, "apps", "deploy", "capped", "--image", ECHO, "--port", "8080", "--health", "/healthz",
              "--host", "capped.test", "--max-conns", "2")
    assert out.returncode == 0, out.stderr
    p.agent.client.deploy("plain", {"image": ECHO, "port": 8080, "health": "/healthz", "host": "plain.test"})
    wait_for(lambda: p.get("capped.test", "/healthz")[0] == 200 and p.get("plain.test", "/healthz")[0] == 200,
             30, "both apps through the proxy")
    # The app's own cap, and the [proxy] default for the app that names none.
    assert wait_for(lambda: _live_transport(p, "capped").get("max_conns_per_host") == 2, 10, "the app's cap")
    assert _live_transport(p, "plain")["max_conns_per_host"] == 8
    assert "max conns  2 per replica from each proxy" in cli(p.agent, "apps", "show", "capped").stdout
    # Six requests at once to a replica capped at 2: all are answered (those past the cap
    # wait in Caddy for a connection), and the replica never has more than 2 at a time.
    with concurrent.futures.ThreadPoolExecutor(6) as pool:
        answers = list(pool.map(lambda _: p.get("capped.test", "/cgi-bin/inflight", timeout=30), range(6)))
    assert [a[0] for a in answers] == [200] * 6, answers
    assert max(int(a[1]) for a in answers) <= 2, answers
    # Bad caps are refused, naming the field, and change nothing.
    before = (p.agent.client.app("capped")["revision"], _live_transport(p, "capped"))
    out = cli(p.agent, "apps", "deploy", "capped", "--image", ECHO, "--port", "8080", "--max-conns", "-1")
    assert out.returncode == 1 and out.stderr.startswith("error: max_conns: expected a whole number 0..65535"), \
        out.stderr
    out = cli(p.agent, "apps", "deploy", "capped", "--image", ECHO, "--port", "8080", "--max-conns", "lots")
    assert out.returncode == 2 and "--max-conns" in out.stderr
    for bad in (65536, 10**12, "8", 2.5, True):
        with pytest.raises(ApiError) as err:
            p.agent.client.deploy("capped", {"image": ECHO, "port": 8080, "max_conns": bad})
        assert err.value.status == 400 and err.value.message.startswith("max_conns:"), bad
    assert (p.agent.client.app("capped")["revision"], _live_transport(p, "capped")) == before
    assert p.get("capped.test", "/healthz")[0] == 200


def test_agent_stopped_or_killed_the_proxy_keeps_or_regains_its_routes(proxied: Proxied) -> None:
    agent = proxied.agent
    agent.client.deploy("web", {"image": HELLO, "port": 8080, "health": "/healthz", "replicas": 2,
                                "env": {"GREETING": "steady"}})
    wait_for(lambda: len(routes(proxied).get("web.pleaco.internal", [])) == 2, 30, "2 upstreams")
    # A stopping agent hands the proxy a static config: traffic flows while it is away and
    # after it is back.
    with Load(f"http://127.0.0.1:{proxied.http}/", "web.pleaco.internal", rate=100, max_seconds=40) as load:
        wait_for(lambda: load.seen("steady") >= 50, 10, "load flowing")
        assert agent.stop() == 0
        seen = load.seen("steady")
        wait_for(lambda: load.seen("steady") >= seen + 100, 10, "load flowing without the agent")
        agent.start()
        wait_for(lambda: agent.client.request("GET", "/v1/proxy")["up"], 30, "the proxy up again")
        seen = load.seen("steady")
        wait_for(lambda: load.seen("steady") >= seen + 100, 10, "load flowing after the restart")
        result = load.stop()
    assert result.failures == [], result.failures[:5]
    # Killed, it cannot; started again, it serves the same routes.
    agent.kill()
    agent.start()
    wait_for(lambda: proxied.get("web.pleaco.internal")[1].strip().endswith("(steady)"), 30, "web after the kill")
    wait_for(lambda: len(routes(proxied).get("web.pleaco.internal", [])) == 2, 30, "2 upstreams again")


@pytest.mark.parametrize(("surge", "unavailable", "peak"), [(1, 0, 4), (0, 1, 3)])
def test_rollout_pace_follows_max_surge_and_max_unavailable(
    agent_factory: Callable[..., AgentProcess], surge: int, unavailable: int, peak: int,
) -> None:
    """3 replicas: with max_surge 1 at most 4 containers run at once; with max_surge 0 and
    max_unavailable 1 (stop-first, one at a time) at most 3."""
    agent = agent_factory("pace", env={"PLEACO_ROLLOUT_MAX_SURGE": str(surge),
                                       "PLEACO_ROLLOUT_MAX_UNAVAILABLE": str(unavailable)})
    spec = {"image": HELLO, "port": 8080, "health": "/healthz", "replicas": 3}
    agent.client.deploy("web", {**spec, "env": {"GREETING": "v1"}})
    wait_for(lambda: agent.client.app("web")["healthy"] == 3, 30, "3 healthy replicas")
    engine = docker_client()
    agent.client.deploy("web", {**spec, "env": {"GREETING": "v2"}})
    seen = 0

    def done() -> bool:
        nonlocal seen
        running = engine.containers.list(filters={"label": [f"pleaco.node={agent.node_id}", "pleaco.app=web"],
                                                   "status": "running"})
        seen = max(seen, len(running))
        app = agent.client.app("web")
        return app["healthy"] == 3 and {i["release"] for i in app["instances"]} == {2}

    wait_for(done, 60, "the rollout to finish", interval=0.05)
    assert 3 <= seen <= peak


def test_an_app_on_node_a_answers_through_node_b_proxy(agent_factory: Callable[..., AgentProcess]) -> None:
    """The routing mesh: two clustered agents, each with its proxy; the app's only replica
    runs on one of them and answers through the other's proxy, with the client's address."""
    def gossip(k: int) -> list[str]:
        return ["--gossip-listen", f"127.0.0.{k}:{free_port()}", "--discovery", "seeds"]

    first = start_proxied(agent_factory, "mesh0", gossip(2))
    first.agent.client.request("POST", "/v1/cluster/init")
    token = first.agent.client.request("GET", "/v1/cluster/token")["token"]
    second = start_proxied(agent_factory, "mesh1", [*gossip(3), "--join-token", token])
    nodes = [first, second]
    ids = {p.agent.node_id for p in nodes}
    wait_for(lambda: all({n["id"] for n in p.agent.client.nodes() if n["state"] == "alive"} == ids for p in nodes),
             40, "2 nodes alive everywhere")
    first.agent.client.deploy("echo", {"image": ECHO, "port": 8080, "health": "/healthz", "host": "echo.mesh"})
    a, b = placed(nodes, "echo")
    # B routes to A's replica at the address A published it on ...
    wait_for(lambda: len(routes(b).get("echo.mesh", [])) == 1, 30, "B's proxy routes echo to A")
    _, body, _ = wait_for(lambda: (r := b.get("echo.mesh", "/cgi-bin/env"))[0] == 200 and r, 30,
                          "echo through B's proxy")
    assert "HTTP_X_FORWARDED_FOR=127.0.0.1" in body
    # ... and both proxies serve it.
    assert a.get("echo.mesh", "/cgi-bin/env")[0] == 200

    # A rollout on the node that runs the app, under load through the other node's proxy:
    # the old replica leaves that proxy too before it stops, so no request fails.
    spec = {"image": HELLO, "port": 8080, "health": "/healthz", "host": "roll.mesh"}
    second.agent.client.deploy("roll", {**spec, "env": {"GREETING": "v1"}})
    a, b = placed(nodes, "roll")
    wait_for(lambda: "(v1)" in b.get("roll.mesh")[1], 30, "v1 through the other node's proxy")
    with Load(f"http://127.0.0.1:{b.http}/", "roll.mesh", rate=100, max_seconds=60) as load:
        wait_for(lambda: load.seen("v1") >= 50, 10, "load flowing")
        a.agent.client.deploy("roll", {**spec, "env": {"GREETING": "v2"}})
        wait_for(lambda: {i["release"] for i in a.agent.client.app("roll")["instances"]} == {2}, 40,
                 "v1 replaced")
        wait_for(lambda: load.seen("v2") >= 100, 10, "v2 under load")
        result = load.stop()
    assert result.failures == [], result.failures[:5]
    assert result.bodies["v1"] >= 50 and result.bodies["v2"] >= 100

    # Scaled to 0, the replica leaves both proxies before it stops.
    first.agent.client.request("POST", "/v1/apps/echo/scale", {"replicas": 0})
    wait_for(lambda: routes(b).get("echo.mesh") == [] and routes(a).get("echo.mesh") == [], 30,
             "echo out of both proxies")


def placed(nodes: list[Proxied], app: str) -> tuple[Proxied, Proxied]:
    """(the node that runs the app's one healthy, serving replica, the other node)."""
    def runner() -> str:
        instances = nodes[0].agent.client.request("GET", f"/v1/apps/{app}")["instances"]
        healthy = [i["node"] for i in instances if i["healthy"] and i["serving"]]
        return healthy[0] if len(healthy) == 1 else ""

    where = wait_for(runner, 60, f"{app} healthy and serving on one node")
    a = next(p for p in nodes if p.agent.node_id == where)
    b = next(p for p in nodes if p is not a)
    assert not docker_client().containers.list(filters={"label": [f"pleaco.node={b.agent.node_id}",
                                                                  f"pleaco.app={app}"]})
    return a, b


def test_a_new_identity_on_a_lost_data_dir_removes_the_old_proxy_and_replicas(
    agent_factory: Callable[..., AgentProcess],
) -> None:
    """An agent with a proxy and an app is killed and its data dir lost; a new agent (a new
    identity) starts with the same flags. The old proxy would bind the same ports (Caddy
    uses SO_REUSEPORT) and take part of the traffic and of the admin requests: it must be
    removed, every request must reach the new agent's app, and the old identity's replica
    must go after the grace period."""
    p = start_proxied(agent_factory, "lost", env={"PLEACO_PROXY_ORPHAN_GRACE": "3",
                                                   "PLEACO_PROXY_ORPHAN_CHECK_INTERVAL": "1"})
    agent, host = p.agent, "web.pleaco.internal"
    spec = {"image": HELLO, "port": 8080, "health": "/healthz", "replicas": 2}
    agent.client.deploy("web", {**spec, "env": {"GREETING": "old"}})
    wait_for(lambda: len(routes(p).get(host, [])) == 2, 30, "2 old upstreams")
    old_id = agent.node_id
    try:
        agent.kill()
        shutil.rmtree(agent.data_dir)
        agent.start()  # the same flags and ports; a new identity
        assert agent.node_id != old_id
        agent.client.deploy("web", {**spec, "env": {"GREETING": "new"}})
        wait_for(lambda: len(routes(p).get(host, [])) == 2, 60, "2 new upstreams")
        wait_for(lambda: "(new)" in p.get(host)[1], 30, "the new app through the proxy")
        # One proxy is left, the new agent's, and the old identity's replicas go after the
        # grace period: nothing carries the old node id any more.
        wait_for(lambda: not node_containers(old_id), 60, "the old identity's proxy and replicas removed")
        assert p.proxy_container().status == "running"
        answers = [p.get(host) for _ in range(60)]
        assert [a for a in answers if a[0] != 200 or "(new)" not in a[1]] == []
        assert agent.client.request("GET", "/v1/proxy")["up"]
        # Its admin API answers with the new agent's config only.
        for _ in range(10):
            admin = json.loads(urllib.request.urlopen(f"http://127.0.0.1:{p.admin}/config/admin", timeout=5).read())
            assert admin["@id"].startswith(f"pleaco-agent/{agent.node_id}/")
    finally:
        remove_node_containers(old_id)


def test_a_proxy_restarted_from_its_boot_file_comes_back_whatever_the_health_path(proxied: Proxied) -> None:
    """A health path Caddy cannot parse (written before the API refused it: put into the
    store here while the agent is stopped) must not reach the boot file: the proxy, killed
    and restarted by the engine from that file, comes back with its routes."""
    agent, host = proxied.agent, "bh.test"
    agent.client.deploy("bh", {"image": ECHO, "port": 8080, "health": "/healthz", "host": host})
    wait_for(lambda: proxied.get(host, "/healthz")[0] == 200, 30, "bh through the proxy")
    assert agent.stop() == 0
    store = Store(agent.data_dir / "state.db", Identity.load_or_create(agent.data_dir))
    try:
        value = store.value("app", "bh")
        assert value is not None
        store.put("app", "bh", {**value, "health": "/healthz#%zz"})
    finally:
        store.close()
    agent.start()
    boot = agent.data_dir / "proxy" / "caddy.json"
    wait_for(lambda: agent.client.request("GET", "/v1/proxy")["up"], 30, "the proxy up again")
    # The boot file was written for the new spec (the valid check it had is gone).
    wait_for(lambda: '"uri": "/healthz"' not in boot.read_text(), 30, "the boot file rewritten")
    proxied.proxy_container().kill()  # the engine restarts it (unless-stopped), from the boot file
    wait_for(lambda: proxied.proxy_container().status == "running", 30, "the proxy restarted")
    wait_for(lambda: proxied.get(host, "/healthz")[0] == 200, 30, "bh through the proxy restarted from its boot file")
    assert "%zz" not in boot.read_text()
