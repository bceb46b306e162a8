"""pleaco's parts are layered: a part imports only parts of lower layers, so there is no
import cycle and no upward import. The layers are documented in README.md ("The tree")."""

from __future__ import annotations

import ast
from pathlib import Path

import pleaco

# Bottom to top. A part is a top-level module or subpackage of pleaco.
LAYERS: list[set[str]] = [
    {"__init__", "logs", "metrics", "errors", "hostport", "urlpath", "identity"},  # foundations
    # pure decisions over the foundations: the autoscaler's (pleaco/scale/decide.py); node
    # labels and placement constraints (pleaco/constraints.py); an app's volume mounts as
    # its spec holds them (pleaco/mounts.py); cron expressions (pleaco/cron.py); an app's
    # health command (pleaco/healthcmd.py)
    {"scale", "constraints", "mounts", "cron", "healthcmd"},
    {"store"},  # the replicated state on disk
    {"net"},  # the host's network: its addresses, node subnets, the mesh seam (pyroute2)
    {"cluster", "runtime"},  # gossip and trust; Docker Engine (neither knows the other)
    {"apps", "placement", "host"},  # what the state means: app specs, who runs and decides what; the host
    {"reconcile"},  # the loop runner and the app, rollout, tombstone loops
    {"ingress", "builds"},  # the proxy loop; the build pipeline and its loops
    {"stacks"},  # real apps: app secrets (given to replicas through the app loop's seam)
    {"api"},  # the HTTP API and its client
    {"ui"},  # the web dashboard: pages over the API's own handlers
    {"config"},  # the agent's settings, made of the parts' own
    {"agent"},  # wires the parts together and runs them
    {"cli"},  # the pleaco command: client verbs, and the agent
    {"__main__"},
]
ROOT = Path(pleaco.__file__).parent


def layer_of(part: str) -> int:
    for i, parts in enumerate(LAYERS):
        if part in parts:
            return i
    raise AssertionError(f"pleaco.{part} is in no layer: add it to LAYERS and to the README")


def part_of(path: Path) -> str:
    rel = path.relative_to(ROOT)
    return rel.parts[0] if len(rel.parts) > 1 else rel.stem


def imported_parts(path: Path) -> set[str]:
    """The pleaco parts a file imports at run time (imports under TYPE_CHECKING do not count)."""
    tree = ast.parse(path.read_text(), str(path))
    typing_only = {id(n) for node in ast.walk(tree)
                   if isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test)
                   for n in ast.walk(node)}
    out = set()
    for node in ast.walk(tree):
        if id(node) in typing_only:
            continue
        names: list[str] = []
        if isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names = [f"pleaco.{a.name}" for a in node.names] if node.module == "pleaco" else [node.module]
        elif isinstance(node, ast.Import):
            names = [a.name for a in node.names]
        for name in names:
            bits = name.split(".")
            if bits[0] == "pleaco" and len(bits) > 1 and bits[1] != "__version__":
                out.add(bits[1])
    return out


def edges() -> dict[tuple[str, str], str]:
    found: dict[tuple[str, str], str] = {}
    for path in sorted(ROOT.rglob("*.py")):
        me = part_of(path)
        for other in imported_parts(path) - {me}:
            found.setdefault((me, other), str(path.relative_to(ROOT.parent)))
    return found


def test_every_part_is_in_a_layer() -> None:
    for path in ROOT.rglob("*.py"):
        layer_of(part_of(path))


def test_no_part_imports_a_part_of_its_own_or_a_higher_layer() -> None:
    bad = [f"{where}: {a} (layer {layer_of(a)}) imports {b} (layer {layer_of(b)})"
           for (a, b), where in sorted(edges().items()) if layer_of(b) >= layer_of(a)]
    assert not bad, "upward or sideways imports:\n" + "\n".join(bad)


def test_the_check_sees_an_upward_import(tmp_path: Path) -> None:
    sample = tmp_path / "sample.py"
    sample.write_text("from pleaco.agent import Agent\nimport pleaco.store.db\nfrom pleaco import logs\n"
                      "from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n    from pleaco.api import server\n")
    assert imported_parts(sample) == {"agent", "store", "logs"}
