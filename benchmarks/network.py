"""Network: container-to-container throughput between two hosts through the kernel mesh,
against host-to-host in the same run.

Two hosts, each a network namespace with its own Docker Engine, on one bridge
(tests/integration/nethosts.py, the same hosts the integration tests use); on each a
Docker network on its subnet of 10.210.0.0/16 and one container. ``KernelMesh`` joins them
with host-gw routes, then with WireGuard (wireguard-go: these kernels have no WireGuard
module). One TCP stream for ``SECONDS`` each way measured: a sender writing 1 MiB buffers,
a receiver counting bytes from the first to the last, both Python processes entered into
the containers' network namespaces (``nsenter --net``; busybox's ``nc`` stops after its
first 64 KiB), so all three paths are measured by the same programs:

- host to host: namespace to namespace over the bridge (the baseline);
- container to container, host-gw: bridge, route through the peer's host address, bridge;
- container to container, WireGuard: the same through the wireguard-go tunnel.

Rounds alternate the three paths, each round in another order (host to host first, then
last, ...: a load that comes and goes hits all alike); the median of the rounds is
reported, the ratio against host to host. Goal for host-gw: >= 0.95x (no tunnel, no NAT
between cluster subnets: a veth, the bridge and an IP forward more on each side). WireGuard
is reported as it is.

Beside the throughput, each transfer's CPU time per Gbit: the sender's and the receiver's
user and system time (``getrusage`` of the two children). The kernel charges the packets'
path (veths, bridges, forwarding, netfilter, run in softirq on the sending CPU) to the
task it interrupts, mostly the sender (these kernels have no IRQ_TIME_ACCOUNTING), so this
is what a byte costs on each path, and it moves far less with other load on the machine
than the throughput does: one stream is CPU bound, and on a shared machine it gets
whatever share of a core is left.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import resource
import statistics
import subprocess
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from benchmarks.common import BenchError, Row, log
from pleaco.net import wireguard
from tests.integration.meshhosts import run_mesh
from tests.integration.nethosts import engine_hosts

SECONDS = 3.0
# At least this many rounds (--rounds more): on a shared machine one round's ratio moves by
# +-0.2 with the load, and the median of 3 did not settle which side of 0.95 it is on.
ROUNDS = 5
PORT = 5201
NETWORK = "plnb"

RECEIVER = """
import json, socket, sys, time
s = socket.socket(); s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
s.bind(("0.0.0.0", int(sys.argv[1]))); s.listen(1)
print("ready", flush=True)
c, _ = s.accept(); buf = bytearray(1 << 20); n = 0; first = last = 0.0
while True:
    k = c.recv_into(buf)
    if not k:
        break
    last = time.monotonic(); first = first or last; n += k
print(json.dumps({"bytes": n, "seconds": last - first}), flush=True)
"""

SENDER = """
import socket, sys, time
c = socket.create_connection((sys.argv[1], int(sys.argv[2])), timeout=10)
buf = b"x" * (1 << 20); end = time.monotonic() + float(sys.argv[3])
while time.monotonic() < end:
    c.sendall(buf)
c.close()
"""


def _netns_of(container: Any) -> list[str]:
    container.reload()
    return ["nsenter", f"--net=/proc/{container.attrs['State']['Pid']}/ns/net"]


def _children_cpu() -> float:
    ru = resource.getrusage(resource.RUSAGE_CHILDREN)
    return ru.ru_utime + ru.ru_stime


@dataclass(frozen=True)
class Transfer:
    gbit_s: float
    cpu_ms_per_gbit: float  # the sender's and the receiver's CPU time, per Gbit carried


def transfer(recv_prefix: list[str], send_prefix: list[str], dst: str, seconds: float) -> Transfer:
    """One stream from ``send_prefix``'s namespace to ``dst`` in ``recv_prefix``'s. Both are
    this process's only children while it runs (``nsenter`` execs the program), so the
    growth of RUSAGE_CHILDREN is theirs."""
    cpu0 = _children_cpu()
    rx = subprocess.Popen([*recv_prefix, sys.executable, "-c", RECEIVER, str(PORT)], stdout=subprocess.PIPE,
                          stderr=subprocess.PIPE, text=True)
    try:
        assert rx.stdout is not None
        if rx.stdout.readline().strip() != "ready":
            raise BenchError(f"the receiver did not start: {rx.stderr.read() if rx.stderr else ''}")
        tx = subprocess.run([*send_prefix, sys.executable, "-c", SENDER, dst, str(PORT), str(seconds)],
                            capture_output=True, text=True, timeout=seconds + 30, check=False)
        if tx.returncode != 0:
            raise BenchError(f"the sender to {dst} failed: {tx.stderr.strip()[-500:]}")
        out, err = rx.communicate(timeout=30)
        if not out.strip():
            raise BenchError(f"the receiver at {dst} failed: {err.strip()[-500:]}")
        result = json.loads(out.strip().splitlines()[-1])
        if not result["seconds"]:
            raise BenchError(f"nothing reached {dst}")
        gbit = float(result["bytes"]) * 8 / 1e9
        return Transfer(gbit / result["seconds"], (_children_cpu() - cpu0) * 1000 / gbit)
    finally:
        if rx.poll() is None:
            rx.kill()
            rx.wait()


def run(opts: argparse.Namespace) -> list[Row]:
    rounds = max(opts.rounds, ROUNDS)
    paths = ("host", "host-gw", "wireguard")
    samples: dict[str, list[float]] = {p: [] for p in paths}
    cpu: dict[str, list[float]] = {p: [] for p in paths}  # ms per Gbit
    with engine_hosts(2, "nb", 72, images=("pleaco/busybox:latest",)) as hosts, \
            tempfile.TemporaryDirectory(prefix="pl-nb-") as tmp:
        datas = [Path(tmp) / f"n{h.index}" for h in hosts]
        subnets = [f"10.210.{72 + h.index}.0/24" for h in hosts]
        ifaces = [f"plnb-wg{h.index}" for h in hosts]
        peers = [{"node_id": f"node{h.index}", "host": h.ip, "subnet": subnets[h.index],
                  "wg_key": wireguard.load_or_create_key(datas[h.index]).public, "wg_port": 51820} for h in hosts]
        containers = []

        def mesh(op: str, mode: str = "auto") -> None:
            for h in hosts:
                run_mesh(h, datas[h.index], op, peers[h.index], peers if op == "apply" else [],
                         {"mesh": mode, "wireguard_interface": ifaces[h.index]})

        try:
            for h in hosts:
                h.sh("iptables", "-P", "FORWARD", "DROP")  # as on a stock Docker host
                client = h.docker()
                client.networks.create(NETWORK, driver="bridge", ipam={"Config": [{"Subnet": subnets[h.index]}]},
                                       options={"com.docker.network.bridge.name": NETWORK})
                c = client.containers.run("pleaco/busybox:latest", ["sleep", "3600"], network=NETWORK, detach=True)
                c.reload()
                containers.append(c)
            ips = [c.attrs["NetworkSettings"]["Networks"][NETWORK]["IPAddress"] for c in containers]
            ns = [_netns_of(c) for c in containers]
            for r in range(rounds):
                for path in paths[r % 3:] + paths[:r % 3]:
                    if path == "host":
                        t = transfer(hosts[1].prefix, hosts[0].prefix, hosts[1].ip, SECONDS)
                    else:
                        mesh("apply", path)
                        t = transfer(ns[1], ns[0], ips[1], SECONDS)
                        mesh("close")
                    samples[path].append(t.gbit_s)
                    cpu[path].append(t.cpu_ms_per_gbit)
                log(f"network: round {r + 1}: " + ", ".join(f"{k} {v[-1]:.2f} Gbit/s ({cpu[k][-1]:.0f} ms CPU/Gbit)"
                                                            for k, v in samples.items()))
        finally:
            with contextlib.suppress(RuntimeError):  # the hosts' namespaces go next anyway
                mesh("close")
    host = statistics.median(samples["host"])
    gw = statistics.median(samples["host-gw"])
    wg = statistics.median(samples["wireguard"])
    # Each round's paths ran within the same minute: their ratios show how much of the
    # spread is the machine's load rather than the path.
    ratios = {mode: [round(x / h, 3) for x, h in zip(samples[mode], samples["host"], strict=True)]
              for mode in ("host-gw", "wireguard")}
    cpu_ratios = {mode: [round(x / h, 3) for x, h in zip(cpu[mode], cpu["host"], strict=True)]
                  for mode in ("host-gw", "wireguard")}
    details = {"samples": samples, "round_ratios": ratios, "cpu_ms_per_gbit": cpu, "cpu_round_ratios": cpu_ratios,
               "seconds_per_transfer": SECONDS}
    return [
        Row("network container to container, host-gw", "Gbit/s", gw, host, "host to host", ">= 0.95x",
            gw / host >= 0.95, details),
        Row("network container to container, WireGuard", "Gbit/s", wg, host, "host to host", "", None, details),
        Row("network CPU per Gbit, host-gw", "ms", statistics.median(cpu["host-gw"]), statistics.median(cpu["host"]),
            "host to host", "", None, details),
    ]
