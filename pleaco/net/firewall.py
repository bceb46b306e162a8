"""iptables chains pleaco owns: written whole in one transaction, hooked into the kernel's
chains, removed again without touching anyone else's rules.

Shared by the build network (pleaco/builds/network.py), the mesh's NAT and MSS rules
(pleaco/net/mesh.py) and the app network's isolation (pleaco/net/isolation.py). Each owner
names its chains (``PLEACO-...``) so no two share one; a chain is only ever replaced as a
whole (``iptables-restore --noflush`` flushes just the chains it declares), so the kernel
never holds a half-written set.
"""

from __future__ import annotations

import os
import shutil
import subprocess
from collections.abc import Sequence


class FirewallError(RuntimeError):
    """iptables refused a change (not root, no iptables, a bad rule)."""


def run(tool: str, *args: str) -> subprocess.CompletedProcess[str]:
    # -w: wait for the xtables lock the engine and other agents also take.
    return subprocess.run([tool, "-w", *args], capture_output=True, text=True, timeout=30, check=False)


def restore(tool: str, chains: Sequence[str], rules: Sequence[str], what: str, table: str = "filter") -> None:
    """Replace ``chains`` of ``table`` with ``rules`` (``-A CHAIN ...`` lines), atomically."""
    text = f"*{table}\n" + "".join(f":{c} - [0:0]\n" for c in chains) + "\n".join(rules) + "\nCOMMIT\n"
    try:
        res = subprocess.run([tool, "-w", "--noflush"], input=text, capture_output=True, text=True, timeout=30,
                             check=False)
    except (OSError, subprocess.SubprocessError) as exc:
        raise FirewallError(f"{tool} could not write {what}: {exc}") from exc
    if res.returncode != 0:
        raise FirewallError(f"{tool} could not write {what}: {res.stderr.strip()}")


def has_chain(tool: str, chain: str, table: str = "filter") -> bool:
    return run(tool, "-t", table, "-S", chain).returncode == 0


def hook(tool: str, parent: str, chain: str, match: Sequence[str] = (), table: str = "filter",
         first: bool = False) -> None:
    """Jump from ``parent`` to ``chain`` for packets matching ``match``, where missing. With
    ``first`` the jump must also be the parent's first rule: the engine inserts its own
    rules at the top of the NAT chains when it creates a network, above ours."""
    rule = [parent, *match, "-j", chain]
    present = run(tool, "-t", table, "-C", *rule).returncode == 0
    if present and (not first or _first_rule(tool, table, parent) == ["-A", *rule]):
        return
    while present and run(tool, "-t", table, "-D", *rule).returncode == 0:
        pass
    res = run(tool, "-t", table, "-I", parent, "1", *match, "-j", chain)
    if res.returncode != 0:
        raise FirewallError(f"{tool} could not hook {chain} into {parent}: {res.stderr.strip()}")


def _first_rule(tool: str, table: str, parent: str) -> list[str]:
    lines = [ln.split() for ln in run(tool, "-t", table, "-S", parent).stdout.splitlines()]
    rules = [ln for ln in lines if ln[:1] == ["-A"]]
    return rules[0] if rules else []


def remove(tool: str, parent: str, chain: str, match: Sequence[str] = (), table: str = "filter") -> None:
    """Unhook ``chain`` from ``parent`` and delete it; nothing when it is not there."""
    if shutil.which(tool) is None:
        return
    while run(tool, "-t", table, "-D", parent, *match, "-j", chain).returncode == 0:
        pass
    run(tool, "-t", table, "-F", chain)
    run(tool, "-t", table, "-X", chain)


def rules(tool: str, chain: str, table: str = "filter") -> list[str]:
    """The ``-A`` lines of ``chain`` as iptables prints them ([] when it does not exist)."""
    res = run(tool, "-t", table, "-S", chain)
    return [ln for ln in res.stdout.splitlines() if ln.startswith("-A ")] if res.returncode == 0 else []


def forward_parent() -> str:
    """Where rules on forwarded packets go: DOCKER-USER comes before the engine's own
    FORWARD rules (and the engine restores the jump to it when it restarts); FORWARD on a
    host without the engine's chains."""
    return "DOCKER-USER" if has_chain("iptables", "DOCKER-USER") else "FORWARD"


def has_ipv6() -> bool:
    return os.path.exists("/proc/net/if_inet6")
