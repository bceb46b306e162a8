"""The cluster layer knows nothing of Docker, builds, reconciling, the proxy, the API or the
agent's configuration: those use the cluster, never the other way round."""

from __future__ import annotations

import ast
from pathlib import Path

import pleaco.cluster

FORBIDDEN = ("pleaco.runtime", "pleaco.builds", "pleaco.reconcile", "pleaco.ingress", "pleaco.api", "pleaco.config")


def imported_modules(path: Path) -> set[str]:
    out: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            out.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module:
            out.add(node.module)
            out.update(f"{node.module}.{alias.name}" for alias in node.names)
    return out


def test_nothing_under_pleaco_cluster_imports_the_layers_above_it() -> None:
    files = sorted(Path(pleaco.cluster.__file__).parent.glob("*.py"))
    assert len(files) > 5
    offending = {
        f"{path.name}: {module}"
        for path in files
        for module in imported_modules(path)
        if any(module == bad or module.startswith(bad + ".") for bad in FORBIDDEN)
    }
    assert not offending, sorted(offending)
