"""Repository matching, build ids, webhook signatures, connection validation."""

from __future__ import annotations

import hashlib
import hmac
from pathlib import Path

import pytest

from pleaco.api.builds import sign
from pleaco.apps import AppStore
from pleaco.builds.config import BuildConfig
from pleaco.builds.model import Connection, build_id, canonical_repo
from pleaco.builds.service import AWAITING_IMAGE, BuildService, ConnectError
from pleaco.builds.transfer import names_registry
from pleaco.identity import Identity
from pleaco.store import Store


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
    conn, secret, created = svc.connect("web", "https://github.com/o/web.git", None, None)
    assert created and conn.branch == "main" and len(secret) == 40
    assert svc.apps.get("web").image == AWAITING_IMAGE and svc.apps.replicas("web") == 0  # type: ignore[union-attr]
    assert (svc.store.value("secret", "webhook/web") or {})["scheme"] == "local-v1"
    assert svc.secretbox.get(svc.store, "webhook/web") == secret
    # Connecting again keeps the secret unless a new one is given.
    assert svc.connect("web", "https://github.com/o/web.git", "dev", None)[1:] == (secret, False)
    assert svc.connect("web", "https://github.com/o/web.git", "dev", "another-secret")[1] == "another-secret"
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
    conn, _, _ = svc.connect("web", "https://github.com/o/web.git", None, None)
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
    conn, _, _ = svc.connect("web", "https://github.com/o/web.git", None, None)
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
