"""The autoscale benchmark's 2x step, simulated: the real TrafficStats and decide() on a
virtual clock, so an idea about the metric pipeline can be tried over a hundred phases in
seconds instead of one benchmark round a minute and a half.

``python -m benchmarks.autoscale_sim [--report S] [--tick S] [--window S] [--wake SETTLE]
[--runs N] [--noise-seconds S]``

What is modelled, as in benchmarks/autoscale.py: open-loop requests of 1.0075-1.0175 s
(the slow app's CGI plus fork and proxy), 4/s redrawn every second within +-20 % for 70 s,
then 8/s; each request's access-log line arrives when it ends (plus up to a read batch,
50 ms); the node reports the app's figure (``TrafficStats.snapshot(window)``) every
``--report`` s; the autoscaler samples the latest report every ``--tick`` s and, with
``--wake``, that many seconds after each report as well; the default policy (concurrency,
target 2, min 1, max 8) decides from 2 replicas. The phases of the report and the tick,
and the request times, are drawn per run. Printed: the decision latency (step to the
decision that writes 4) over the runs, and with ``--noise-seconds`` the count changes in
that long a constant noisy load (3 runs; any is a flap risk).

Not modelled: gossip between nodes (one node, its own report), the time a step of the
agent's loops takes, and the machine's load; the real benchmark measures those.
"""

from __future__ import annotations

import argparse
import heapq
import json
import random
import statistics

from pleaco.ingress.traffic import TrafficStats
from pleaco.metrics import Registry
from pleaco.scale import AutoscalePolicy, Decision, Sample, decide

HOST = "slow.pleaco.internal"
STEP_AT = 70.0  # seconds of steady noisy load before the step
POLICY_AT = 10.0  # the policy is set once a few samples show the steady load
BATCH = 0.05  # the agent reads the access log at most this often


def one_run(seed: int, opts: argparse.Namespace, step_at: float, end: float) -> tuple[float | None, int]:
    """(decision latency, or None without one; count changes before the step)."""
    rng = random.Random(seed)
    clock = {"now": 0.0}
    traffic = TrafficStats(Registry(), clock=lambda: clock["now"])
    traffic.set_hosts({HOST: "slow"})
    policy = AutoscalePolicy(min_replicas=1, max_replicas=8, metric="concurrency", target=2.0)
    events: list[tuple[float, int, str, float]] = []
    seq = 0

    def at(t: float, kind: str, arg: float = 0.0) -> None:
        nonlocal seq
        seq += 1
        heapq.heappush(events, (t, seq, kind, arg))

    t, rate, next_draw = rng.uniform(0, 0.25), 4.0, 0.0
    while t < end:
        if t >= next_draw:
            rate, next_draw = 4.0 * rng.uniform(0.8, 1.2), next_draw + 1.0
        duration = 1.0075 + rng.uniform(0, 0.01)
        at(t + duration + rng.uniform(0, BATCH), "line", duration)
        t += 1.0 / (rate if t < step_at else 8.0)
    report_phase, tick_phase = rng.uniform(0, opts.report), rng.uniform(0, opts.tick)
    k = 0
    while report_phase + k * opts.report < end:
        at(report_phase + k * opts.report, "report")
        k += 1
    k = 0
    while tick_phase + k * opts.tick < end:
        at(tick_phase + k * opts.tick, "tick")
        k += 1
    figure: float | None = None
    samples: list[Sample] = []
    current, previous = 2, None
    decision: Decision | None
    changes = 0
    while events:
        now, _, kind, arg = heapq.heappop(events)
        clock["now"] = now
        if kind == "line":
            line = {"level": "info", "ts": now, "request": {"host": HOST}, "duration": arg, "status": 200}
            traffic.feed_lines([json.dumps(line).encode()])
        elif kind == "report":
            snap = traffic.snapshot(opts.window)
            figure = snap["slow"].concurrency if "slow" in snap else 0.0
            if opts.wake is not None:
                at(now + opts.wake, "tick")
        elif figure is not None:
            samples = [s for s in samples if s.at > now - policy.stable_window - 1] + [Sample(now, figure)]
            if now < POLICY_AT:
                continue
            decision = decide(policy, current, samples, now, previous)
            previous = decision
            if decision.desired != current:
                current = decision.desired
                if now < step_at:
                    changes += 1
                elif current >= 4:
                    return now - step_at, changes
    return None, changes


def main() -> None:
    p = argparse.ArgumentParser(prog="python -m benchmarks.autoscale_sim", description=__doc__.splitlines()[0])
    p.add_argument("--report", type=float, default=1.0, help="seconds between load reports (default 1)")
    p.add_argument("--tick", type=float, default=1.0, help="seconds between the autoscaler's ticks (default 1)")
    p.add_argument("--window", type=float, default=2.0, help="the traffic figure's window, seconds (default 2)")
    p.add_argument("--wake", type=float, metavar="SETTLE",
                   help="also sample and decide SETTLE seconds after each report (the agent: 0.2)")
    p.add_argument("--runs", type=int, default=100, help="runs, each with its own phases (default 100)")
    p.add_argument("--noise-seconds", type=float, default=0.0,
                   help="also count the changes in 3 runs of this long a noisy constant load")
    opts = p.parse_args()
    got = [one_run(seed, opts, STEP_AT, STEP_AT + 20)[0] for seed in range(opts.runs)]
    latencies = sorted(x if x is not None else float("inf") for x in got)
    print(f"decision latency over {opts.runs} runs: min {latencies[0]:.2f} s, median "
          f"{statistics.median(latencies):.2f} s, p90 {latencies[int(0.9 * len(latencies))]:.2f} s, "
          f"max {latencies[-1]:.2f} s, none within 20 s: {sum(x is None for x in got)}")
    if opts.noise_seconds:
        changes = sum(one_run(1000 + seed, opts, opts.noise_seconds, opts.noise_seconds)[1] for seed in range(3))
        print(f"count changes in {3 * opts.noise_seconds:.0f} s of +-20 % noise: {changes}")


if __name__ == "__main__":
    main()
