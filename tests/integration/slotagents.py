"""Test helpers for upgrades: release bundles built once, agents run from their own slots
(ROOT/current/bin/pleaco, never this tree), and a cleanup that finds every process an
upgrade made (the agent re-execs itself into another slot, the guard is detached and may
start the old agent again)."""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import subprocess
import threading
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

from agentproc import REPO, free_port, remove_node_containers, wait_for, wait_listening

from pleaco.api.client import Client
from pleaco.api.errors import ApiError
from pleaco.host import bundle
from pleaco.host.slots import Slots
from pleaco.host.trial import agent_pid

# The broken releases the upgrade tests use, each this tree with one line put after an
# anchor: (file, anchor, inserted line).
BROKEN = {
    # Its agent exits as it starts.
    "exits": ("pleaco/cli/agent.py", "def run(args: argparse.Namespace) -> int:\n",
              '    raise SystemExit("this build is broken on purpose")\n'),
    # Its agent runs but its trial never proves healthy.
    "unhealthy": ("pleaco/host/trial.py", "    async def health(self, state: TrialState) -> str | None:\n",
                  '        return "broken on purpose: never healthy"\n'),
    # Its agent runs but its API's /healthz answers 503.
    "healthz503": ("pleaco/api/server.py", "    async def healthz(self, request: web.Request) -> web.Response:\n",
                   "        return web.Response(status=503, text='broken')\n"),
}


def patched_tree(dest: Path, rel: str, anchor: str, insert: str) -> Path:
    """A copy of this tree with ``insert`` put after ``anchor`` in ``rel``: a broken release."""
    shutil.copytree(REPO / "pleaco", dest / "pleaco", ignore=shutil.ignore_patterns("__pycache__"))
    for name in ("pyproject.toml", "README.md"):
        shutil.copy2(REPO / name, dest / name)
    path = dest / rel
    text = path.read_text()
    assert text.count(anchor) == 1, f"{rel} changed: update the broken release's patch"
    path.write_text(text.replace(anchor, anchor + insert))
    return dest


class ReleaseKit:
    """Signed bundles of this tree, one release key, for the whole session: each bundle is
    built the first time a test asks for it, and the start versions' slots are installed
    once (under ``shared``) for node roots to link to. A bundle is named ``VERSION`` (this
    tree) or ``VERSION-BROKEN`` (this tree with a ``BROKEN`` patch); bundles and shared
    slots are never changed once made, so tests sharing them do not depend on each other."""

    def __init__(self, workdir: Path) -> None:
        self.dir = workdir
        self.private, public = bundle.keygen(workdir / "keys")
        self.public_key = public.read_text().strip()
        self.shared = Slots(workdir / "shared")
        self._bundles: dict[str, Path] = {}
        self._lock = threading.Lock()

    def bundles(self, names: list[str]) -> dict[str, Path]:
        """The bundles called ``names`` (name -> path); those not built yet are built side
        by side (pip runs in processes of its own)."""
        with self._lock:
            missing = [n for n in dict.fromkeys(names) if n not in self._bundles]
            if missing:
                with ThreadPoolExecutor(len(missing)) as pool:
                    built = {n: pool.submit(self._build, n) for n in missing}
                    self._bundles.update({n: done.result() for n, done in built.items()})
            return {n: self._bundles[n] for n in names}

    def _build(self, name: str) -> Path:
        version, _, broken = name.partition("-")
        tree = REPO if not broken else patched_tree(self.dir / f"tree-{name}", *BROKEN[broken])
        out = self.dir / f"pleaco-{name}.bundle"
        bundle.build_bundle(tree, self.private, out, version=version)
        return out

    def shared_slot(self, name: str) -> Path:
        """The complete shared slot of bundle ``name`` (installed the first time)."""
        path = self.bundles([name])[name]
        with self._lock:
            return self.shared.install(path, bundle.verify_bundle(path, [self.public_key], "0.0.1"))

    def root_at(self, root: Path, name: str) -> Path:
        """A node's slot root whose current release is bundle ``name``'s version: a link to
        the shared slot (a venv holds its absolute path, so it is linked, never copied)."""
        slot = self.shared_slot(name)
        (root / "releases").mkdir(parents=True)
        os.symlink(slot, root / "releases" / slot.name)
        Slots(root).flip(slot.name)
        return root


@dataclass
class Releases:
    """One module's view of the kit: its bundles by name, and node roots on shared slots."""

    kit: ReleaseKit
    bundles: dict[str, Path]

    @property
    def public_key(self) -> str:
        return self.kit.public_key

    def root_at(self, root: Path, version: str) -> Path:
        return self.kit.root_at(root, version)


@dataclass
class SlotAgent:
    """A ``pleaco agent`` started from ROOT/current, configured to trust the release key."""

    root: Path
    data_dir: Path
    public_key: str
    extra_args: list[str] = field(default_factory=list)
    health_deadline: float = 20.0
    port: int = field(default_factory=free_port)
    proc: subprocess.Popen[bytes] | None = None
    node_id: str = ""

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def log_path(self) -> Path:
        return self.data_dir.parent / f"{self.data_dir.name}-agent.log"

    @property
    def client(self) -> Client:
        return Client(self.url, (self.data_dir / "admin.token").read_text().strip(), timeout=10)

    def start(self) -> SlotAgent:
        cmd = [str(self.root / "current" / "bin" / "pleaco"), "agent", "--data-dir", str(self.data_dir),
               "--api-listen", f"127.0.0.1:{self.port}", "--name", self.data_dir.name, *self.extra_args]
        # Not this tree's pleaco: no PYTHONPATH, so the slot runs its own code.
        env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "PLEACO_CONFIG")}
        # The network off, as in agentproc: agents here share one engine.
        env.update(PLEACO_LOG_LEVEL="debug", PLEACO_NETWORK_ENABLED="false", PLEACO_UPGRADE_ROOT=str(self.root),
                   PLEACO_UPGRADE_TRUSTED_KEYS=self.public_key,
                   PLEACO_UPGRADE_HEALTH_DEADLINE=str(self.health_deadline))
        with open(self.log_path, "ab") as log:
            self.proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=env, cwd=self.data_dir.parent,
                                         start_new_session=True)
        # Generous, as in agentproc: a loaded machine's agents are slow to start.
        wait_listening(self.proc, "127.0.0.1", self.port, 60, f"agent {self.data_dir.name}")
        self.node_id = wait_for(lambda: self.client.status()["node_id"], 20, "the agent's status")
        return self

    def version(self) -> str:
        return str(self.client.status()["version"])

    def log_tail(self, lines: int = 80) -> str:
        out = []
        for path in (self.log_path, self.data_dir / "upgrade-guard.log", self.data_dir / "agent-respawn.log"):
            with contextlib.suppress(OSError):
                out.append(f"--- {path.name} ---\n" + "\n".join(path.read_text().splitlines()[-lines:]))
        return "\n".join(out)

    def pids(self) -> set[int]:
        """Every live process of this node: the one started, the data dir lock's holder
        (from /proc/locks), and any process whose command line names this data dir (the
        guard, an agent the guard started again)."""
        found: set[int] = set()
        if self.proc is not None and self.proc.poll() is None:
            found.add(self.proc.pid)
        holder = agent_pid(self.data_dir)
        if holder is not None:
            found.add(holder)
        needle = str(self.data_dir).encode()
        for entry in Path("/proc").iterdir():
            if entry.name.isdigit():
                with contextlib.suppress(OSError):
                    if needle in (entry / "cmdline").read_bytes():  # empty for a zombie
                        found.add(int(entry.name))
        return found - {os.getpid()}

    def cleanup(self) -> None:
        for _ in range(3):  # a guard may start an agent again while the first round kills
            pids = self.pids()
            if not pids:
                break
            for pid in pids:
                with contextlib.suppress(ProcessLookupError, PermissionError):
                    pgid = os.getpgid(pid)
                    if pgid != os.getpgrp():
                        os.killpg(pgid, signal.SIGKILL)
                    os.kill(pid, signal.SIGKILL)
            if self.proc is not None:
                with contextlib.suppress(subprocess.TimeoutExpired):
                    self.proc.wait(5)
            with contextlib.suppress(AssertionError):
                wait_for(lambda pids=pids: not (self.pids() & pids), 5, "the killed processes gone")
        if self.node_id:
            remove_node_containers(self.node_id)


def form_slot_cluster(make: Callable[[str, list[str]], SlotAgent], n: int) -> list[SlotAgent]:
    def gossip(k: int) -> list[str]:
        return ["--gossip-listen", f"127.0.0.{k}:{free_port()}", "--proxy-image=", "--discovery", "seeds"]

    first = make("n0", gossip(2))
    first.client.request("POST", "/v1/cluster/init")
    token = first.client.request("GET", "/v1/cluster/token")["token"]
    # One after another, as in agentproc.form_cluster (which says why).
    agents = [first] + [make(f"n{i}", [*gossip(i + 2), "--join-token", token]) for i in range(1, n)]
    ids = {a.node_id for a in agents}

    def all_alive() -> bool:
        return all({m["id"] for m in a.client.nodes() if m["state"] == "alive"} == ids for a in agents)

    wait_for(all_alive, 60, f"{n} nodes alive everywhere")
    return agents


class Availability:
    """Polls every node's API from a thread and records, per round, which answered."""

    def __init__(self, agents: list[SlotAgent], interval: float = 0.1) -> None:
        self.agents = agents
        self.interval = interval
        self.rounds: list[tuple[float, list[bool]]] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def __enter__(self) -> Availability:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join(10)

    def _answers(self, agent: SlotAgent) -> bool:
        try:
            Client(agent.url, agent.client.token, timeout=2).status()
            return True
        except ApiError:
            return False

    def _run(self) -> None:
        while not self._stop.is_set():
            self.rounds.append((time.monotonic(), [self._answers(a) for a in self.agents]))
            self._stop.wait(self.interval)

    def rounds_with_none(self) -> int:
        return sum(1 for _, up in self.rounds if not any(up))

    def longest_gap(self, i: int) -> float:
        """Seconds of the longest run of rounds in which node ``i`` did not answer."""
        longest, since = 0.0, None
        for t, up in self.rounds:
            if not up[i] and since is None:
                since = t
            elif up[i] and since is not None:
                longest, since = max(longest, t - since), None
        if since is not None:
            longest = max(longest, self.rounds[-1][0] - since)
        return longest
