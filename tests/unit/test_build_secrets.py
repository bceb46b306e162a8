"""Secrets sealed in the store: the schemes, tampering, wrong keys, moved records, plain
values of earlier versions, and re-sealing when the node founds or joins a cluster."""

from __future__ import annotations

import json
import stat
from pathlib import Path
from typing import Any

import pytest

from pleaco.apps import AppStore
from pleaco.builds.config import BuildConfig
from pleaco.builds.secrets import LOCAL_KEY_FILE, SecretBox, SecretError
from pleaco.builds.service import BuildService
from pleaco.builds.source import SourceError
from pleaco.cluster import trust
from pleaco.cluster.trust import ClusterState
from pleaco.identity import Identity
from pleaco.store import Store

DEPLOY_KEY = ("-----BEGIN OPENSSH PRIVATE KEY-----\nb3BlbnNzaC1rZXktdjEAAAAA-not-really\n"
              "-----END OPENSSH PRIVATE KEY-----\n")


class Holder:
    """The cluster state as the agent's Cluster holds it: None until founded or joined."""

    def __init__(self, state: ClusterState | None = None) -> None:
        self.state = state

    def __call__(self) -> ClusterState | None:
        return self.state


def local_box(tmp_path: Path, name: str = "node") -> SecretBox:
    return SecretBox(tmp_path / name)


def cluster_box(tmp_path: Path, state: ClusterState, name: str = "member") -> SecretBox:
    return SecretBox(tmp_path / name, lambda: state)


def store(tmp_path: Path, name: str = "node") -> Store:
    return Store(tmp_path / name / "state.db", Identity.load_or_create(tmp_path / name))


def flip(text: str, at: int = 3) -> str:
    """The base64url text with one character changed."""
    return text[:at] + ("A" if text[at] != "A" else "B") + text[at + 1:]


# -- the schemes -----------------------------------------------------------------------------


def test_local_round_trip_and_the_key_file(tmp_path: Path) -> None:
    box = local_box(tmp_path)
    value = box.seal("webhook/web", "s3cret-value")
    assert value["scheme"] == "local-v1" and set(value) == {"scheme", "nonce", "sealed"}
    assert "s3cret-value" not in json.dumps(value)
    assert box.unseal("webhook/web", value) == "s3cret-value"
    key_file = tmp_path / "node" / LOCAL_KEY_FILE
    assert len(key_file.read_bytes()) == 32 and stat.S_IMODE(key_file.stat().st_mode) == 0o600
    # The key is kept: the next agent on this data dir opens what this one sealed.
    assert local_box(tmp_path).unseal("webhook/web", value) == "s3cret-value"
    # Each seal has its own nonce.
    assert box.seal("webhook/web", "s3cret-value") != value


def test_cluster_round_trip_opens_on_every_member_and_needs_no_local_key(tmp_path: Path) -> None:
    state = ClusterState.create()
    value = cluster_box(tmp_path, state, "a").seal("deploy-key/web", DEPLOY_KEY)
    assert value["scheme"] == "cluster-v1" and set(value) == {"scheme", "nonce", "sealed"}
    assert "PRIVATE KEY" not in json.dumps(value)
    assert cluster_box(tmp_path, state, "b").unseal("deploy-key/web", value) == DEPLOY_KEY
    assert not (tmp_path / "a" / LOCAL_KEY_FILE).exists()


@pytest.mark.parametrize("text", ["", "x", "ünïcødé ✓", "a" * 20000])
def test_round_trip_of_any_text(tmp_path: Path, text: str) -> None:
    for box in (local_box(tmp_path), cluster_box(tmp_path, ClusterState.create())):
        assert box.unseal("repo-token/web", box.seal("repo-token/web", text)) == text


def test_text_that_is_not_utf8_is_refused(tmp_path: Path) -> None:
    with pytest.raises(SecretError, match="repo-token/web"):
        local_box(tmp_path).seal("repo-token/web", "bad \ud800 surrogate")


# -- what does not open ----------------------------------------------------------------------


@pytest.mark.parametrize("field", ["sealed", "nonce"])
@pytest.mark.parametrize("clustered", [False, True])
def test_tampering_is_detected(tmp_path: Path, field: str, clustered: bool) -> None:
    box = cluster_box(tmp_path, ClusterState.create()) if clustered else local_box(tmp_path)
    value = box.seal("webhook/web", "s3cret-value")
    tampered = {**value, field: flip(value[field])}
    with pytest.raises(SecretError, match=r"'webhook/web'.*altered"):
        box.unseal("webhook/web", tampered)


@pytest.mark.parametrize("value", [
    {"scheme": "cluster-v1"},
    {"scheme": "cluster-v1", "nonce": "!!", "sealed": "!!"},
    {"scheme": "cluster-v1", "nonce": "AAAA", "sealed": "AAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAA"},  # short nonce
    {"scheme": "cluster-v1", "nonce": 12, "sealed": None},
    {"scheme": "rot13", "data": "frperg"},
    {"scheme": "plain"},
    {"data": "no scheme"},
    "not an object",
])
def test_malformed_values_raise_secret_error_naming_the_key(tmp_path: Path, value: Any) -> None:
    with pytest.raises(SecretError, match="'webhook/web'"):
        cluster_box(tmp_path, ClusterState.create()).unseal("webhook/web", value)


def test_another_clusters_key_does_not_open(tmp_path: Path) -> None:
    value = cluster_box(tmp_path, ClusterState.create(), "a").seal("webhook/web", "s3cret-value")
    with pytest.raises(SecretError, match="'webhook/web' does not open with this cluster's key"):
        cluster_box(tmp_path, ClusterState.create(), "b").unseal("webhook/web", value)
    with pytest.raises(SecretError, match="this node is in no cluster"):
        local_box(tmp_path, "c").unseal("webhook/web", value)


def test_another_nodes_local_key_does_not_open(tmp_path: Path) -> None:
    value = local_box(tmp_path, "a").seal("webhook/web", "s3cret-value")
    other = local_box(tmp_path, "b")
    with pytest.raises(SecretError, match="this node has none"):
        other.unseal("webhook/web", value)  # b has no local key at all
    other.seal("webhook/other", "x")  # now it has one, and it is not a's
    with pytest.raises(SecretError, match="does not open with this node's local key"):
        other.unseal("webhook/web", value)


def test_a_damaged_local_key_file_is_named(tmp_path: Path) -> None:
    (tmp_path / "node").mkdir()
    (tmp_path / "node" / LOCAL_KEY_FILE).write_bytes(b"short")
    with pytest.raises(SecretError, match=r"secrets\.key is damaged"):
        local_box(tmp_path).seal("webhook/web", "x")


@pytest.mark.parametrize("clustered", [False, True])
def test_a_sealed_value_moved_to_another_key_does_not_open(tmp_path: Path, clustered: bool) -> None:
    box = cluster_box(tmp_path, ClusterState.create()) if clustered else local_box(tmp_path)
    s = store(tmp_path)
    s.put_many([box.put_write("webhook/a", "secret-of-a")])
    assert box.get(s, "webhook/a") == "secret-of-a" and box.get(s, "webhook/b") is None
    # Someone who can write the store copies a's sealed secret to b (to sign as b with a's secret).
    s.put("secret", "webhook/b", s.value("secret", "webhook/a") or {})
    with pytest.raises(SecretError, match=r"'webhook/b'.*copied from another record"):
        box.get(s, "webhook/b")


# -- plain values of earlier versions, and re-sealing ----------------------------------------


def test_plain_values_still_open(tmp_path: Path) -> None:
    assert local_box(tmp_path).unseal("webhook/web", {"scheme": "plain", "data": "old-secret"}) == "old-secret"
    assert cluster_box(tmp_path, ClusterState.create()).unseal("webhook/web", {"scheme": "plain", "data": "x"}) == "x"


@pytest.mark.parametrize("clustered", [False, True])
def test_reseal_rewrites_plain_values(tmp_path: Path, clustered: bool) -> None:
    box = cluster_box(tmp_path, ClusterState.create(), "node") if clustered else local_box(tmp_path)
    s = store(tmp_path)
    s.put_many([("secret", "webhook/a", {"scheme": "plain", "data": "old-a"}),
                ("secret", "deploy-key/a", {"scheme": "plain", "data": DEPLOY_KEY})])
    assert box.reseal(s) == 2
    scheme = "cluster-v1" if clustered else "local-v1"
    assert {r.value["scheme"] for r in s.records("secret") if r.value} == {scheme}
    assert box.get(s, "webhook/a") == "old-a" and box.get(s, "deploy-key/a") == DEPLOY_KEY
    assert box.reseal(s) == 0  # nothing left to do
    assert all("old-a" not in json.dumps(r.value) for r in s.records("secret"))


def test_founding_reseals_local_secrets_for_the_other_members(tmp_path: Path) -> None:
    holder = Holder()
    box = SecretBox(tmp_path / "node", holder)
    s = store(tmp_path)
    s.put_many([box.put_write("webhook/web", "s3cret-value"), box.put_write("deploy-key/web", DEPLOY_KEY),
                box.put_write("repo-token/api", "ghp_token")])
    assert {r.value["scheme"] for r in s.records("secret") if r.value} == {"local-v1"}
    # The node founds a cluster: the state appears, the join secret is stored, the hook runs.
    holder.state = ClusterState.create()
    join_secret = trust.new_join_secret()
    trust.store_join_secret(s, holder.state, join_secret)
    assert box.reseal(s) == 3
    app_secrets = [r for r in s.records("secret") if r.key != trust.JOIN_SECRET_KEY]
    assert {r.value["scheme"] for r in app_secrets if r.value} == {"cluster-v1"}
    # Nothing lost, and another member (its own data dir, no local key of this node) reads them.
    member = cluster_box(tmp_path, holder.state, "member")
    assert [member.unseal(r.key, r.value) for r in app_secrets] == [DEPLOY_KEY, "ghp_token", "s3cret-value"]
    # The join secret (not this module's) is left as it was.
    assert trust.load_join_secret(s, holder.state) == join_secret
    assert box.reseal(s) == 0
    # New secrets are sealed with the cluster key at once.
    assert box.seal("webhook/new", "x")["scheme"] == "cluster-v1"


def test_reseal_leaves_what_it_cannot_open(tmp_path: Path) -> None:
    state = ClusterState.create()
    box = cluster_box(tmp_path, state, "node")
    s = store(tmp_path)
    # A local secret of another node that joined without re-sealing it, and a damaged one.
    foreign = local_box(tmp_path, "other").seal("webhook/theirs", "theirs")
    s.put_many([("secret", "webhook/theirs", foreign), ("secret", "webhook/mine", {"scheme": "plain", "data": "m"}),
                ("secret", "webhook/broken", {"scheme": "plain"})])
    assert box.reseal(s) == 1
    assert s.value("secret", "webhook/theirs") == foreign
    assert box.get(s, "webhook/mine") == "m"


# -- the build service ----------------------------------------------------------------------


def service(tmp_path: Path, box: SecretBox | None = None) -> BuildService:
    s = store(tmp_path)
    return BuildService(BuildConfig(), tmp_path / "node", "n1", s, AppStore(s, 10), engine=None,  # type: ignore[arg-type]
                        secretbox=box)


def test_connect_keeps_every_secret_sealed(tmp_path: Path) -> None:
    svc = service(tmp_path, cluster_box(tmp_path, ClusterState.create(), "node"))
    svc.connect("web", "git@github.com:o/web.git", None, "s3cret-value", "ghp_token", DEPLOY_KEY)
    values = {r.key: r.value for r in svc.store.records("secret")}
    assert set(values) == {"webhook/web", "repo-token/web", "deploy-key/web"}
    assert all(v and v["scheme"] == "cluster-v1" for v in values.values())
    dump = json.dumps([r.value for r in svc.store.all()])
    assert "s3cret-value" not in dump and "ghp_token" not in dump and "PRIVATE KEY" not in dump
    assert svc.webhook_secret("web") == "s3cret-value"
    auth = svc.git_auth("web")
    assert auth.token == "ghp_token" and auth.ssh_key == DEPLOY_KEY


def test_unreadable_secrets_fail_the_fetch_and_match_no_delivery(tmp_path: Path) -> None:
    svc = service(tmp_path)
    svc.connect("web", "git@github.com:o/web.git", None, "s3cret-value", None, DEPLOY_KEY)
    for key in ("webhook/web", "deploy-key/web"):
        value = svc.store.value("secret", key) or {}
        svc.store.put("secret", key, {**value, "sealed": flip(value["sealed"])})
    assert svc.webhook_secret("web") is None
    with pytest.raises(SourceError, match=r"'deploy-key/web'.*connect the app again"):
        svc.git_auth("web")
    # Connecting again replaces the secret that cannot work.
    secret = svc.connect("web", "git@github.com:o/web.git", None, None, None, DEPLOY_KEY).secret
    assert len(secret) == 40 and svc.webhook_secret("web") == secret and svc.git_auth("web").ssh_key == DEPLOY_KEY
