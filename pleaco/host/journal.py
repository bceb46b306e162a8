"""Logs to the systemd journal with structured fields, when systemd runs the agent.

Each event becomes one journal entry (the native protocol, systemd.journal-fields(7)):
``MESSAGE`` is the event's logfmt line without ``ts`` and ``level`` (the journal keeps its
own time and ``PRIORITY``) and without the traceback (its own field); every field of the
event is there too, upper-cased with a ``PLEACO_`` prefix (``PLEACO_EVENT``,
``PLEACO_NODE``, ``PLEACO_APP``, ``PLEACO_BUILD``, ``PLEACO_TRACEBACK``, ...), so
``journalctl -u pleaco PLEACO_APP=web`` selects an app's lines and ``-o json`` reads them.

The protocol: a datagram to ``/run/systemd/journal/socket`` holding ``NAME=value\\n``
fields, or, for a value with a newline, ``NAME\\n`` + its length (64-bit little-endian) +
the value + ``\\n``. An entry too big for one datagram (over the socket's send buffer, a
few hundred KiB: a huge traceback) is written to a sealed memfd whose descriptor is sent
instead, as libsystemd does, so nothing is truncated. If the journal cannot be reached,
the line goes to standard error, as without systemd.

The journal is used only when standard error *is* the journal's stream (``$JOURNAL_STREAM``
names its device and inode, systemd.exec(5)): not when a service's stderr is redirected,
and not in a process that merely inherited the variables (an agent a test starts from
a shell inside a unit, whose stderr the test reads).
"""

from __future__ import annotations

import array
import errno
import fcntl
import logging
import os
import re
import socket
import struct
import sys
from collections.abc import Iterable, Mapping
from typing import Any

from pleaco import logs

JOURNAL_SOCKET = "/run/systemd/journal/socket"
IDENTIFIER = "pleaco"
PREFIX = "PLEACO_"
# Fields the entry carries otherwise: the journal's own timestamp and PRIORITY; the
# traceback is PLEACO_TRACEBACK rather than part of MESSAGE.
NOT_IN_MESSAGE = ("ts", "level", "traceback")
NOT_FIELDS = ("ts", "level")
# syslog priorities (journal PRIORITY) of the logging levels.
PRIORITIES = {logging.DEBUG: 7, logging.INFO: 6, logging.WARNING: 4, logging.ERROR: 3, logging.CRITICAL: 2}
MAX_NAME = 64  # journald drops fields with longer names


def field_name(key: str) -> str:
    """``PLEACO_`` + the key upper-cased, every character outside A-Z 0-9 _ as ``_``:
    journald accepts only such names, and not starting with ``_`` (its trusted fields)."""
    return (PREFIX + re.sub(r"[^A-Z0-9_]", "_", key.upper()))[:MAX_NAME]


def encode_entry(fields: Iterable[tuple[str, str]]) -> bytes:
    """One entry in the native protocol; a value with a newline in the binary length form."""
    out = bytearray()
    for name, value in fields:
        data = value.encode("utf-8", "replace")
        if b"\n" in data:
            out += name.encode() + b"\n" + struct.pack("<Q", len(data)) + data + b"\n"
        else:
            out += name.encode() + b"=" + data + b"\n"
    return bytes(out)


def entry_fields(record: logging.LogRecord, event: Mapping[str, Any]) -> list[tuple[str, str]]:
    """The journal fields of one event (``event``: LogfmtFormatter.event_fields)."""
    message = logs.logfmt({k: v for k, v in event.items() if k not in NOT_IN_MESSAGE})
    out = [
        ("MESSAGE", message),
        ("PRIORITY", str(PRIORITIES.get(record.levelno, 6))),
        ("SYSLOG_IDENTIFIER", IDENTIFIER),
        ("CODE_FILE", record.pathname),
        ("CODE_LINE", str(record.lineno)),
        ("CODE_FUNC", record.funcName),
        (PREFIX + "LOGGER", record.name),
    ]
    out += [(field_name(k), str(v)) for k, v in event.items() if k not in NOT_FIELDS]
    return out


def journal_stream_is_stderr(env: Mapping[str, str], fd: int = 2) -> bool:
    """Whether ``fd`` is the stream systemd connected to the journal ($JOURNAL_STREAM is
    ``DEVICE:INODE``)."""
    dev, _, ino = env.get("JOURNAL_STREAM", "").partition(":")
    if not dev.isdigit() or not ino.isdigit():
        return False
    try:
        st = os.fstat(fd)
    except OSError:
        return False
    return st.st_dev == int(dev) and st.st_ino == int(ino)


class JournalHandler(logging.Handler):
    """A logging handler that sends each event to the journal (see the module doc)."""

    def __init__(self, path: str = JOURNAL_SOCKET) -> None:
        super().__init__()
        self.path = path
        self._fields = logs.LogfmtFormatter()  # the event's fields, as the logfmt line has them
        self._sock: socket.socket | None = None

    def emit(self, record: logging.LogRecord) -> None:
        try:
            event = self._fields.event_fields(record)
            data = encode_entry(entry_fields(record, event))
        except Exception:
            self.handleError(record)
            return
        try:
            self.send(data)
        except OSError as exc:
            # The journal is gone (restarting): the line still goes somewhere, with why.
            sys.stderr.write(logs.logfmt(event) + f" journal_error={exc.errno}\n")

    def send(self, data: bytes) -> None:
        if self._sock is None:
            self._sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC)
        try:
            self._sock.sendto(data, self.path)
        except OSError as exc:
            if exc.errno not in (errno.EMSGSIZE, errno.ENOBUFS):
                raise
            self._send_memfd(data)

    def _send_memfd(self, data: bytes) -> None:
        """A big entry: written to a sealed memfd, whose descriptor journald reads."""
        assert self._sock is not None
        fd = os.memfd_create("pleaco-journal", os.MFD_CLOEXEC | os.MFD_ALLOW_SEALING)
        try:
            view = memoryview(data)
            while view:
                view = view[os.write(fd, view):]
            fcntl.fcntl(fd, fcntl.F_ADD_SEALS,
                        fcntl.F_SEAL_SHRINK | fcntl.F_SEAL_GROW | fcntl.F_SEAL_WRITE | fcntl.F_SEAL_SEAL)
            self._sock.sendmsg([], [(socket.SOL_SOCKET, socket.SCM_RIGHTS, array.array("i", [fd]))], 0, self.path)
        finally:
            os.close(fd)

    def close(self) -> None:
        if self._sock is not None:
            self._sock.close()
            self._sock = None
        super().close()


def handler_if_journal(env: Mapping[str, str] | None = None, path: str = JOURNAL_SOCKET) -> JournalHandler | None:
    """The journal's handler when systemd runs this process with stderr to the journal and
    its socket exists; None otherwise (logfmt to stderr, pleaco.logs' default)."""
    env = os.environ if env is None else env
    if journal_stream_is_stderr(env) and os.path.exists(path):
        return JournalHandler(path)
    return None
