"""Load reports (issue 11): how soon a change of an app's traffic at one node shows in the
cluster-wide figure at another.

Three agents on 127.0.0.1 form a cluster, each with its own proxy (pleaco/caddy); one app
(pleaco/hello, 1 replica). Then, ``--rounds`` times:

- **up**: wrk starts sending requests through node A's proxy (``wrk -t1 -c2``, the app idle
  before); the clock runs from wrk's start until node C's ``GET /v1/apps/APP`` (its
  ``load`` object, the cluster-wide figure) shows at least 10 requests/s, polled every 0.05 s;
- **down**: wrk stops; the clock runs until node C's figure is 0 requests/s.

The bound this measures against: a node reports every ``[proxy] load_interval`` (2 s), its
figures cover the last ``traffic.WINDOW`` (2 s) and a report reaches the other nodes in a few
gossip rounds (0.2 s each): up within about 2 s plus dissemination, down within about 4 s
plus dissemination.
"""

from __future__ import annotations

import argparse
import shutil
import subprocess
import tempfile
import time
from pathlib import Path
from typing import Any

from benchmarks.common import (
    CADDY,
    HELLO,
    HELLO_PORT,
    LOOPBACK,
    Agent,
    BenchError,
    Row,
    finish_workdir,
    free_port,
    log,
    median,
    require_image,
    wait_until,
)

APP = "load-bench"
RPS_SEEN = 10.0


def proxy_config() -> str:
    return (f'proxy_image = "{CADDY}"\n[proxy]\nadmin_listen = "{LOOPBACK}:{free_port()}"\n'
            f'https_listen = "{LOOPBACK}:{free_port()}"\nactivator_listen = "{LOOPBACK}:{free_port()}"\n')


def cluster_rps(agent: Agent) -> float | None:
    load: dict[str, Any] | None = agent.client.request("GET", f"/v1/apps/{APP}").get("load")
    return None if load is None else float(load["rps"])


def measure(a: Agent, c: Agent, rounds: int) -> dict[str, list[float]]:
    url = f"http://{LOOPBACK}:{a.proxy_port}/"
    out: dict[str, list[float]] = {"up_s": [], "down_s": []}
    for rnd in range(1, rounds + 1):
        wait_until(lambda: cluster_rps(c) == 0.0, 30, "the app idle at node C")
        t0 = time.monotonic()
        wrk = subprocess.Popen(["wrk", "-t1", "-c2", "-d60s", "-H", f"Host: {APP}.pleaco.internal", url],
                               stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        try:
            wait_until(lambda: (cluster_rps(c) or 0.0) >= RPS_SEEN, 30, "node A's traffic at node C", interval=0.05)
            out["up_s"].append(time.monotonic() - t0)
            time.sleep(3)  # steady load for a while (a scenario step, not synchronisation)
        finally:
            wrk.terminate()
            wrk.wait(10)
        t1 = time.monotonic()
        wait_until(lambda: cluster_rps(c) == 0.0, 30, "node C to see the traffic stop", interval=0.05)
        out["down_s"].append(time.monotonic() - t1)
        log(f"load round {rnd}: up {out['up_s'][-1]:.2f} s, down {out['down_s'][-1]:.2f} s")
    return out


def run(opts: argparse.Namespace) -> list[Row]:
    if shutil.which("wrk") is None:
        raise BenchError("wrk is not installed (apt-get install wrk; make bench does it)")
    require_image(HELLO)
    require_image(CADDY)
    workdir = Path(tempfile.mkdtemp(prefix="pleaco-bench-load-"))
    try:
        with Agent(workdir, "bench-load-a", config_text=proxy_config()) as a:
            a.client.request("POST", "/v1/cluster/init")
            token = a.client.request("GET", "/v1/cluster/token")["token"]
            with Agent(workdir, "bench-load-b", config_text=proxy_config(), extra_args=["--join-token", token]), \
                    Agent(workdir, "bench-load-c", config_text=proxy_config(), extra_args=["--join-token", token]) as c:
                wait_until(lambda: sum(n["state"] == "alive" for n in c.client.nodes()) == 3, 60, "3 nodes alive")
                a.cli("apps", "deploy", APP, "--image", HELLO, "--port", str(HELLO_PORT), "--health", "/healthz")
                wait_until(lambda: a.client.app(APP)["healthy"] == 1, 60, f"{APP} healthy")
                runs = measure(a, c, max(3, opts.rounds))
                a.remove_app(APP)
    finally:
        finish_workdir(workdir, "bench-load-a.log", opts.results_dir, "load-agent.log")
    return [
        Row(benchmark="load report, traffic at node A to the cluster figure at node C, up", unit="s",
            pleaco=median(runs["up_s"]), details={"samples": [round(x, 3) for x in runs["up_s"]]}),
        Row(benchmark="load report, traffic at node A to the cluster figure at node C, down", unit="s",
            pleaco=median(runs["down_s"]), details={"samples": [round(x, 3) for x in runs["down_s"]]}),
    ]
