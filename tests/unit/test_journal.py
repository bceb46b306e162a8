"""Journal logging: field names, the native protocol's encoding (a multi-line value in the
binary length form), the fields of an event, entries sent over a real datagram socket
(and a big one through a sealed memfd), and when the journal is used at all."""

from __future__ import annotations

import array
import logging
import os
import socket
import struct
from collections.abc import Iterator
from pathlib import Path

import pytest

from pleaco import logs
from pleaco.host.journal import (
    JournalHandler,
    encode_entry,
    field_name,
    handler_if_journal,
    journal_stream_is_stderr,
)


def decode_entry(data: bytes) -> dict[str, str]:
    """journald's reading of the native protocol (the test's own, to check the encoder)."""
    out: dict[str, str] = {}
    i = 0
    while i < len(data):
        nl = data.index(b"\n", i)
        line = data[i:nl]
        if b"=" in line:
            name, _, value = line.partition(b"=")
            out[name.decode()] = value.decode()
            i = nl + 1
        else:
            (size,) = struct.unpack("<Q", data[nl + 1:nl + 9])
            out[line.decode()] = data[nl + 9:nl + 9 + size].decode()
            assert data[nl + 9 + size:nl + 10 + size] == b"\n"
            i = nl + 10 + size
    return out


def test_field_names_are_upper_case_with_the_prefix_and_only_legal_characters() -> None:
    assert field_name("event") == "PLEACO_EVENT"
    assert field_name("node_name") == "PLEACO_NODE_NAME"
    assert field_name("restart_s") == "PLEACO_RESTART_S"
    assert field_name("app-x.y") == "PLEACO_APP_X_Y"
    assert len(field_name("k" * 100)) == 64


def test_a_multi_line_value_uses_the_binary_length_form() -> None:
    data = encode_entry([("MESSAGE", "one line"), ("PLEACO_TRACEBACK", "Traceback\n  line 2\nValueError: x")])
    tb = b"Traceback\n  line 2\nValueError: x"
    assert data == (b"MESSAGE=one line\n" + b"PLEACO_TRACEBACK\n" + struct.pack("<Q", len(tb)) + tb + b"\n")
    assert decode_entry(data) == {"MESSAGE": "one line", "PLEACO_TRACEBACK": "Traceback\n  line 2\nValueError: x"}
    # An '=' in a value is fine in the simple form: the name ends at the first one.
    assert decode_entry(encode_entry([("MESSAGE", "a=b c=d")])) == {"MESSAGE": "a=b c=d"}


class Journal:
    """journald's end: a datagram socket at the journal's address."""

    def __init__(self, path: str) -> None:
        self.path = path
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self.sock.bind(path)
        self.sock.settimeout(5.0)

    def entry(self) -> dict[str, str]:
        data, anc, _, _ = self.sock.recvmsg(1 << 20, socket.CMSG_SPACE(4))
        for level, kind, payload in anc:
            assert (level, kind) == (socket.SOL_SOCKET, socket.SCM_RIGHTS)
            fd = array.array("i", payload[:4])[0]
            try:  # the memfd: the entry is its whole content (its offset is the writer's, at the end)
                data = os.pread(fd, os.fstat(fd).st_size, 0)
            finally:
                os.close(fd)
        return decode_entry(data)


@pytest.fixture
def journal(tmp_path: Path) -> Iterator[Journal]:
    j = Journal(str(tmp_path / "journal.sock"))
    yield j
    j.sock.close()


@pytest.fixture
def logger(journal: Journal) -> Iterator[logs.EventLogger]:
    handler = JournalHandler(journal.path)
    root = logging.getLogger("pleaco")
    saved = root.handlers[:], root.level
    root.handlers[:] = [handler]
    root.setLevel(logging.DEBUG)
    yield logs.get("pleaco.test.journal")
    root.handlers[:], level = saved
    root.setLevel(level)
    handler.close()


def test_an_event_becomes_an_entry_with_every_field(journal: Journal, logger: logs.EventLogger) -> None:
    logger.warning("replica.crashed", app="web", replica=2, build="b-123")
    got = journal.entry()
    assert got["PRIORITY"] == "4" and got["SYSLOG_IDENTIFIER"] == "pleaco"
    assert got["PLEACO_EVENT"] == "replica.crashed"
    assert got["PLEACO_APP"] == "web" and got["PLEACO_REPLICA"] == "2" and got["PLEACO_BUILD"] == "b-123"
    assert got["PLEACO_LOGGER"] == "pleaco.test.journal"
    assert got["MESSAGE"].startswith("event=replica.crashed ")
    assert "app=web" in got["MESSAGE"] and "ts=" not in got["MESSAGE"]
    assert "PLEACO_TS" not in got and "PLEACO_LEVEL" not in got  # the journal's own time and PRIORITY
    assert got["CODE_FUNC"] == "test_an_event_becomes_an_entry_with_every_field"


def test_an_error_carries_its_whole_traceback_as_a_multi_line_field(
        journal: Journal, logger: logs.EventLogger) -> None:
    try:
        raise ValueError("bad\nspec")
    except ValueError:
        logger.error("loop.step_failed", exc_info=True, loop="apps")
    got = journal.entry()
    assert got["PRIORITY"] == "3"
    assert got["PLEACO_TRACEBACK"].startswith("Traceback (most recent call last):\n")
    assert got["PLEACO_TRACEBACK"].endswith("ValueError: bad\nspec")
    assert got["PLEACO_ERROR"] == "spec"
    assert "traceback" not in got["MESSAGE"] and "\n" not in got["MESSAGE"]


def test_an_entry_bigger_than_a_datagram_goes_through_a_sealed_memfd(
        journal: Journal, logger: logs.EventLogger) -> None:
    big = "x" * (4 << 20)  # 4 MiB: above any datagram the socket's send buffer takes
    logger.info("build.output", build="b-1", output=big)
    got = journal.entry()
    assert got["PLEACO_OUTPUT"] == big and got["PLEACO_BUILD"] == "b-1"


def test_when_the_journal_is_gone_the_line_goes_to_stderr(
        tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    handler = JournalHandler(str(tmp_path / "no-journal.sock"))
    log = logging.getLogger("pleaco.test.nojournal")
    log.addHandler(handler)
    log.propagate = False
    try:
        logs.EventLogger("pleaco.test.nojournal").warning("engine.down", docker="unix:///x")
    finally:
        log.removeHandler(handler)
        log.propagate = True
        handler.close()
    err = capsys.readouterr().err
    assert "event=engine.down" in err and "docker=unix:///x" in err and "journal_error=" in err


def test_the_journal_is_used_only_when_stderr_is_its_stream(tmp_path: Path) -> None:
    sock_path = tmp_path / "journal.sock"
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as s, open(tmp_path / "stream", "w") as stream:
        s.bind(str(sock_path))
        st = os.fstat(stream.fileno())
        env = {"JOURNAL_STREAM": f"{st.st_dev}:{st.st_ino}"}
        assert journal_stream_is_stderr(env, stream.fileno())
        assert not journal_stream_is_stderr(env, 2)  # this process's stderr is not that file
        assert not journal_stream_is_stderr({"JOURNAL_STREAM": "x:y"}, stream.fileno())
        assert not journal_stream_is_stderr({"INVOCATION_ID": "abc"}, stream.fileno())
        assert handler_if_journal(env, str(sock_path)) is None  # stderr is not the stream
        own = os.fstat(2)
        env2 = {"JOURNAL_STREAM": f"{own.st_dev}:{own.st_ino}"}
        handler = handler_if_journal(env2, str(sock_path))
        assert isinstance(handler, JournalHandler)
        handler.close()
        assert handler_if_journal(env2, str(tmp_path / "absent.sock")) is None  # no journal socket
