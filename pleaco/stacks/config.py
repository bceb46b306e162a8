"""The stacks part's settings that the agent's config holds: the ``[volumes]`` table, and
scheduled jobs' ``[jobs]`` table (env ``PLEACO_JOBS_<NAME>``; not to be confused with an app
repository's ``[jobs]`` table, which declares the app's schedules: pleaco/builds/manifest.py)."""

from __future__ import annotations

import re
import urllib.parse
from dataclasses import dataclass

# S3's bucket naming rules (the part every compatible store shares).
BUCKET_NAME = re.compile(r"[a-z0-9][a-z0-9.-]{1,61}[a-z0-9]")


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
    # Seconds a node that claims an app's volumes for its own use at once (a one-off job, a
    # restore into a volume no replica made yet) waits before using them: another node may
    # have claimed them at the same moment (the app's owner, placing its first replica); the
    # store keeps one of the two claims, the same on every node, and the node whose claim
    # was not kept refuses rather than fill a volume nothing will mount. A claim spreads by
    # gossip in well under a second on a LAN (as [jobs] claim_settle).
    claim_settle: float = 1.0
    # An S3-compatible object store that `pleaco volumes snapshot|restore --s3` write to and
    # read from (pleaco/stacks/s3.py), on the node holding the volume; off when
    # ``s3_endpoint`` is empty, the default: snapshots then go to a file on the caller's side
    # only. The endpoint is a URL ("https://s3.eu-west-1.amazonaws.com",
    # "http://10.0.0.5:9000" for MinIO or Garage on the LAN).
    s3_endpoint: str = ""
    s3_bucket: str = ""
    # Signature V4 needs a region; "us-east-1" is what MinIO, Garage and Ceph accept by
    # default and AWS's own default.
    s3_region: str = "us-east-1"
    s3_access_key: str = ""
    # The secret key is read from here or PLEACO_VOLUMES_S3_SECRET_KEY; it is never logged
    # nor served by the API (the config is not).
    s3_secret_key: str = ""
    # Keys are PREFIX + APP/VOLUME/TIMESTAMP.tar; one bucket can serve several clusters
    # with a prefix each.
    s3_prefix: str = "pleaco/"
    # Path-style URLs (ENDPOINT/BUCKET/KEY), which every S3-compatible store takes;
    # false: virtual-host style (BUCKET.HOST/KEY), which AWS prefers for new buckets.
    s3_path_style: bool = True
    # Seconds a connection to the store may stay silent (not the whole transfer's bound:
    # a large snapshot takes as long as its bytes take).
    s3_timeout: float = 60.0

    def validate(self) -> list[str]:
        problems = []
        if not self.helper_image:
            problems.append("volumes.helper_image: must name an image")
        if not self.claim_settle >= 0:  # NaN too
            problems.append("volumes.claim_settle: must be at least 0")
        if self.interval <= 0:
            problems.append(f"volumes.interval: {self.interval} must be above 0")
        if self.s3_endpoint:
            url = urllib.parse.urlsplit(self.s3_endpoint)
            if url.scheme not in ("http", "https") or not url.hostname or url.query or url.fragment:
                problems.append(f"volumes.s3_endpoint: {self.s3_endpoint!r} is not an http:// or https:// URL")
            if not BUCKET_NAME.fullmatch(self.s3_bucket):
                problems.append(f"volumes.s3_bucket: {self.s3_bucket!r} is not a bucket name (3-63 characters: "
                                "lower-case letters, digits, dots and hyphens, starting and ending with a letter "
                                "or digit)")
            for name in ("s3_access_key", "s3_secret_key", "s3_region"):
                if not getattr(self, name):
                    problems.append(f"volumes.{name}: must be set when volumes.s3_endpoint is")
            if self.s3_prefix.startswith("/"):
                problems.append(f"volumes.s3_prefix: {self.s3_prefix!r} must not start with '/'")
            if self.s3_timeout <= 0:
                problems.append(f"volumes.s3_timeout: {self.s3_timeout} must be above 0")
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
