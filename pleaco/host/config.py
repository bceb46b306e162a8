"""Self-upgrade's tunables: the ``[upgrade]`` table of pleaco.toml (env ``PLEACO_UPGRADE_<NAME>``)."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from pleaco.host.bundle import BundleError, trusted_public_keys


@dataclass(frozen=True)
class UpgradeSettings:
    # The release keys whose bundles this node installs: each 64 hex digits (a raw Ed25519
    # public key, the one line of a `pleaco release keygen` release.pub) or the path of such
    # a file. Empty (the default): no bundle is trusted, so the node never upgrades itself
    # until the image or the operator names the key it was built to trust.
    trusted_keys: list[str] = field(default_factory=list)
    # Where the release slots live: ROOT/releases/VERSION (a venv each) and ROOT/current,
    # the symlink systemd/pleaco.service runs (ExecStart=/opt/pleaco/current/bin/pleaco).
    root: Path = Path("/opt/pleaco")
    # Seconds from the switch to the new version until it must be confirmed healthy (API
    # answering, cluster rejoined, every app container adopted unchanged); otherwise it is
    # rolled back. An agent starts and answers in 1-3 s and rejoins its cluster within a few
    # gossip rounds; 60 s leaves room for a loaded host and a slow Docker Engine listing
    # while keeping a broken release's outage to a minute.
    health_deadline: float = 60.0
    # Seconds the data dir lock may be free during a trial before the guard counts the new
    # agent as gone (exited before it was healthy) and rolls back: between the old agent's
    # exit and the new one's lock there is an interpreter start and pleaco's imports (about
    # a second; several on a loaded host). 10 s covers that with room; tests of a release
    # that exits at once shorten it.
    agent_gone_grace: float = 10.0
    # The cluster rollout (pleaco/reconcile/upgrade.py, POST /v1/upgrade):
    # Largest bundle POST /v1/upgrade accepts (bytes). A bundle is pleaco's wheels and
    # those of its dependencies, about 18 MB; 256 MiB leaves room for growth and still
    # stops a wrong file (a disk image) before it fills the data dir.
    max_bundle_bytes: int = 256 << 20
    # A node of the plan not heard from for this many seconds is skipped (it left the
    # cluster). Longer than an upgrading node's restart plus its health deadline (tens of
    # seconds), so a node restarting into a new release is never taken for gone.
    absent_after: float = 300.0
    # Seconds a node restarting into a new release keeps its replicas while the others see
    # it dead or back but settling (placement_settle): an agent restarts in 1-3 s and is
    # confirmed a second later; past this its replicas move as for any dead node.
    restart_hold: float = 30.0

    def validate(self) -> list[str]:
        problems = []
        if not self.health_deadline > 0:
            problems.append("upgrade.health_deadline: must be greater than 0")
        if not self.agent_gone_grace > 0:
            problems.append("upgrade.agent_gone_grace: must be greater than 0")
        if self.max_bundle_bytes < 1:
            problems.append("upgrade.max_bundle_bytes: must be at least 1")
        if not self.absent_after > 0:
            problems.append("upgrade.absent_after: must be greater than 0")
        if self.restart_hold < 0:
            problems.append("upgrade.restart_hold: must be at least 0")
        if not self.root.is_absolute():
            problems.append(f"upgrade.root: must be an absolute path, got {str(self.root)!r}")
        try:
            trusted_public_keys(self.trusted_keys)
        except BundleError as exc:
            problems.append(f"upgrade.trusted_keys: {exc}")
        return problems
