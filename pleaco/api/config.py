"""The API's connection and body limits: the ``[api]`` table of pleaco.toml (env
``PLEACO_API_<NAME>``). Where it listens (``api_listen``) and its largest body
(``max_body_bytes``) are top-level settings of the interface contract.

Without these an idle client holds a connection (and a file descriptor) for ever: 1100 idle
connections exhausted the agent's 1024 open files and the API answered nothing until they
went away.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass
class ApiConfig:
    # Seconds a connection may sit without a request in progress and without sending a
    # byte (before its first request, and between requests when kept alive) before it is
    # closed. The CLI opens a connection per call and the longest pause a real client makes
    # between keep-alive requests is well under this; nginx's keepalive_timeout is 75 s,
    # but pleaco's API has few clients, so it need not keep many connections warm.
    idle_timeout: float = 30.0
    # Seconds from a request's first byte until its headers are complete (nginx's
    # client_header_timeout, 60 s, Apache's RequestReadTimeout header=20-40). The CLI's
    # headers are a few hundred bytes sent at once; only a slow-loris client needs longer.
    header_timeout: float = 20.0
    # Seconds to read a request body (max_body_bytes, 1 MiB, at a modest 100 KiB/s).
    body_timeout: float = 10.0
    # Open API connections at most. At the cap a new connection evicts the connection idle
    # the longest; only when every connection has a request in progress is the new one
    # refused. 1024 concurrent API clients is far beyond a cluster's operators and
    # automation; systemd/pleaco.service sets LimitNOFILE to this plus the agent's other
    # needs, and the cap is lowered at start when the open-file limit is smaller.
    max_connections: int = 1024
    # File descriptors kept for everything but API connections: the store, Docker Engine
    # connections (a log stream per replica while `apps logs --follow` runs), gossip, the
    # proxy's admin API, DNS, build logs and git. Measured under 100 on a busy node; 512
    # leaves room for a burst of log streams.
    reserved_fds: int = 512
    # Deepest nesting of a JSON body. App specs nest 2 levels, GitHub push payloads about 5;
    # Python's json parser recurses per level and fails (a 500) around 1000.
    max_json_depth: int = 64

    def validate(self) -> list[str]:
        problems = []
        for name in ("idle_timeout", "header_timeout", "body_timeout"):
            if not getattr(self, name) > 0:
                problems.append(f"api.{name}: must be greater than 0")
        if self.max_connections < 1:
            problems.append("api.max_connections: must be at least 1")
        if self.reserved_fds < 0:
            problems.append("api.reserved_fds: must be at least 0")
        if not 1 <= self.max_json_depth <= 500:
            problems.append("api.max_json_depth: must be between 1 and 500 (the parser recurses per level)")
        return problems
