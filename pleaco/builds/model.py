"""Builds and repository connections as the replicated store holds them.

- ``build/ID``: one build of one commit of one app. ID is ``APP-COMMIT12``, so one commit
  of an app has exactly one build record: the same commit never builds twice.
- ``build/repo/APP``: the app's connected repository (URL, branch, recent deliveries).
  Build ids never hold a '/', so the two never collide.

``BuildStore`` is the one writer of both; it bounds the delivery list, so a connection
record fits one gossip packet (``pleaco.store.MAX_RECORD_BYTES``) however many pushes come.
- ``secret/webhook/APP``: the webhook secret (see ``pleaco.builds.secrets``).
"""

from __future__ import annotations

import re
import time
from dataclasses import asdict, dataclass, field
from typing import Any

from pleaco.store import Store
from pleaco.store.record import MAX_RECORD_BYTES, gossip_size

Write = tuple[str, str, dict[str, Any] | None]

STATES = ("queued", "fetching", "building", "testing", "scanning", "pushing", "succeeded", "failed", "cancelled")
ACTIVE = frozenset({"queued", "fetching", "building", "testing", "scanning", "pushing"})
TERMINAL = frozenset({"succeeded", "failed", "cancelled"})
REPO_PREFIX = "repo/"
# Deliveries remembered per app, to answer a redelivery without building. A delivery is
# named by the SHA-256 of its signed body (the X-GitHub-Delivery header is not signed), cut
# to DELIVERY_KEY_HEX hex digits: 80 bits, and only signed bodies are hashed, so a
# collision cannot be made. GitHub redelivers on request, normally the latest pushes; an
# older push is refused anyway (a webhook never moves an app back), so a few are enough:
# 8 keys cost ~190 bytes of the connection record, which must fit in a gossip packet.
DELIVERIES_KEPT = 8
DELIVERY_KEY_HEX = 20
# Longest repository URL `apps connect` takes (it is kept in every build record).
REPO_CHARS = 256
BRANCH = re.compile(r"^(?!/)(?!.*\.\.)(?!.*//)[A-Za-z0-9._/-]{1,255}(?<![/.])$")


def now_ms() -> int:
    return int(time.time() * 1000)


def build_id(app: str, commit: str) -> str:
    return f"{app}-{commit[:12]}"


@dataclass
class Build:
    id: str
    app: str
    commit: str
    repo: str
    branch: str
    state: str = "queued"
    reason: str = ""
    node: str = ""
    trigger: str = ""  # webhook | poll | api
    delivery: str = ""
    created_ms: int = field(default_factory=now_ms)
    updated_ms: int = field(default_factory=now_ms)
    started_ms: int = 0
    finished_ms: int = 0
    attempt: int = 0
    steps: dict[str, float] = field(default_factory=dict)  # seconds per finished step
    source_sha256: str = ""
    image: str = ""
    tag: str = ""
    pushed: str = ""  # REGISTRY/APP:COMMIT12 when build.registry is set; the release runs it
    pushed_digest: str = ""  # the digest the registry reported for it
    test: dict[str, Any] = field(default_factory=dict)
    scan: dict[str, Any] = field(default_factory=dict)
    release: int = 0  # the app's revision; a stack's build: the highest of its services'
    superseded_by: str = ""
    # A repository with a compose file (pleaco.builds.stackbuild): its name, and per service
    # what the build made of it (app, image, tag, test, scan, revision, changed).
    compose: str = ""
    services: dict[str, dict[str, Any]] = field(default_factory=dict)

    @property
    def active(self) -> bool:
        return self.state in ACTIVE

    def to_value(self) -> dict[str, Any]:
        return asdict(self)

    def record_value(self) -> dict[str, Any]:
        """The value the store keeps: fields at their empty default are left out (from_value
        puts them back), and what only people read (test output, findings, the reason) is
        trimmed until the record is within what the cluster replicates (the whole test
        output stays in the build log on the building node)."""
        value = {k: v for k, v in asdict(self).items() if k in _REQUIRED or v not in ("", 0, {}, [])}
        for trim in _TRIMS:
            if gossip_size("build", self.id, value) <= MAX_RECORD_BYTES:
                break
            trim(value)
        return value

    @classmethod
    def from_value(cls, value: dict[str, Any]) -> Build:
        known = {k: v for k, v in value.items() if k in cls.__dataclass_fields__}
        return cls(**known)


_REQUIRED = frozenset({"id", "app", "commit", "repo", "branch", "state"})
REASON_CHARS = 2000  # a build's reason as the record keeps it at the most (the log has it all)
SUMMARY_CHARS = 200  # a finding's summary, likewise


def _trim_texts(value: dict[str, Any]) -> None:
    if isinstance(value.get("reason"), str):
        value["reason"] = value["reason"][:REASON_CHARS]
    scan = value.get("scan")
    if isinstance(scan, dict) and isinstance(scan.get("findings"), list):
        scan["findings"] = [{**f, "summary": str(f.get("summary", ""))[:SUMMARY_CHARS]} for f in scan["findings"]]


def _trim_output(value: dict[str, Any]) -> None:
    test = value.get("test")
    if isinstance(test, dict) and isinstance(test.get("output"), str):
        test["output"] = test["output"][-1024:]  # the end says why it failed


def _trim_findings(value: dict[str, Any]) -> None:
    scan = value.get("scan")
    if isinstance(scan, dict) and isinstance(scan.get("findings"), list):
        scan["findings"] = scan["findings"][:10]  # the worst first (scan.py sorts them)


def _trim_services(value: dict[str, Any]) -> None:
    """A stack's build: each service's test output and findings (its log has them)."""
    for entry in (value.get("services") or {}).values():
        if isinstance(entry, dict):
            if isinstance(entry.get("test"), dict):
                entry["test"] = {k: v for k, v in entry["test"].items() if k != "output"}
            if isinstance(entry.get("scan"), dict):
                entry["scan"] = {k: v for k, v in entry["scan"].items() if k != "findings"}


_TRIMS = (_trim_texts, _trim_output, _trim_findings, _trim_services)


@dataclass
class Connection:
    app: str
    repo: str
    branch: str
    created_ms: int = field(default_factory=now_ms)
    deliveries: list[str] = field(default_factory=list)
    last_commit: str = ""

    def to_value(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_value(cls, value: dict[str, Any]) -> Connection:
        known = {k: v for k, v in value.items() if k in cls.__dataclass_fields__}
        return cls(**known)

    def matches(self, names: list[str], branch: str | None = None) -> bool:
        mine = canonical_repo(self.repo)
        return any(canonical_repo(n) == mine for n in names if n) and (branch is None or branch == self.branch)


def canonical_repo(url: str) -> str:
    """Compare repositories by host and path: https, ssh (git@host:path) and git:// URLs of
    one GitHub repository, and its full name "owner/name", all come out the same."""
    u = url.strip().rstrip("/")
    u = u.removesuffix(".git").rstrip("/")
    m = re.match(r"^[A-Za-z][A-Za-z0-9+.-]*://(?:[^@/]*@)?([^/]+)/(.*)$", u)
    if m:
        host, path = m.group(1).lower(), m.group(2)
    else:
        m = re.match(r"^(?:[^@/]+@)?([^:/]+):(.+)$", u)  # scp-like ssh
        host, path = (m.group(1).lower(), m.group(2)) if m else ("", u)
    host = host.rsplit(":", 1)[0] if host.startswith("github.com") else host
    if host in ("github.com", "www.github.com"):
        host = ""  # so "owner/name" matches
    return f"{host}/{path.lower() if not host else path}".lstrip("/")


class BuildStore:
    def __init__(self, store: Store) -> None:
        self.store = store

    def get(self, bid: str) -> Build | None:
        if "/" in bid:
            return None
        value = self.store.value("build", bid)
        return None if value is None else Build.from_value(value)

    def put(self, build: Build) -> Build:
        self.store.put_many([self.build_write(build)])
        return build

    def build_write(self, build: Build) -> Write:
        """The store write of ``build`` (for ``Store.put_many`` with other writes)."""
        build.updated_ms = now_ms()
        return ("build", build.id, build.record_value())

    def all(self, app: str | None = None) -> list[Build]:
        out = [Build.from_value(r.value) for r in self.store.records("build")
               if r.value is not None and not r.key.startswith(REPO_PREFIX)]
        if app is not None:
            out = [b for b in out if b.app == app]
        return sorted(out, key=lambda b: (b.created_ms, b.id), reverse=True)

    def connection(self, app: str) -> Connection | None:
        value = self.store.value("build", REPO_PREFIX + app)
        return None if value is None else Connection.from_value(value)

    def connections(self) -> list[Connection]:
        return [Connection.from_value(r.value) for r in self.store.records("build")
                if r.value is not None and r.key.startswith(REPO_PREFIX)]

    def connection_write(self, conn: Connection) -> Write:
        """The store write of a connection (for ``Store.put_many``); only the newest
        DELIVERIES_KEPT deliveries are kept, so the record stays one packet however many
        pushes the app gets."""
        conn.deliveries = conn.deliveries[-DELIVERIES_KEPT:]
        return ("build", REPO_PREFIX + conn.app, conn.to_value())

    def put_push(self, conn: Connection, build: Build | None) -> None:
        """A push: the connection (its delivery list) and, when one is queued, the build."""
        self.store.put_many([self.connection_write(conn)] + ([self.build_write(build)] if build else []))
