"""The app loop's and the rollouts' settings: top-level keys of pleaco.toml (the agent's
``Config`` inherits ``ReconcileSettings``), the ``[rollout]`` table (env
``PLEACO_ROLLOUT_<NAME>``) and the ``[autoscale]`` table (env ``PLEACO_AUTOSCALE_<NAME>``)."""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass
class RolloutConfig:
    # Replicas of a new release started at once ahead of the old ones. Equal to the
    # max_replicas default: a rollout takes one health-check round and old replicas serve
    # until then. Lower it when a node cannot hold two releases of an app at once.
    max_surge: int = 100
    # Replicas whose old container may be stopped before its replacement is healthy, once
    # the surge budget is spent. 0: strictly start-first, capacity never drops.
    max_unavailable: int = 0
    # Seconds between taking an old replica out of the proxy and stopping it, for the
    # requests it is serving to finish (the app then gets stop_timeout more after SIGTERM).
    # Small web apps answer in well under a second; Kamal drains for 30 s by default.
    drain_grace: float = 5.0
    # Seconds a new release has for all of this node's replicas to pass their health check
    # before it is rolled back automatically: three times health_grace's 30 s, so a slow
    # starter that is within its startup allowance is never rolled back for it.
    deadline: float = 90.0
    # Roll back automatically at all. Off: a failing release stays, old replicas keep serving.
    auto_rollback: bool = True

    def validate(self) -> list[str]:
        problems = []
        if self.max_surge < 0 or self.max_unavailable < 0:
            problems.append("rollout.max_surge and rollout.max_unavailable: must be at least 0")
        if self.max_surge == 0 and self.max_unavailable == 0:
            problems.append("rollout.max_surge and rollout.max_unavailable: both 0 would never replace a replica")
        if self.drain_grace < 0:
            problems.append("rollout.drain_grace: must be at least 0")
        if not self.deadline > 0:
            problems.append("rollout.deadline: must be greater than 0")
        return problems


@dataclass
class AutoscaleConfig:
    # Seconds between the autoscaler's ticks (pleaco.reconcile.autoscale). Every node
    # samples each autoscaled app's cluster-wide figure once a tick, and the app's owner
    # decides once a tick (and after a load report, report_settle below). The figures
    # themselves move every [proxy] autoscale_load_interval (1 s) while an app is
    # autoscaled; 1 s gives the 6 s panic window six samples, and a step costs a dictionary look-up
    # per autoscaled app (a store write only when a decision changes something).
    interval: float = 1.0
    # Samples kept per app, at most: one a tick over the longest window the app's policy
    # names (stable window, idle window). 7200 covers a 2-hour window at 1 s; a longer one
    # is averaged over its newest 7200 samples rather than growing without bound.
    max_samples: int = 7200
    # Seconds the autoscaler waits after a load report brought news before it samples and
    # decides (it is woken by every node's report, not only at its ticks): a new figure is
    # in the panic window within this rather than within a tick, and a burst of reports
    # from many nodes is one step, not one each.
    report_settle: float = 0.2

    def validate(self) -> list[str]:
        problems = []
        if not self.interval > 0:
            problems.append("autoscale.interval: must be greater than 0")
        if not self.report_settle >= 0:
            problems.append("autoscale.report_settle: must be at least 0")
        if self.max_samples < 1:
            problems.append("autoscale.max_samples: must be at least 1")
        return problems


@dataclass
class ReconcileSettings:
    # Address the app containers' ports are published on. Other nodes' proxies dial
    # replicas there (the routing mesh), so empty, the default, means this node's advertised
    # (gossip) address, or 127.0.0.1 when that is a loopback address (a node on its own, or
    # nodes sharing one machine): never all interfaces, apps are meant to be reached
    # through the proxy.
    publish_host: str = ""
    # Highest replica count one app may ask for. 100 per node is far beyond what 2-core
    # machines run, and stops a typo (1000 instead of 10) from taking the host down.
    max_replicas: int = 100
    # The reconcile loop runs at least this often (seconds) even when nothing changed, to
    # notice crashed containers and to probe health. A store change wakes it at once.
    reconcile_interval: float = 1.0
    # Containers started or stopped at once. Docker Engine serialises much of a container
    # start internally; beyond ~8 concurrent calls a 2-core host gains nothing.
    start_concurrency: int = 8
    # Crash back-off: first retry after base seconds, doubling up to max, like Kubernetes'
    # CrashLoopBackOff (10 s .. 300 s) but shorter, since pleaco apps are small web apps.
    backoff_base: float = 1.0
    backoff_max: float = 60.0
    # A replica that has run this long (seconds) has its back-off forgotten.
    backoff_reset_after: float = 30.0
    # HTTP health probe: per-request timeout, and failures in a row before a replica is
    # declared unhealthy and restarted (Kubernetes' failureThreshold default is 3).
    health_timeout: float = 2.0
    health_failures: int = 3
    # A replica that never passed a probe is given this long (seconds) to start listening
    # before failures count (Kubernetes' startupProbe, in one number).
    health_grace: float = 30.0
    # Seconds between SIGTERM and SIGKILL when pleaco stops a replica (Docker's default).
    stop_timeout: int = 10
    # A missing image is looked up again after this many seconds, not on every tick.
    image_recheck_interval: float = 2.0
    # A loop whose one step has run this long (seconds) is stuck: the agent stops its
    # systemd watchdog pings (pleaco.host.systemd), so systemd restarts it. Far above the
    # longest bounded step: an engine call waits at most docker_timeout (30 s), a stop
    # stop_timeout more; builds run outside any step, and the repository poller adds
    # git_timeout per repository it polls. Ten minutes of one step is a hang, not work.
    loop_stuck_after: float = 600.0
    # The rollout pace, drain and automatic rollback: the [rollout] table.
    rollout: RolloutConfig = field(default_factory=RolloutConfig)
    # The autoscaler's tick and memory: the [autoscale] table.
    autoscale: AutoscaleConfig = field(default_factory=AutoscaleConfig)
