"""The autoscaler loop over a real store, with a fake cluster-wide load, owners and clock:
every node samples, only the owner decides and writes, a successor continues from the
decision record, nothing is written when nothing changes, and a decision made from a count
that changed meanwhile is dropped."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from pleaco.apps import DECISION_SUFFIX, AppStore
from pleaco.cluster.load import AppLoad, LoadView
from pleaco.cluster.messages import AppLoadEntry, LoadReport
from pleaco.config import ConfigError, load
from pleaco.identity import Identity
from pleaco.metrics import Registry
from pleaco.placement import Owners
from pleaco.reconcile.autoscale import HISTORY, Autoscaler, decision_record
from pleaco.reconcile.config import AutoscaleConfig
from pleaco.reconcile.loop import LoopRunner
from pleaco.scale import AutoscalePolicy, Decision
from pleaco.scale.decide import COUNTS_KEPT
from pleaco.store import PACKET_RECORD_BYTES, Store
from pleaco.store.record import gossip_size

A, B = "a" * 32, "b" * 32
POLL = 0.01  # seconds between looks while a loop runs
POLICY = {"min_replicas": 1, "max_replicas": 6, "metric": "concurrency", "target": 2, "stable_window": 6,
          "panic_window": 2}


class World:
    """Two nodes' autoscalers over one store (what gossip makes of theirs), one clock, one
    cluster-wide figure, and a list of live nodes whose first is the owner."""

    def __init__(self, apps: AppStore) -> None:
        self.apps = apps
        self.now = 1_000_000.0
        self.concurrency: float | None = 0.0
        self.live = [A]
        self.registries = {A: Registry(), B: Registry()}
        self.nodes = {n: Autoscaler(AutoscaleConfig(), apps, self.loads,
                                    Owners(n, lambda: self.live[:1]), self.registries[n], clock=lambda: self.now)
                      for n in (A, B)}

    def loads(self) -> dict[str, AppLoad]:
        if self.concurrency is None:
            return {}
        return {"web": AppLoad(app="web", rps=0.0, concurrency=self.concurrency, p50=None, p99=None, replicas=0,
                               cpu=0.0, memory=0, nodes=1, sampled_at=self.now, age=0.0)}

    def tick(self, seconds: float = 1.0, times: int = 1) -> None:
        for _ in range(times):
            self.now += seconds
            for node in self.nodes.values():
                node.tick()

    def decisions(self, node: str) -> float:
        return sum(v for k, v in self.nodes[node].m_decisions._values.items())


@pytest.fixture
def apps(tmp_path: Path) -> Iterator[AppStore]:
    store = Store(tmp_path / "state.db", Identity.generate())
    apps = AppStore(store, 100)
    apps.deploy("web", {"image": "img", "port": 8080})
    apps.set_autoscale("web", POLICY)
    yield apps
    store.close()


def versions(apps: AppStore) -> tuple[Any, Any]:
    count, decision = apps.store.peek("scale", "web"), apps.store.peek("scale", "web" + DECISION_SUFFIX)
    return (count.ts if count else None, decision.ts if decision else None)


def test_only_the_owner_decides_and_writes_every_node_samples(apps: AppStore) -> None:
    w = World(apps)
    w.tick(times=3)
    w.concurrency = 7.0  # 3.5x what 1 replica serves at 2: panic, 4 replicas
    # The first sample of the surge already panics (the 2 s panic window's recency-weighted
    # average is 4.7: 3 replicas); the second takes it to 4.
    w.tick(times=2)
    assert apps.replicas("web") == 4
    record = apps.decision("web")
    assert record is not None and record["node"] == A and record["state"]["panic"] is True
    assert [(d["from"], d["to"], d["node"]) for d in record["history"]] == [(1, 3, A[:12]), (3, 4, A[:12])]
    assert all(d["reason"].startswith("panic") for d in record["history"])
    assert w.decisions(A) == 2 and w.decisions(B) == 0
    assert w.nodes[A].m_decisions.value(app="web", direction="up") == 2
    text = w.registries[B].render()  # every node shows the desired count and the figure it sampled
    assert 'pleaco_autoscale_desired_replicas{app="web"} 4' in text
    assert 'pleaco_autoscale_metric{app="web",metric="concurrency"} 7' in text
    # B sampled every tick too, so it would start with the same history.
    assert [s.value for s in w.nodes[B].windows["web"]] == [s.value for s in w.nodes[A].windows["web"]]
    assert len(w.nodes[B].windows["web"]) == 5
    # The figures apps show shows, from either node.
    fig = w.nodes[B].figures("web")
    assert fig is not None and fig.owner == A and fig.value == 7.0 and fig.samples == 5
    # A goes quiet (not yet declared dead): B, not the owner, writes nothing whatever the load.
    before = versions(apps)
    w.concurrency = 30.0
    for _ in range(10):
        w.now += 1
        w.nodes[B].tick()
    assert versions(apps) == before and apps.replicas("web") == 4 and w.decisions(B) == 0


def test_nothing_is_written_while_nothing_changes(apps: AppStore) -> None:
    w = World(apps)
    w.concurrency = 2.1  # within 10 % of the target for 1 replica
    w.tick(times=3)
    before = versions(apps)
    w.tick(times=30)
    assert versions(apps) == before and apps.decision("web") is None and apps.replicas("web") == 1
    # A panic that stays in panic at the same count is written once (entering), not per tick.
    w.concurrency = 7.0
    w.tick(times=2)
    entered = versions(apps)
    w.tick(times=3)
    assert versions(apps) == entered and apps.replicas("web") == 4


def test_no_samples_no_write(apps: AppStore) -> None:
    w = World(apps)
    w.concurrency = None  # no node reports the app
    before = versions(apps)
    w.tick(times=20)
    assert versions(apps) == before and not w.nodes[A].windows["web"]


def test_a_successor_continues_the_panic_from_the_decision_record(apps: AppStore) -> None:
    w = World(apps)
    w.tick(times=3)
    w.concurrency = 7.0
    w.tick(times=2)
    assert apps.replicas("web") == 4
    # A dies: B owns the app now; the load is gone at once.
    w.live = [B]
    w.concurrency = 0.0
    w.tick()
    # Panic, continued from A's record: never down in panic. Without it B would start a
    # stable window of its own and halve the count (4 -> 2) on this tick.
    assert apps.replicas("web") == 4
    assert w.decisions(B) == 0
    # The panic ends a stable window (6 s) after the last surge; then B scales down, as
    # limited per window (4 -> 2 -> 1), and records each step with its reason.
    w.tick(times=20)
    assert apps.replicas("web") == 1
    record = apps.decision("web")
    assert record is not None and record["node"] == B and record["state"]["panic"] is False
    moves = [(d["from"], d["to"], d["node"]) for d in record["history"]]
    assert moves[0] == (1, 3, A[:12]) and moves[1] == (3, 4, A[:12]) and moves[-1][1:] == (1, B[:12])
    assert any(d["reason"].startswith("6s average") for d in record["history"])


def test_the_owners_own_state_is_used_between_its_writes(apps: AppStore) -> None:
    """The scale-down window lives in memory between writes: the count falls at most to
    half of the window's highest per stable window, not half per tick."""
    w = World(apps)
    apps.store.put("scale", "web", {"replicas": 6})
    w.concurrency = 0.0
    seen = []
    for _ in range(14):
        w.tick()
        seen.append(apps.replicas("web"))
    assert seen[0] == 3 and min(seen[:6]) == 3 and seen[-1] == 1


def test_a_decision_from_a_count_that_changed_meanwhile_is_not_written(apps: AppStore,
                                                                     monkeypatch: pytest.MonkeyPatch) -> None:
    w = World(apps)
    w.tick(times=3)
    w.concurrency = 7.0
    real = apps.decision

    def scaled_by_hand_meanwhile(name: str) -> dict[str, Any] | None:
        apps.scale(name, 2)  # after the autoscaler read the count (1)
        return real(name)

    # The first sample of the surge: a panic (1 -> 3) decided from a count of 1, which is
    # 2 by the time it would be written.
    monkeypatch.setattr(apps, "decision", scaled_by_hand_meanwhile)
    w.now += 1
    w.nodes[A].tick()
    monkeypatch.undo()
    assert apps.replicas("web") == 2 and apps.decision("web") is None
    assert w.decisions(A) == 0
    # The next ticks decide from the new count (7 wants 4 of the 2 replicas serving: panic).
    w.tick(times=5)
    assert apps.replicas("web") == 4
    record = apps.decision("web")
    assert record is not None and record["history"][0]["from"] == 2


def test_record_decision_checks_the_count_the_policy_and_the_bounds(apps: AppStore) -> None:
    policy = apps.autoscale("web")
    assert policy is not None
    assert not apps.record_decision("web", policy, 3, 4, {"x": 1})  # the count is 1, not 3
    other = AutoscalePolicy.from_value({**POLICY, "max_replicas": 3})
    assert not apps.record_decision("web", other, 1, 4, {"x": 1})  # decided under another policy
    assert apps.replicas("web") == 1 and apps.decision("web") is None
    with pytest.raises(ValueError, match="outside the app's autoscale range"):
        apps.record_decision("web", policy, 1, 7, {"x": 1})
    assert apps.replicas("web") == 1 and apps.decision("web") is None
    assert apps.record_decision("web", policy, 1, 3, {"x": 1})
    assert apps.replicas("web") == 3 and apps.decision("web") == {"x": 1}
    apps.clear_autoscale("web")
    assert apps.decision("web") is None
    assert not apps.record_decision("web", policy, 3, 2, {"x": 1})  # not autoscaled any more


def test_a_new_policy_starts_afresh_and_turning_it_off_drops_the_decisions(apps: AppStore) -> None:
    w = World(apps)
    w.tick(times=3)
    w.concurrency = 7.0
    w.tick(times=2)
    assert apps.decision("web") is not None
    # A successor under a changed policy does not continue the old panic.
    apps.set_autoscale("web", {**POLICY, "target": 7})
    w.live = [B]
    w.concurrency = 0.0
    w.tick()
    assert apps.replicas("web") == 2  # stable mode at once: halved, not held by the old panic
    apps.clear_autoscale("web")
    assert apps.decision("web") is None
    w.tick()
    assert "web" not in w.nodes[A].windows and apps.replicas("web") == 2


def test_scale_to_zero_when_the_policy_allows(apps: AppStore) -> None:
    apps.set_autoscale("web", {**POLICY, "min_replicas": 0, "scale_to_zero_after": 5})
    w = World(apps)
    w.concurrency = 0.0
    w.tick(times=7)
    assert apps.replicas("web") == 0
    record = apps.decision("web")
    assert record is not None and "scale to zero" in record["history"][-1]["reason"]
    assert w.nodes[A].m_decisions.value(app="web", direction="down") == 1


def test_the_decision_record_fits_a_gossip_packet_and_keeps_the_last_decisions() -> None:
    app = "a" * 63
    policy = AutoscalePolicy.from_value(POLICY)
    record = None
    for i in range(HISTORY + 3):
        d = Decision(desired=100, reason="r" * 10_000, panic=True, panic_last=1e12 + i,
                     counts=tuple((1e12 + j, 100 + j) for j in range(COUNTS_KEPT)))
        record = decision_record(app, d, 99, policy, "f" * 32, 1e12 + i, record)
        assert gossip_size("scale", app + DECISION_SUFFIX, record) <= PACKET_RECORD_BYTES
    assert record is not None and 1 <= len(record["history"]) <= HISTORY
    assert record["history"][-1]["at_ms"] == int((1e12 + HISTORY + 2) * 1000)
    short = None
    for i in range(HISTORY + 3):
        d = Decision(desired=i, reason="short", panic=False)
        short = decision_record("web", d, i, policy, "f" * 32, 1e9 + i, short)
    assert short is not None and [h["to"] for h in short["history"]] == list(range(3, HISTORY + 3))


def test_the_autoscale_table_is_validated() -> None:
    cfg = load(env={"PLEACO_AUTOSCALE_INTERVAL": "0.5", "PLEACO_AUTOSCALE_MAX_SAMPLES": "100",
                    "PLEACO_AUTOSCALE_REPORT_SETTLE": "0"})
    assert (cfg.autoscale.interval, cfg.autoscale.max_samples, cfg.autoscale.report_settle) == (0.5, 100, 0)
    for env, message in [({"PLEACO_AUTOSCALE_INTERVAL": "0"}, "autoscale.interval: must be greater than 0"),
                         ({"PLEACO_AUTOSCALE_MAX_SAMPLES": "0"}, "autoscale.max_samples: must be at least 1"),
                         ({"PLEACO_AUTOSCALE_REPORT_SETTLE": "-1"}, "autoscale.report_settle: must be at least 0")]:
        with pytest.raises(ConfigError, match=message):
            load(env=env)


def test_a_decision_another_node_wrote_meanwhile_is_the_state_to_continue_from(apps: AppStore) -> None:
    """While the live nodes change, two nodes may each believe they own the app for a tick:
    the owner's own state in memory is then older than the record the other wrote."""
    w = World(apps)
    apps.store.put("scale", "web", {"replicas": 4})
    w.concurrency = 8.0  # 2 per replica at 4: within the band, nothing to write
    w.tick(times=8)
    assert apps.decision("web") is None and apps.replicas("web") == 4
    # For a moment B takes itself for the owner and sees a surge: panic, up to the max.
    w.live = [B]
    w.concurrency = 30.0
    for _ in range(2):
        w.now += 1
        w.nodes[B].tick()
    written = apps.decision("web")
    assert apps.replicas("web") == 6 and written is not None and written["node"] == B
    # A is the owner again (it never stopped believing so) and the surge is gone: it
    # continues B's panic (holds 6) rather than its own calm state (which would go to 4).
    w.live = [A]
    w.concurrency = 8.0
    for _ in range(2):
        w.now += 1
        w.nodes[A].tick()
    assert apps.replicas("web") == 6


def test_a_load_report_with_news_is_sampled_at_once_not_at_the_next_tick(apps: AppStore) -> None:
    """The agent wires LoadView.on_news to the autoscaler's wake: with ticks an hour apart,
    only the reports can bring the samples, each a report_settle after its news."""
    async def main() -> None:
        view = LoadView(A, stale_after=3600.0)
        scaler = Autoscaler(AutoscaleConfig(interval=3600.0, report_settle=0.01), apps, view.all,
                            Owners(A, lambda: [A]), Registry())
        view.on_news = scaler.wake
        runner = LoopRunner(Registry())
        runner.add(scaler)
        runner.start()
        try:
            wall = 1_000
            for concurrency in (1.0, 7.0, 9.0):
                wall += 1
                entry = AppLoadEntry("web", 0.0, concurrency, None, None, 1, 0.0, 0)
                view.set_local([LoadReport(A, wall, 0, (entry,))])
                deadline = time.monotonic() + 30
                while not any(s.value == concurrency for s in scaler.windows.get("web", ())):
                    assert time.monotonic() < deadline, f"no sample of {concurrency} after its report"
                    await asyncio.sleep(POLL)
            # An old report is no news: no wake (and no sample of it, at any tick).
            view.set_local([LoadReport(A, wall - 5, 0, (AppLoadEntry("web", 0.0, 50.0, None, None, 1, 0.0, 0),))])
            assert view.cluster("web") is not None and view.cluster("web").concurrency == 9.0  # type: ignore[union-attr]
            # The surge went through the decision too: panic, up.
            deadline = time.monotonic() + 30
            while apps.replicas("web") == 1:
                assert time.monotonic() < deadline, "no decision after the surge's report"
                await asyncio.sleep(POLL)
        finally:
            await runner.stop()

    asyncio.run(main())
