"""What a replica is given at its start beside its spec: the seam between the app loop and
the parts above it that provide it (the app's secrets, pleaco.stacks.secrets)."""

from __future__ import annotations

from typing import Protocol

from pleaco.apps import AppSpec
from pleaco.runtime import RunSpec


class NotProvisioned(RuntimeError):
    """A replica cannot start yet: what it needs has not reached this node. The message says
    what it waits for; the next pass tries again."""


class Provisioner(Protocol):
    def give(self, spec: AppSpec, run: RunSpec) -> RunSpec:
        """``run`` with what the app's replicas get (environment, bind mounts); NotProvisioned
        when that is not on this node yet. May write files the container's binds show."""
        ...

    def remove_files(self, container: str) -> None:
        """Remove what ``give`` wrote for a container that is now removed."""
        ...

    def sweep(self, containers: set[str]) -> int:
        """Remove what was written for containers not in ``containers``; returns how many."""
        ...
