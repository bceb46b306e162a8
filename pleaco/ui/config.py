"""The dashboard's tunables: the ``[ui]`` table of pleaco.toml (env ``PLEACO_UI_<NAME>``)."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass
class UiConfig:
    # Seconds between two samples of every app's requests/s, latency and replicas kept for
    # the Charts page. The load figures they come from are refreshed every 2 s
    # ([proxy] load_interval) and averaged over that; 10 s gives a readable hour (360
    # points per app, a few tens of KB) without hiding a surge of a minute.
    history_interval: float = 10.0
    # Seconds of history kept per app, in memory on this node only (lost on restart, like
    # any live view): the Charts page shows the last hour.
    history_span: float = 3600.0
    # Seconds between two looks at the cluster and the apps for the live pages (server-sent
    # events): a change shows within this; an unchanged view sends nothing but a keep-alive.
    live_interval: float = 1.0

    @property
    def history_samples(self) -> int:
        """Samples kept per app (the ring's capacity)."""
        return max(1, round(self.history_span / self.history_interval))

    def validate(self) -> list[str]:
        problems = []
        for name in ("history_interval", "history_span", "live_interval"):
            if not getattr(self, name) > 0:
                problems.append(f"ui.{name}: must be greater than 0")
        if not problems and self.history_samples > 100_000:
            problems.append("ui.history_span: at most 100000 samples per app (history_span / history_interval)")
        return problems
