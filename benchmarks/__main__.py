"""Run pleaco's benchmarks and print one table: ``python -m benchmarks [--rounds N]``.

Progress goes to standard error, the table to standard output, and the full results
(every sample, and where pleaco's time went) to benchmarks/results/latest.json.
Exit status: 0 when every measurement was made (1 with --check when a goal is missed), 1
when a benchmark or one of its steps failed, 130 when interrupted. Cleanup runs in every case, also on SIGTERM.
"""

from __future__ import annotations

import argparse
import json
import signal
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from types import FrameType

from benchmarks import autoscale, build, gossip, idle, image, load, network, proxy, scale, stack, state, upgrade
from benchmarks.common import REPO, Row, log, machine

BENCHMARKS: dict[str, Callable[[argparse.Namespace], list[Row]]] = {
    "scale": scale.run, "idle": idle.run, "build": build.run, "gossip": gossip.run, "proxy": proxy.run,
    "load": load.run, "state": state.run, "upgrade": upgrade.run, "autoscale": autoscale.run,
    "network": network.run, "image": image.run, "stack": stack.run,
}
HEADER = ["benchmark", "pleaco", "baseline", "ratio", "goal"]


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m benchmarks", description=__doc__.splitlines()[0])
    p.add_argument("--rounds", type=int, default=2, help="scale rounds per system, alternating (default 2)")
    p.add_argument("--only", action="append", choices=sorted(BENCHMARKS), help="run only this benchmark (repeatable)")
    p.add_argument("--idle-seconds", type=float, default=20.0, help="idle sampling window in seconds (default 20)")
    p.add_argument("--swarm-no-init", action="store_true",
                   help="create the Swarm service without --init (its stops then wait out the 10 s grace period)")
    p.add_argument("--results-dir", default=str(REPO / "benchmarks" / "results"),
                   help="where latest.json and the agent log go (default benchmarks/results)")
    p.add_argument("--state-apps", type=int, action="append", metavar="N",
                   help="app counts the state benchmark measures at (repeatable; default 500 and 5000)")
    p.add_argument("--close-max-conns", type=int, action="append", metavar="N",
                   help="the proxy benchmark's close-per-request app's --max-conns (repeatable: the first in "
                        "the main runs, the others in a p99 sweep after them; default 8)")
    p.add_argument("--autoscale-load-interval", type=float, metavar="S",
                   help="the autoscale benchmark's agent's [proxy] autoscale_load_interval (default: the "
                        "agent's, 1 s; at most load_interval, 2 s): how often the load figures the autoscaler "
                        "samples are reported")
    p.add_argument("--autoscale-steps", type=int, default=2, metavar="N",
                   help="the autoscale benchmark's rounds: each 60 s of noisy steady load (flaps counted) "
                        "then a 2x step (reaction measured); default 2")
    p.add_argument("--check", action="store_true", help="exit 1 when a goal is not met")
    opts = p.parse_args(argv)
    if opts.autoscale_load_interval is not None and not 0 < opts.autoscale_load_interval <= 60:
        p.error("--autoscale-load-interval: must be above 0 and at most 60 seconds")
    if any(not 1 <= n <= 65535 for n in opts.close_max_conns or []):
        p.error("--close-max-conns: must be 1..65535")
    if opts.rounds < 1:
        p.error("--rounds: must be at least 1")
    if opts.autoscale_steps < 1:
        p.error("--autoscale-steps: must be at least 1")
    if opts.idle_seconds <= 0:
        p.error("--idle-seconds: must be greater than 0")
    return opts


def _fmt(value: float | None, unit: str) -> str:
    if value is None:
        return "n/a"
    digits = {"s": 2, "MB": 1, "%": 2, "requests": 0, "replicas": 0, "per hour": 0}.get(unit, 2)
    return f"{value:.{digits}f} {unit}".rstrip()


def table(rows: list[Row]) -> str:
    lines = [HEADER]
    for r in rows:
        goal = r.goal or "-"
        if r.goal:
            goal += ": " + {True: "met", False: "NOT met", None: "unknown"}[r.met]
        lines.append([
            f"{r.benchmark} ({r.unit})" if r.unit else r.benchmark,
            _fmt(r.pleaco, r.unit) if r.pleaco is not None or not r.details.get("error") else "error",
            f"{_fmt(r.baseline, r.unit)} ({r.baseline_name})" if r.baseline_name else "-",
            f"{r.ratio:.2f}x" if r.ratio is not None else "-",
            goal,
        ])
    widths = [max(len(row[i]) for row in lines) for i in range(len(HEADER))]
    out = ["  ".join(c.ljust(w) for c, w in zip(row, widths, strict=True)).rstrip() for row in lines]
    out.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(out)


def _terminate(signum: int, frame: FrameType | None) -> None:
    # Once: a second SIGTERM must not cut the cleanup short (Ctrl-C still can).
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    signal.signal(signal.SIGHUP, signal.SIG_IGN)
    raise KeyboardInterrupt(f"signal {signum}")


def main(argv: Sequence[str] | None = None) -> int:
    opts = parse_args(argv)
    # SIGTERM and SIGHUP unwind like Ctrl-C, so every cleanup (agents, containers, Swarm)
    # still runs.
    signal.signal(signal.SIGTERM, _terminate)
    signal.signal(signal.SIGHUP, _terminate)

    started = time.time()
    selected = opts.only or list(BENCHMARKS)
    rows: list[Row] = []
    failed: dict[str, str] = {}
    interrupted = False
    for name in selected:
        log(f"{name}: starting")
        t0 = time.monotonic()
        try:
            rows.extend(BENCHMARKS[name](opts))
        except KeyboardInterrupt:
            failed[name] = "interrupted"
            interrupted = True
            log(f"{name}: interrupted; cleaned up")
            break
        except Exception as exc:  # one benchmark failing must not hide the others' results
            failed[name] = f"{type(exc).__name__}: {exc}"
            rows.append(Row(benchmark=name, unit="", pleaco=None, details={"error": failed[name]}))
            log(f"{name}: FAILED: {failed[name]}")
        log(f"{name}: done in {time.monotonic() - t0:.0f} s")

    info = machine()
    when = time.strftime("%Y-%m-%d %H:%M:%S %Z", time.localtime(started))
    print(f"pleaco benchmarks, {when}; {info.get('cpus')} cores, kernel {info.get('kernel')}, "
          f"Docker Engine {info.get('docker')}"
          + (f"; {opts.rounds} scale round(s)" if "scale" in selected else "")
          + f"; took {time.time() - started:.0f} s")
    print(table(rows))
    for name, err in failed.items():
        print(f"{name}: {err}")
    # Steps that failed inside a benchmark that otherwise ran (a timed-out round, ...).
    step_errors = list(dict.fromkeys(
        e for r in rows if r.benchmark not in failed
        for e in [*r.details.get("errors", []), *([r.details["error"]] if "error" in r.details else [])]
    ))
    for err in step_errors:
        print(f"error: {err}")

    results = {
        "date": time.strftime("%Y-%m-%dT%H:%M:%S%z", time.localtime(started)),
        "duration_s": round(time.time() - started, 1),
        "machine": info,
        "options": {"rounds": opts.rounds, "idle_seconds": opts.idle_seconds, "swarm_init": not opts.swarm_no_init,
                    "state_apps": opts.state_apps,
                    "only": selected},
        "results": [r.to_json() for r in rows],
        "failed": failed,
    }
    out = Path(opts.results_dir)
    try:
        out.mkdir(parents=True, exist_ok=True)
        (out / "latest.json").write_text(json.dumps(results, indent=2) + "\n")
        log(f"results written to {out / 'latest.json'}")
    except OSError as exc:
        log(f"cannot write results: {exc}")

    if interrupted:
        return 130
    if failed or step_errors:
        return 1
    if opts.check and any(r.met is False for r in rows):
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
