"""The build pipeline's tunables: the ``[build]`` table of the agent's config (env
``PLEACO_BUILD_<NAME>``), each with its default and the reason for it."""

from __future__ import annotations

import ipaddress
import re
from dataclasses import dataclass, field

# A registry and optional namespace: host[:port] then lower-case path components, as
# Docker's reference grammar has them ("registry.example.com/team", "127.0.0.1:5000").
_HOST = r"[A-Za-z0-9](?:[A-Za-z0-9-]*[A-Za-z0-9])?(?:\.[A-Za-z0-9](?:[A-Za-z0-9-]*[A-Za-z0-9])?)*(?::[0-9]{1,5})?"
_COMPONENT = r"[a-z0-9]+(?:(?:[._]|__|-+)[a-z0-9]+)*"
REGISTRY = re.compile(rf"{_HOST}(?:/{_COMPONENT})*")
# build.network's values (pleaco/builds/network.py does what each means).
NETWORK_MODES = ("isolated", "none", "host-reachable")


@dataclass
class BuildConfig:
    # URL GitHub reaches this node's API at, printed by `apps connect` as the webhook URL
    # (plus /v1/hooks/github). Empty: the URL the client used to reach the API.
    public_url: str = ""
    # Largest webhook body (bytes), refused (413) before its signature is checked: anyone
    # can send one, and its HMAC is computed once per connected app. GitHub caps payloads at
    # 25 MB, but a push lists at most 20 commits and their changed paths, ~1 KB per commit
    # plus the paths; 2 MiB takes a push touching thousands of files.
    webhook_max_body_bytes: int = 2 << 20
    # Builds running at once on this node. Image builds are CPU- and disk-bound; two at a
    # time keep a 2-core node's API and reconciler responsive.
    concurrency: int = 2
    # Whole-build time limit (seconds): fetch + build + test + scan. Heroku's is 15 min.
    timeout: float = 900.0
    # engine (Docker Engine's build API, works offline) or kaniko.
    backend: str = "engine"
    # The kaniko executor image. Upstream GoogleContainerTools/kaniko was archived in June
    # 2025; Chainguard maintains the fork.
    kaniko_image: str = "cgr.dev/chainguard/kaniko:latest"
    # What the Dockerfile's RUN steps may reach (pleaco/builds/network.py). A Dockerfile is
    # written by whoever can push to the app's repository, so by default ("isolated") its
    # steps reach the internet, where package registries are (apt, pip, npm need them), but
    # not this node's own services (agent API, proxy admin, engine), app containers, nor
    # private, loopback or link-local networks (peers, LAN, cloud metadata). "none": no
    # network at all (safest; a step that downloads anything fails). "host-reachable": the
    # engine's default bridge, as a plain `docker build` (trusted repositories only).
    network: str = "isolated"
    # Private IPv4 networks (CIDR) an isolated build may still reach, e.g. a package mirror
    # on the LAN ("10.0.5.0/24"). Empty by default: nothing private is trusted unasked. The
    # node's own addresses stay unreachable whatever is listed.
    network_allow: list[str] = field(default_factory=list)
    # Registry (and namespace) each passed build's image is pushed to before its release is
    # written, as REGISTRY/APP:COMMIT12 ("registry.example.com/team", "127.0.0.1:5000"); the
    # release then names that reference, and a node that lacks the image and finds no peer
    # holding it pulls it from there. Empty (the default): no push, because none is needed:
    # a node that needs an image and lacks it fetches it from a node that has it over the
    # authenticated node-to-node channel. Credentials are the agent's Docker client config
    # (`docker login` as the agent's user, or $DOCKER_CONFIG); the engine speaks plain HTTP
    # only to registries on 127.0.0.0/8 and those in its `insecure-registries`. A failed
    # push fails the build, naming the registry.
    registry: str = ""
    # One git command (fetch, archive, ls-remote) may take this long (seconds).
    git_timeout: float = 120.0
    # Test container limits: seconds (pleaco.toml's [test] timeout overrides), memory
    # (bytes) and CPUs. One CPU of two leaves the node able to serve while tests run.
    test_timeout: float = 300.0
    test_memory_bytes: int = 512 << 20
    test_cpus: float = 1.0
    # Seconds between `git ls-remote` polls of every connected repository, for clusters
    # GitHub cannot reach. 0 turns polling off (webhooks only).
    poll_interval: float = 0.0
    # A build interrupted (agent killed) this many times is failed rather than resumed,
    # so a build that kills the agent cannot loop forever.
    max_attempts: int = 3

    def validate(self) -> list[str]:
        problems = []
        for name in ("timeout", "git_timeout", "test_timeout", "test_cpus"):
            if not getattr(self, name) > 0:
                problems.append(f"build.{name}: must be greater than 0")
        for name in ("webhook_max_body_bytes", "concurrency", "test_memory_bytes", "max_attempts"):
            if getattr(self, name) < 1:
                problems.append(f"build.{name}: must be at least 1")
        if self.poll_interval < 0:
            problems.append("build.poll_interval: must be 0 (off) or more")
        if self.backend not in ("engine", "kaniko"):
            problems.append(f"build.backend: expected engine or kaniko, got {self.backend!r}")
        if self.network not in NETWORK_MODES:
            problems.append(f"build.network: expected one of {', '.join(NETWORK_MODES)}, got {self.network!r}")
        for entry in self.network_allow:
            try:
                ipaddress.IPv4Network(entry)
            except ValueError as exc:
                problems.append(f"build.network_allow: {entry!r} is not an IPv4 network (CIDR): {exc}")
        if self.registry and not REGISTRY.fullmatch(self.registry):
            problems.append(f"build.registry: expected HOST[:PORT][/NAMESPACE] (lower-case path, no scheme), "
                            f"got {self.registry!r}")
        if self.public_url and not self.public_url.startswith(("http://", "https://")):
            problems.append(f"build.public_url: expected an http(s) URL, got {self.public_url!r}")
        return problems
