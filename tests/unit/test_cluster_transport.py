"""The gossip port's TCP side on real sockets (127.0.0.1): sealed member streams and
channels, and what it refuses before a peer has proven who it is."""

from __future__ import annotations

import asyncio
import struct
from collections.abc import Coroutine
from typing import Any

import pytest

from pleaco import logs
from pleaco.cluster import wire
from pleaco.cluster.messages import Packet
from pleaco.cluster.transport import (
    CHANNEL_STREAM,
    MAX_HELD_PACKETS,
    PREAUTH_FRAME,
    NetTransport,
    SealedStream,
    TransportError,
    seal_packet,
)
from pleaco.identity import Identity


class Ends:
    def __init__(self, max_pending: int = 32) -> None:
        self.a, self.b, self.stranger = Identity.generate(), Identity.generate(), Identity.generate()
        self.keys = {self.a.node_id: self.a.public_key, self.b.node_id: self.b.public_key}
        self.drops: list[str] = []
        self.max_pending = max_pending
        self.transports: list[NetTransport] = []

    def transport(self, ident: Identity, count: bool = True) -> NetTransport:
        packets = wire.Codec(ident, "c", b"k" * 32, self.keys.get)
        streams = wire.Codec(ident, "c", b"k" * 32, self.keys.get, max_size=64 << 20, purpose=b"stream v1")
        t = NetTransport(packets, streams, ("127.0.0.1", 0), "", self.drops.append if count else lambda r: None,
                         stream_timeout=5, max_pending=self.max_pending)
        self.transports.append(t)
        return t

    async def server(self) -> NetTransport:
        t = self.transport(self.a)

        def on_packet(sender: str, packet: Packet, addr: str) -> None:
            pass

        async def on_stream(sender: str, request: dict[str, Any]) -> dict[str, Any]:
            return {"echo": request, "from": sender}

        async def on_join(raw: bytes) -> bytes:
            return b"E" + str(len(raw)).encode()

        t.on_join = on_join
        await t.start(on_packet, on_stream)
        assert t._tcp is not None
        port = t._tcp.sockets[0].getsockname()[1]
        t.addr = f"127.0.0.1:{port}"
        return t

    async def close(self) -> None:
        for t in self.transports:
            await t.close()

POLL = 0.01  # seconds between looks at a condition polled with a bound


def run(coro: Coroutine[Any, Any, Any]) -> Any:
    return asyncio.run(coro)


async def closed(reader: asyncio.StreamReader) -> bool:
    """The server closed the connection (without answering anything)."""
    return await asyncio.wait_for(reader.read(), 10) == b""


def test_members_exchange_requests_and_channel_streams() -> None:
    async def scenario() -> None:
        ends = Ends()
        server = await ends.server()
        seen: list[tuple[str, dict[str, Any], bytes]] = []

        async def serve(stream: SealedStream, header: dict[str, Any]) -> None:
            seen.append((stream.sender, header, await stream.receive()))
            await stream.send(b"x" * (1 << 20))  # large frames are fine once the sender is known

        server.register(b"X", serve)
        client = ends.transport(ends.b)
        sender, answer = await client.request(server.addr, {"t": "pp"}, 5)
        assert sender == ends.a.node_id and answer == {"echo": {"t": "pp"}, "from": ends.b.node_id}
        stream = await client.open_stream(server.addr, b"X", {"hello": 1}, 5)
        await stream.send(b"body")
        assert await stream.receive() == b"x" * (1 << 20)
        await stream.close()
        assert seen == [(ends.b.node_id, {"hello": 1}, b"body")]
        assert ends.drops == []
        await ends.close()

    run(scenario())


def test_channels_s_and_j_are_reserved() -> None:
    t = Ends().transport(Identity.generate())
    for channel in (b"S", b"J", b"", b"XY"):
        with pytest.raises(ValueError):
            t.register(channel, lambda stream, header: asyncio.sleep(0))


def test_a_stranger_is_refused_at_the_header() -> None:
    async def scenario() -> None:
        ends = Ends()
        server = await ends.server()
        stranger = ends.transport(ends.stranger, count=False)
        with pytest.raises(TransportError):
            await stranger.request(server.addr, {"t": "pp"}, 5)
        assert ends.drops == ["unknown_sender"]
        await ends.close()

    run(scenario())


def test_oversized_frames_before_authentication_are_refused_unread() -> None:
    async def scenario() -> None:
        ends = Ends()
        server = await ends.server()
        host, _, port = server.addr.rpartition(":")
        reader, writer = await asyncio.open_connection(host, int(port))
        writer.write(b"J" + struct.pack(">I", PREAUTH_FRAME) + bytes(PREAUTH_FRAME))  # the largest allowed
        assert await asyncio.wait_for(reader.read(), 10) == struct.pack(">I", 6) + b"E65536"
        writer.close()
        for channel in (b"J", CHANNEL_STREAM):
            reader, writer = await asyncio.open_connection(host, int(port))
            # Only the length prefix: a server that waits for the body would not close.
            writer.write(channel + struct.pack(">I", PREAUTH_FRAME + 1))
            await writer.drain()
            assert await closed(reader)
            writer.close()
        assert ends.drops == ["too_large", "too_large"]
        await ends.close()

    run(scenario())


def test_connections_over_the_pending_cap_are_closed_unread() -> None:
    async def scenario() -> None:
        ends = Ends(max_pending=2)
        server = await ends.server()
        host, _, port = server.addr.rpartition(":")
        idle = [await asyncio.open_connection(host, int(port)) for _ in range(2)]
        for _ in range(100):
            if server._pending == 2:
                break
            await asyncio.sleep(POLL)
        reader, writer = await asyncio.open_connection(host, int(port))
        assert await closed(reader)
        assert ends.drops == ["busy"]
        for _, w in [*idle, (reader, writer)]:
            w.close()
        # Once they are gone, members get through again.
        for _ in range(100):
            if server._pending == 0:
                break
            await asyncio.sleep(POLL)
        client = ends.transport(ends.b)
        assert (await client.request(server.addr, {"t": "pp"}, 5))[0] == ends.a.node_id
        await ends.close()

    run(scenario())


class Recorder(logs.EventLogger):
    def __init__(self) -> None:
        super().__init__("test")
        self.lines: list[tuple[str, dict[str, Any]]] = []

    def warning(self, event: str, **fields: Any) -> None:
        self.lines.append((event, fields))


def test_a_burst_of_warnings_is_one_line_and_then_one_count() -> None:
    async def scenario() -> None:
        rec = Recorder()
        burst = logs.Burst(rec, "x.refused", window=0.2)
        for i in range(50):
            burst.log(n=i)
        assert rec.lines == [("x.refused", {"n": 0})]
        for _ in range(100):
            if len(rec.lines) == 2:
                break
            await asyncio.sleep(POLL)
        assert rec.lines[1] == ("x.refused", {"repeated": 49, "window_s": 0.2, "n": 49})

    run(scenario())


def test_packets_from_a_node_not_admitted_yet_are_opened_once_it_is() -> None:
    """Nodes joining at once send to members that do not know them yet: those packets are
    held (counted as dropped), then opened once the sender's admission arrives, so what
    rode in them is not lost; the oldest go first beyond the bound."""
    async def scenario() -> None:
        ends = Ends()
        joiner = Identity.generate()
        receiver = ends.transport(ends.a)
        got: list[tuple[str, Packet]] = []

        def on_packet(sender: str, packet: Packet, addr: str) -> None:
            got.append((sender, packet))

        async def on_stream(sender: str, request: dict[str, Any]) -> dict[str, Any]:
            return {}

        await receiver.start(on_packet, on_stream)
        sealer = wire.Codec(joiner, "c", b"k" * 32, ends.keys.get)
        stranger = wire.Codec(ends.stranger, "c", b"k" * 32, ends.keys.get)
        receiver._received(seal_packet(sealer, Packet("gossip", seq=1)), ("127.0.0.1", 9))
        for seq in range(MAX_HELD_PACKETS):  # a node never admitted fills the bound
            receiver._received(seal_packet(stranger, Packet("gossip", seq=seq)), ("127.0.0.1", 9))
        receiver._received(seal_packet(sealer, Packet("gossip", seq=2)), ("127.0.0.1", 9))
        assert got == [] and ends.drops == ["unknown_sender"] * (MAX_HELD_PACKETS + 2)
        receiver.admitted(joiner.node_id)  # not yet: still held
        ends.keys[joiner.node_id] = joiner.public_key
        receiver.admitted(joiner.node_id)
        # The first went when the bound was reached; the second is opened, once.
        assert [(s, p.seq) for s, p in got] == [(joiner.node_id, 2)]
        receiver.admitted(joiner.node_id)
        assert len(got) == 1
        await ends.close()

    run(scenario())
