"""The settings of the stacks part that the agent's config holds: the ``[volumes]`` table."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass
class VolumeSettings:
    """The ``[volumes]`` table (env ``PLEACO_VOLUMES_<NAME>``)."""

    # The image of the short-lived container that copies a volume's content out
    # (snapshot) or in (restore): it only needs ``sh`` and ``rm`` (restore empties the
    # volume first); pleaco's own busybox image, which every node has (scripts/images.sh).
    helper_image: str = "pleaco/busybox:latest"
    # Seconds between passes of the volume loop. It is woken at once by app, scale, node
    # and volume records, so this bounds only a retry: how long a removal waits after the
    # app's last container is gone (Docker refuses to remove a volume in use). A pass reads
    # records only (no engine call unless a volume of this node is being removed): cheap.
    interval: float = 2.0

    def validate(self) -> list[str]:
        problems = []
        if not self.helper_image:
            problems.append("volumes.helper_image: must name an image")
        if self.interval <= 0:
            problems.append(f"volumes.interval: {self.interval} must be above 0")
        return problems
