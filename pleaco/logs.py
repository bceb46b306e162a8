"""Structured logs: one line per event, logfmt (``key=value``), ids included.

Callers log events, not prose: ``log.info("replica.started", app="web", replica=2)``.
The node id is added to every line once it is known, so lines from several agents on one
machine can be told apart.
"""

from __future__ import annotations

import contextlib
import logging
import sys
import time
from typing import Any

_node_fields: dict[str, str] = {}


def _quote(value: Any) -> str:
    text = str(value)
    if text == "" or any(c in text for c in ' "=\n\r\t'):
        text = '"' + text.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n").replace("\r", "\\r") + '"'
    return text


class LogfmtFormatter(logging.Formatter):
    def event_fields(self, record: logging.LogRecord) -> dict[str, Any]:
        """An event's fields, in line order: ts, level, event, the node's, the caller's,
        and for an error its last line and whole traceback. Also the journal's
        (pleaco.host.journal), so both carry the same fields."""
        ts = time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record.created))
        fields: dict[str, Any] = {
            "ts": f"{ts}.{int(record.msecs):03d}Z",
            "level": record.levelname.lower(),
            "event": record.getMessage(),
        }
        fields.update(_node_fields)
        fields.update(getattr(record, "fields", {}))
        if record.exc_info:
            # The whole stack, still on the event's one line: logfmt quotes the value and
            # escapes its newlines (\n). ``error`` repeats the last line, to grep for.
            trace = self.formatException(record.exc_info)
            fields["error"] = trace.splitlines()[-1]
            fields["traceback"] = trace
        return fields

    def format(self, record: logging.LogRecord) -> str:
        return logfmt(self.event_fields(record))


def logfmt(fields: dict[str, Any]) -> str:
    return " ".join(f"{k}={_quote(v)}" for k, v in fields.items())


class EventLogger:
    """A thin wrapper over ``logging.Logger`` taking an event name and fields."""

    def __init__(self, name: str) -> None:
        self._log = logging.getLogger(name)

    def _emit(self, level: int, event: str, exc_info: bool, fields: dict[str, Any]) -> None:
        if self._log.isEnabledFor(level):
            # stacklevel: the record names the caller of debug()/info()/..., not this
            # wrapper (the journal's CODE_FILE, CODE_LINE, CODE_FUNC).
            self._log.log(level, event, extra={"fields": fields}, exc_info=exc_info, stacklevel=3)

    def debug(self, event: str, **fields: Any) -> None:
        self._emit(logging.DEBUG, event, False, fields)

    def info(self, event: str, **fields: Any) -> None:
        self._emit(logging.INFO, event, False, fields)

    def warning(self, event: str, **fields: Any) -> None:
        self._emit(logging.WARNING, event, False, fields)

    def error(self, event: str, exc_info: bool = False, **fields: Any) -> None:
        self._emit(logging.ERROR, event, exc_info, fields)


# Seconds one warning line stands for a burst of the same event: long enough that a flood
# of refused connections costs a few lines a minute, short enough that the count is timely.
BURST_WINDOW = 10.0


class Burst:
    """Warnings (or errors) of one event, one line per burst: the first is logged at once; those that
    follow within ``window`` seconds are counted and reported together in one line
    (``repeated=N``, with the last one's fields) when the window ends. For events a
    stranger can cause at will (refused connections), so that a flood is not a log flood."""

    def __init__(self, logger: EventLogger, event: str, window: float = BURST_WINDOW, level: str = "warning") -> None:
        self.logger = logger
        self.event = event
        self.window = window
        self.level = level  # the logger method: "warning" or "error"
        self._until = 0.0
        self._count = 0
        self._last: dict[str, Any] = {}
        self._timer: Any = None

    def log(self, **fields: Any) -> None:
        now = time.monotonic()
        if now >= self._until and not self._count:
            self._until = now + self.window
            getattr(self.logger, self.level)(self.event, **fields)
            return
        self._count += 1
        self._last = fields
        if now >= self._until:
            self.flush()
        elif self._timer is None:
            import asyncio  # here, not at the top: the CLI imports this module and not asyncio

            # Without a loop in this thread, the next warning after the window reports it.
            with contextlib.suppress(RuntimeError):
                self._timer = asyncio.get_running_loop().call_later(self._until - now, self.flush)

    def flush(self) -> None:
        """Report what was counted; the line opens a new window."""
        self._timer = None
        if self._count:
            getattr(self.logger, self.level)(self.event, repeated=self._count, window_s=self.window, **self._last)
            self._count = 0
            self._until = time.monotonic() + self.window


def get(name: str) -> EventLogger:
    return EventLogger(name)


def setup(level: str = "info", node_id: str | None = None, node_name: str | None = None,
          handler: logging.Handler | None = None) -> None:
    """Send pleaco's logs to ``handler``; by default, to standard error in logfmt. (The
    agent hands in the journal's when systemd runs it: pleaco.host.journal.)"""
    if node_id:
        _node_fields["node"] = node_id
    if node_name:
        _node_fields["node_name"] = node_name
    if handler is None:
        handler = logging.StreamHandler(sys.stderr)
        handler.setFormatter(LogfmtFormatter())
    root = logging.getLogger("pleaco")
    root.handlers[:] = [handler]
    root.setLevel(level.upper())
    root.propagate = False
