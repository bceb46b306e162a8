"""The stacks part's settings that the agent's config holds: the ``[volumes]`` table, and
scheduled jobs' ``[jobs]`` table (env ``PLEACO_JOBS_<NAME>``; not to be confused with an app
repository's ``[jobs]`` table, which declares the app's schedules: pleaco/builds/manifest.py)."""

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


@dataclass
class JobsConfig:
    # Seconds in one cron minute. 60 in production: cron expressions mean what they say.
    # Tests set a few seconds, so that "* * * * *" runs every few seconds and a test sees
    # several ticks in under a minute; nothing else changes (a tick is still "a minute" to
    # the expression, so "*/5" is every fifth tick).
    tick_seconds: float = 60.0
    # Seconds a claim of a tick waits before its job starts, for a concurrent claim of the
    # same tick (two nodes that both believed themselves the app's owner while the live
    # nodes changed) to reach it: the store keeps one of them, the other does not run.
    # A claim spreads by gossip in well under a second on a LAN.
    claim_settle: float = 1.0
    # Finished runs kept per schedule (records and their logs); older ones are deleted by
    # the app's owner. 20 shows a day of hourly runs' failures without growing the store.
    history: int = 20
    # Bytes of a run's output kept on the node that ran it; the rest is cut (and the log
    # says so). 256 KiB holds any migration or backup's report; the container's own log
    # is gone with the container.
    log_bytes: int = 256 << 10

    def validate(self) -> list[str]:
        problems = []
        if not self.tick_seconds >= 1:
            problems.append("jobs.tick_seconds: must be at least 1")
        if self.claim_settle < 0 or self.claim_settle >= self.tick_seconds:
            problems.append("jobs.claim_settle: must be at least 0 and below jobs.tick_seconds")
        if self.history < 1:
            problems.append("jobs.history: must be at least 1")
        if self.log_bytes < 1024:
            problems.append("jobs.log_bytes: must be at least 1024")
        return problems
