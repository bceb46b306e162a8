"""Repository matching, build ids, webhook signatures, connection validation."""

from __future__ import annotations

import hashlib
import hmac
from pathlib import Path
from typing import Any

import pytest
from aiohttp import web as aiohttp_web

from pleaco.api.builds import sign
from pleaco.apps import AppStore
from pleaco.builds.config import BuildConfig
from pleaco.builds.model import (
    DELIVERIES_KEPT,
    DELIVERY_KEY_HEX,
    REPO_CHARS,
    Build,
    Connection,
    build_id,
    canonical_repo,
)
from pleaco.builds.service import AWAITING_IMAGE, BuildService, ConnectError
from pleaco.builds.transfer import names_registry
from pleaco.identity import Identity
from pleaco.store import PACKET_RECORD_BYTES, Store
from pleaco.store.record import gossip_size


@pytest.mark.parametrize("name", [
    "https://github.com/Owner/Repo.git", "https://github.com/Owner/Repo", "git@github.com:Owner/Repo.git",
    "ssh://git@github.com/Owner/Repo.git", "git://github.com/Owner/Repo.git", "Owner/Repo", "https://github.com/Owner/Repo/",
])
def test_github_names_of_one_repo_match(name: str) -> None:
    conn = Connection(app="a", repo="https://github.com/Owner/Repo.git", branch="main")
    assert conn.matches([name]) and conn.matches([name], "main") and not conn.matches([name], "dev")


def test_other_repos_do_not_match() -> None:
    conn = Connection(app="a", repo="https://github.com/owner/repo.git", branch="main")
    assert not conn.matches(["https://github.com/owner/repo2", "owner/other", "https://gitlab.com/owner/repo", ""])
    local = Connection(app="b", repo="git://127.0.0.1:9418/app.git", branch="main")
    assert local.matches(["git://127.0.0.1:9418/app.git"]) and not local.matches(["git://127.0.0.1:9419/app.git"])
    assert canonical_repo("git://127.0.0.1:9418/app.git") == "127.0.0.1:9418/app"


def test_signature_is_githubs() -> None:
    body = b'{"zen":"x"}'
    assert sign("It's a Secret to Everybody", b"Hello, World!") == (
        "sha256=757107ea0eb2509fc211221cce984b8a37570b6d7586c22c46f4379c8b043e17")  # GitHub's documented example
    assert sign("k", body) == "sha256=" + hmac.new(b"k", body, hashlib.sha256).hexdigest()


def test_build_id_is_per_app_and_commit() -> None:
    assert build_id("web", "a" * 40) == "web-aaaaaaaaaaaa"


def _service(tmp_path: Path) -> BuildService:
    store = Store(tmp_path / "state.db", Identity.load_or_create(tmp_path))
    return BuildService(BuildConfig(), tmp_path, "n1", store, AppStore(store, 10), engine=None)  # type: ignore[arg-type]


def test_connect_creates_the_app_and_keeps_the_secret(tmp_path: Path) -> None:
    svc = _service(tmp_path)
    done = svc.connect("web", "https://github.com/o/web.git", None, None)
    conn, secret, created = done.connection, done.secret, done.created
    assert created and conn.branch == "main" and len(secret) == 40 and not done.private
    assert svc.apps.get("web").image == AWAITING_IMAGE and svc.apps.replicas("web") == 0  # type: ignore[union-attr]
    assert (svc.store.value("secret", "webhook/web") or {})["scheme"] == "local-v1"
    assert svc.secretbox.get(svc.store, "webhook/web") == secret
    # Connecting again keeps the secret unless a new one is given.
    again = svc.connect("web", "https://github.com/o/web.git", "dev", None)
    assert (again.secret, again.created) == (secret, False)
    assert svc.connect("web", "https://github.com/o/web.git", "dev", "another-secret").secret == "another-secret"
    assert svc.secretbox.get(svc.store, "webhook/web") == "another-secret"


@pytest.mark.parametrize(("args", "message"), [
    (("Web", "https://x/y", None, None), "name:"),
    (("web", "", None, None), "repo:"),
    (("web", "--upload-pack=evil", None, None), "repo:"),
    (("web", "https://x/y", "a..b", None), "branch:"),
    (("web", "https://x/y", "/main", None), "branch:"),
    (("web", "https://x/y", None, "short"), "webhook_secret:"),
])
def test_connect_rejects_bad_input_and_changes_nothing(tmp_path: Path, args: tuple[str, ...], message: str) -> None:
    svc = _service(tmp_path)
    with pytest.raises(ConnectError, match=message):
        svc.connect(*args)
    assert svc.store.records("build") == [] and svc.store.records("app") == []


def test_push_queues_once_supersedes_older_and_remembers_deliveries(tmp_path: Path) -> None:
    svc = _service(tmp_path)
    conn = svc.connect("web", "https://github.com/o/web.git", None, None).connection
    first = svc.push(conn, "a" * 40, delivery="d1")
    assert first.outcome == "queued" and first.build is not None and first.build.state == "queued"
    assert svc.push(conn, "a" * 40, delivery="d1").outcome == "duplicate_delivery"
    assert svc.push(conn, "a" * 40, delivery="d2").outcome == "already_running"
    second = svc.push(conn, "b" * 40, delivery="d3")
    assert second.outcome == "queued"
    older = svc.builds.get(build_id("web", "a" * 40))
    assert older is not None and older.state == "cancelled" and older.superseded_by == build_id("web", "b" * 40)
    assert "superseded by build web-bbbbbbbbbbbb" in older.reason
    # The older commit pushed again (a revert by force-push) is built again: it was never built.
    assert svc.push(conn, "a" * 40, delivery="d4").outcome == "queued"
    assert svc.builds.get(build_id("web", "b" * 40)).state == "cancelled"  # type: ignore[union-attr]
    assert svc.builds.connection("web").deliveries == ["d1", "d2", "d3", "d4"]  # type: ignore[union-attr]
    svc.apps.remove("web")
    assert svc.push(conn, "c" * 40, delivery="d5").outcome == "app_removed"
    assert svc.builds.get(build_id("web", "c" * 40)) is None


def test_recover_resumes_interrupted_builds_then_gives_up(tmp_path: Path) -> None:
    svc = _service(tmp_path)
    svc.engine = type("NoEngine", (), {"remove_leftovers": lambda self, ids=None: 0})()  # type: ignore[assignment]
    conn = svc.connect("web", "https://github.com/o/web.git", None, None).connection
    b = svc.push(conn, "a" * 40).build
    assert b is not None
    b.state, b.attempt, b.node = "building", 1, "n1"
    svc.builds.put(b)
    svc.recover()
    again = svc.builds.get(b.id)
    assert again is not None and again.state == "queued" and "resumed after the agent restarted" in again.reason
    again.state, again.attempt = "testing", 3
    svc.builds.put(again)
    svc.recover()
    final = svc.builds.get(b.id)
    assert final is not None and final.state == "failed" and "interrupted 3 times" in final.reason


@pytest.mark.parametrize(("registry", "ok"), [
    ("", True), ("127.0.0.1:5000/myteam", True), ("registry.example.com", True), ("localhost:5000/a/b-c", True),
    ("http://registry.example.com", False), ("registry.example.com/Team", False), ("registry.example.com/", False),
    ("registry.example.com/a b", False),
])
def test_registry_setting_is_a_registry_and_namespace(registry: str, ok: bool) -> None:
    problems = BuildConfig(registry=registry).validate()
    assert (problems == []) is ok, problems
    assert ok or problems[0].startswith("build.registry: ")


@pytest.mark.parametrize(("ref", "names"), [
    ("127.0.0.1:5000/team/app:0123456789ab", True), ("registry.example.com/app:1", True), ("localhost/app", True),
    ("pleaco/busybox:latest", False), ("busybox", False), ("sha256:" + "0" * 64, False),
])
def test_only_references_naming_a_registry_are_pulled(ref: str, names: bool) -> None:
    assert names_registry(ref) is names


def _released(svc: BuildService, conn: Connection, commit: str, image: str) -> Build:
    """Push ``commit`` and finish its build as the worker would: succeeded and released."""
    b = svc.push(conn, commit, delivery="body-" + commit[:6]).build
    assert b is not None
    res = svc.apps.deploy(conn.app, {"image": image}, release_info={"commit": commit, "build": b.id})
    b.state, b.image, b.release = "succeeded", image, res.spec.revision
    return svc.builds.put(b)


class _Images:
    """The one engine call a release-again needs: every image is present."""

    def image_id(self, ref: str) -> str:
        return ref


def test_a_push_of_an_older_commit_never_moves_the_app_back(tmp_path: Path) -> None:
    svc = _service(tmp_path)
    svc.engine = _Images()  # type: ignore[assignment]
    conn = svc.connect("web", "https://github.com/o/web.git", None, None).connection
    old = _released(svc, conn, "a" * 40, "img-a")
    new = _released(svc, conn, "b" * 40, "img-b")
    # The older push replayed (any delivery id, any body): refused, naming the released commit.
    stale = svc.push(conn, old.commit, delivery="never-seen")
    assert stale.outcome == "stale_push" and stale.released_commit == new.commit
    assert "older than commit bbbbbbbbbbbb" in stale.reason and "apps rollback web" in stale.reason
    assert svc.apps.get("web").image == "img-b"  # type: ignore[union-attr]
    # A build cancelled by a newer one that then released is just as old.
    c = svc.push(conn, "c" * 40).build
    d = _released(svc, conn, "d" * 40, "img-d")
    assert c is not None and svc.builds.get(c.id).state == "cancelled"  # type: ignore[union-attr]
    assert svc.push(conn, c.commit, delivery="x").outcome == "stale_push"
    assert svc.builds.get(c.id).state == "cancelled"  # type: ignore[union-attr]
    # Going back is `apps rollback`; the newest commit pushed again then moves forward again.
    svc.apps.rollback("web")
    assert svc.apps.get("web").image == "img-b"  # type: ignore[union-attr]
    # (Releasing it again reads its pleaco.toml from the source, which there is none of
    # here: it stays already_built; tests/integration/test_build.py releases it for real.)
    assert svc.push(conn, d.commit, delivery="y").outcome == "already_built"
    assert svc.push(conn, new.commit, delivery="z").outcome == "stale_push"


def test_a_thousand_pushes_keep_the_repository_record_in_one_packet(tmp_path: Path) -> None:
    svc = _service(tmp_path)
    app = "a" * 63  # the longest name: its record is the largest
    conn = svc.connect(app, "https://github.com/" + "o" * 100 + "/" + "r" * 100 + ".git", "b" * 200, None).connection
    for i in range(1000):
        svc.push(conn, f"{i:040x}", delivery=hashlib.sha256(str(i).encode()).hexdigest()[:DELIVERY_KEY_HEX])
    rec = svc.store.get("build", "repo/" + app)
    assert rec is not None and rec.value is not None and len(rec.value["deliveries"]) == DELIVERIES_KEPT
    assert gossip_size(rec.kind, rec.key, rec.value) <= PACKET_RECORD_BYTES
    # The newest deliveries are the ones remembered.
    latest = hashlib.sha256(b"999").hexdigest()[:DELIVERY_KEY_HEX]
    assert svc.push(conn, f"{999:040x}", delivery=latest).outcome == "duplicate_delivery"


def test_connection_records_fit_one_packet_at_their_largest() -> None:
    worst = Connection(app="a" * 63, repo="h" * REPO_CHARS, branch="b" * 255, created_ms=10**13 - 1,
                       deliveries=["f" * DELIVERY_KEY_HEX] * DELIVERIES_KEPT, last_commit="f" * 40)
    assert gossip_size("build", "repo/" + worst.app, worst.to_value()) <= PACKET_RECORD_BYTES


def test_reconnecting_to_another_repository_drops_its_credentials(tmp_path: Path) -> None:
    svc = _service(tmp_path)
    assert svc.connect("web", "https://github.com/o/web.git", None, None, repo_token="tok-123").private
    # The same repository again (a new branch): the token stays.
    same = svc.connect("web", "https://github.com/o/web", "dev", None)
    assert same.private and svc.git_auth("web").token == "tok-123"
    # Another repository without a token: the token is not sent there, and the answer says so.
    other = svc.connect("web", "https://git.example.org/x/web.git", None, None)
    assert not other.private and svc.git_auth("web").token is None
    assert svc.store.value("secret", "repo-token/web") is None
    # Another repository with its own token: that one is kept.
    assert svc.connect("web", "https://git.example.org/y/web.git", None, None, repo_token="tok-456").private
    assert svc.git_auth("web").token == "tok-456"


def test_connect_refuses_a_repository_url_too_long(tmp_path: Path) -> None:
    svc = _service(tmp_path)
    with pytest.raises(ConnectError, match="repo: longer than"):
        svc.connect("web", "https://github.com/" + "o" * REPO_CHARS, None, None)
    assert svc.store.records("build") == []


def test_a_large_signed_push_is_checked_off_the_loop_and_queued(tmp_path: Path) -> None:
    """Bodies over INLINE_HMAC_BYTES take the worker-thread path; it accepts the right
    signature and refuses a wrong one (and a body over the limit is refused unread)."""
    import asyncio
    import json

    from aiohttp import web
    from aiohttp.test_utils import TestClient, TestServer

    from pleaco.api.builds import HOOK_PATH, INLINE_HMAC_BYTES, add_routes
    from pleaco.api.config import ApiConfig
    from pleaco.api.jsonbody import MAX_JSON_DEPTH

    svc = _service(tmp_path)
    secret = svc.connect("web", "https://github.com/o/web.git", None, "a-long-secret").secret
    payload = {"ref": "refs/heads/main", "after": "a" * 40, "repository": {"clone_url": "https://github.com/o/web.git"},
               "padding": "x" * INLINE_HMAC_BYTES}
    body = json.dumps(payload).encode()

    async def run() -> list[int]:
        app = web.Application(middlewares=[api_errors])
        app[MAX_JSON_DEPTH] = ApiConfig().max_json_depth  # what ApiServer sets
        add_routes(app, svc)
        async with TestClient(TestServer(app)) as client:
            out = []
            for sig, data in [(sign(secret, body), body), (sign("wrong-secret", body), body),
                              (sign(secret, body), b"x" * (svc.cfg.webhook_max_body_bytes + 1))]:
                resp = await client.post(HOOK_PATH, data=data, headers={
                    "X-Hub-Signature-256": sig, "X-GitHub-Event": "push", "Content-Type": "application/json"})
                out.append(resp.status)
            return out

    assert asyncio.run(run()) == [202, 401, 413]
    assert svc.builds.get(build_id("web", "a" * 40)) is not None


def test_a_push_is_built_by_the_apps_owner_and_a_gone_owners_builds_are_taken_over(tmp_path: Path) -> None:
    from pleaco.placement import Owners, app_owner

    store = Store(tmp_path / "state.db", Identity.load_or_create(tmp_path))
    live = ["n1", "n2", "n3"]
    owner = app_owner("web", live)
    here = next(n for n in live if n != owner)  # the push lands on a node that is not the owner
    svc = BuildService(BuildConfig(), tmp_path, here, store, AppStore(store, 10), engine=None,  # type: ignore[arg-type]
                       owners=Owners(here, lambda: live))
    conn = svc.connect("web", "https://github.com/o/web.git", None, None).connection
    result = svc.push(conn, "a" * 40, "d1")
    assert result.outcome == "queued" and result.build is not None and result.build.node == owner
    svc.adopt()
    assert svc.builds.get(result.build.id).node == owner  # type: ignore[union-attr]  # the owner is alive
    # The owner dies; the next owner takes its unfinished build over, from the start.
    live.remove(owner)
    successor = app_owner("web", live)
    heir = BuildService(BuildConfig(), tmp_path, successor, store, AppStore(store, 10), engine=None,  # type: ignore[arg-type]
                        owners=Owners(successor, lambda: live))
    other = next(n for n in live if n != successor)
    bystander = BuildService(BuildConfig(), tmp_path, other, store, AppStore(store, 10), engine=None,  # type: ignore[arg-type]
                             owners=Owners(other, lambda: live))
    bystander.adopt()
    assert svc.builds.get(result.build.id).node == owner  # type: ignore[union-attr]  # not its to take
    heir.adopt()
    taken = heir.builds.get(result.build.id)
    assert taken is not None and taken.node == successor and taken.state == "queued"
    assert f"taken over from node {owner[:12]}" in taken.reason
    store.close()


def test_a_webhook_body_sent_too_slowly_gets_408(tmp_path: Path) -> None:
    """A client that never finishes its body holds a connection and memory: the webhook
    (like every API body) must arrive within [api] body_timeout."""
    import asyncio

    from aiohttp import web
    from aiohttp.test_utils import TestServer

    from pleaco.api.builds import HOOK_PATH, add_routes
    from pleaco.api.jsonbody import BODY_TIMEOUT, MAX_JSON_DEPTH

    svc = _service(tmp_path)

    async def run() -> bytes:
        app = web.Application(middlewares=[api_errors])
        app[MAX_JSON_DEPTH], app[BODY_TIMEOUT] = 64, 0.2
        add_routes(app, svc)
        server = TestServer(app)
        await server.start_server()
        try:
            reader, writer = await asyncio.open_connection(server.host, server.port)
            writer.write(f"POST {HOOK_PATH} HTTP/1.1\r\nHost: x\r\nContent-Length: 1000\r\n"
                         "X-Hub-Signature-256: sha256=00\r\n\r\n{\"ref\":".encode())
            await writer.drain()
            answer = await asyncio.wait_for(reader.read(4096), 5)  # well before the client gives up
            writer.close()
            return answer
        finally:
            await server.close()

    answer = asyncio.run(run())
    assert answer.startswith(b"HTTP/1.1 408") and b"body_timeout" in answer


@aiohttp_web.middleware
async def api_errors(request: aiohttp_web.Request, handler: Any) -> aiohttp_web.StreamResponse:
    """What the ApiServer's error middleware does, for the build routes alone."""
    from pleaco.api.errors import ApiError

    try:
        return await handler(request)  # type: ignore[no-any-return]
    except ApiError as exc:
        return aiohttp_web.json_response(exc.to_json(), status=exc.status)
