"""Secrets on disk: after `apps connect` the store holds no webhook secret or deploy key in
the clear, and a node's secrets follow it when it founds or joins a cluster (re-sealed
under the cluster key, so every member can check the webhooks)."""

from __future__ import annotations

import json
import sqlite3
import uuid
from collections.abc import Callable

from agentproc import AgentProcess, free_port, wait_for
from gitserver import deliver, ping_payload

Factory = Callable[..., AgentProcess]


def node_args(k: int) -> list[str]:
    return ["--gossip-listen", f"127.0.0.{k}:{free_port()}", "--proxy-image=", "--discovery", "seeds"]


def deploy_key() -> str:
    body = uuid.uuid4().hex + uuid.uuid4().hex
    return f"-----BEGIN OPENSSH PRIVATE KEY-----\n{body}\n-----END OPENSSH PRIVATE KEY-----\n"


def raw_store(agent: AgentProcess) -> bytes:
    """Every byte of the agent's SQLite store: the database and its write-ahead log."""
    return b"".join(p.read_bytes() for p in agent.data_dir.glob("state.db*"))


def app_secret_schemes(agent: AgentProcess) -> dict[str, str]:
    """Scheme of each app secret in the store, as the table holds it (read-only, beside the agent)."""
    db = sqlite3.connect(f"file:{agent.data_dir / 'state.db'}?mode=ro", uri=True)
    try:
        rows = db.execute("SELECT key, value FROM records WHERE kind = 'secret' AND value IS NOT NULL").fetchall()
    finally:
        db.close()
    return {key: json.loads(value).get("scheme") for key, value in rows if key != "cluster/join"}


def connect(agent: AgentProcess, app: str, secret: str, key: str) -> str:
    url = f"git://127.0.0.1:9/{app}.git"
    out = agent.client.connect(app, {"repo": url, "webhook_secret": secret, "deploy_key": key})
    assert out["webhook_secret"] == secret and out["private"] is True
    return url


def test_secrets_are_sealed_on_disk_and_follow_their_node_into_a_cluster(agent_factory: Factory) -> None:
    a = agent_factory("n0", extra_args=node_args(2))
    b = agent_factory("n1", extra_args=node_args(3))
    secret_a, key_a = "hook-a-" + uuid.uuid4().hex, deploy_key()
    secret_b, key_b = "hook-b-" + uuid.uuid4().hex, deploy_key()
    url_a = connect(a, "sa", secret_a, key_a)
    url_b = connect(b, "sb", secret_b, key_b)

    # Not in a cluster yet: sealed with each node's local key, nothing in the clear.
    assert app_secret_schemes(a) == {"webhook/sa": "local-v1", "deploy-key/sa": "local-v1"}
    assert app_secret_schemes(b) == {"webhook/sb": "local-v1", "deploy-key/sb": "local-v1"}
    assert (a.data_dir / "secrets.key").stat().st_mode & 0o777 == 0o600
    for agent, plain in ((a, (secret_a, key_a)), (b, (secret_b, key_b))):
        raw = raw_store(agent)
        assert all(p.encode() not in raw for p in plain) and b"PRIVATE KEY" not in raw
    assert deliver(a.url, secret_a, "ping", ping_payload(url_a)).status == 200

    # a founds a cluster: its secrets are re-sealed under the cluster key before it answers.
    a.client.request("POST", "/v1/cluster/init")
    assert app_secret_schemes(a) == {"webhook/sa": "cluster-v1", "deploy-key/sa": "cluster-v1"}
    assert deliver(a.url, secret_a, "ping", ping_payload(url_a)).status == 200

    # b joins (restarted with a token, its store kept): its secrets are re-sealed too, so a
    # checks b's app's webhook with the secret b was given.
    token = a.client.request("GET", "/v1/cluster/token")["token"]
    b.stop()
    b.extra_args += ["--join-token", token]
    b.start()
    wait_for(lambda: deliver(a.url, secret_b, "ping", ping_payload(url_b)).status == 200, 40,
             "a to accept a delivery signed with b's webhook secret")
    expected = {f"{kind}/{app}": "cluster-v1" for kind in ("webhook", "deploy-key") for app in ("sa", "sb")}
    for agent in (a, b):
        wait_for(lambda agent=agent: app_secret_schemes(agent) == expected, 30,
                 f"every app secret sealed with the cluster key on {agent.data_dir.name}")
    assert deliver(b.url, secret_a, "ping", ping_payload(url_a)).status == 200
    for agent in (a, b):
        raw = raw_store(agent)
        assert all(p.encode() not in raw for p in (secret_a, key_a, secret_b, key_b))
        assert b"PRIVATE KEY" not in raw
        assert secret_a not in agent.log_path.read_text() and secret_b not in agent.log_path.read_text()
