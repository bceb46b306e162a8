"""How the client verbs print: the one table printer every list verb uses, JSON for
``--json``, and times as people read them."""

from __future__ import annotations

import json
import time
from collections.abc import Sequence
from typing import Any


def table(header: Sequence[str], rows: Sequence[Sequence[str]]) -> None:
    """Left-aligned columns two spaces apart, as wide as their widest cell; no trailing blanks."""
    widths = [max(len(str(x)) for x in col) for col in zip(header, *rows, strict=False)]
    for row in [header, *rows]:
        print("  ".join(str(c).ljust(w) for c, w in zip(row, widths, strict=False)).rstrip())


def print_json(value: Any) -> int:
    print(json.dumps(value, indent=2, sort_keys=True))
    return 0


def ago(ts: float) -> str:
    """A past Unix time as "now", "42s ago", "5m ago" or "3h ago"."""
    delta = max(0.0, time.time() - ts)
    if delta < 2:
        return "now"
    if delta < 120:
        return f"{delta:.0f}s ago"
    if delta < 7200:
        return f"{delta / 60:.0f}m ago"
    return f"{delta / 3600:.0f}h ago"


def when(ms: int) -> str:
    """A Unix time in milliseconds as local date and time."""
    return time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(ms / 1000))
