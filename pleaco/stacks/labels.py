"""Node labels: ``pleaco nodes label NODE KEY=VALUE ... KEY-``.

A node's labels are the record ``node/NODEID/labels`` (``{"labels": {KEY: VALUE}}``), a
record of their own beside the node's own ``node/NODEID``: that one is written by the node
itself (its addresses, version, upgrade state) and by the member that admitted it, and with
last-writer-wins per record a label change written by whichever node took the API call
must not undo those writes, nor they it. Any member may write it; the node need not be
alive. Apps constrained to labels (pleaco.constraints) are placed by every node from it.
"""

from __future__ import annotations

from typing import Any

from pleaco import logs
from pleaco.constraints import MAX_LABELS, ConstraintError, parse_label_changes
from pleaco.store import Store

log = logs.get("pleaco.stacks.labels")

LABELS_SUFFIX = "/labels"


class NodeLabels:
    def __init__(self, store: Store) -> None:
        self.store = store

    def of(self, node_id: str) -> dict[str, str]:
        value = self.store.value("node", node_id + LABELS_SUFFIX) or {}
        labels = value.get("labels")
        return dict(labels) if isinstance(labels, dict) else {}

    def all(self) -> dict[str, dict[str, str]]:
        """Every node's labels, by node id (nodes without labels left out)."""
        out: dict[str, dict[str, str]] = {}
        for rec in self.store.peek_records("node"):
            labels = (rec.value or {}).get("labels")
            if rec.key.endswith(LABELS_SUFFIX) and isinstance(labels, dict) and labels:
                out[rec.key.removesuffix(LABELS_SUFFIX)] = {str(k): str(v) for k, v in labels.items()}
        return out

    def change(self, node_id: str, args: Any) -> dict[str, str]:
        """Set (``KEY=VALUE``) and remove (``KEY-``) labels of a node; returns its labels now."""
        if not isinstance(args, list):
            raise ConstraintError('labels: expected a list such as ["disk=ssd", "gpu-"]')
        sets, removes = parse_label_changes(args)
        labels = {k: v for k, v in self.of(node_id).items() if k not in removes}
        labels.update(sets)
        if len(labels) > MAX_LABELS:
            raise ConstraintError(f"labels: a node may have at most {MAX_LABELS}, this would give it {len(labels)}")
        self.store.put_many([("node", node_id + LABELS_SUFFIX, {"labels": labels} if labels else None)])
        log.info("node.labelled", member=node_id, set=",".join(sorted(sets)), removed=",".join(sorted(removes)))
        return labels
