"""How the protocol reaches other nodes: packets (UDP) and request/response streams (TCP).

The membership and dissemination code talks only to ``Transport``. ``NetTransport`` is the
real one: every packet and stream frame is sealed by ``wire.Codec`` (signed, encrypted,
replay-checked), and whatever fails to open or decode is dropped and counted by reason.
``pleaco.cluster.simnet`` provides an in-memory one with virtual time, loss, latency and
partitions, so the same protocol code runs a thousand nodes in one process (the split of
memberlist's transport.go and mock_transport.go).

A TCP connection starts with one channel byte: ``S`` for a sealed request/response
exchange between members, ``J`` for a join request from a node that is not a member yet
(handled by ``pleaco.cluster.trust``, which has its own encryption).
"""

from __future__ import annotations

import asyncio
import contextlib
import struct
from abc import ABC, abstractmethod
from collections.abc import Awaitable, Callable
from typing import Any

from pleaco import logs
from pleaco.cluster import messages, wire
from pleaco.cluster.messages import MessageError, Packet
from pleaco.errors import Unavailable

log = logs.get("pleaco.cluster.transport")

PacketHandler = Callable[[str, Packet, str], None]  # (sender node id, packet, from address)
StreamHandler = Callable[[str, dict[str, Any]], Awaitable[dict[str, Any]]]  # (sender, request) -> response
JoinHandler = Callable[[bytes], Awaitable[bytes]]
DropCounter = Callable[[str], None]

MAX_FRAME = 64 << 20
CHANNEL_STREAM = b"S"
CHANNEL_JOIN = b"J"
CHANNEL_IMAGE = b"I"
# A handler that owns the whole connection after its channel byte (image transfer).
ChannelHandler = Callable[[asyncio.StreamReader, asyncio.StreamWriter], Awaitable[None]]


class TransportError(Unavailable, ConnectionError, code="peer_unreachable"):
    """A stream exchange failed: unreachable, timed out, or an answer that does not open."""


class Transport(ABC):
    addr: str  # where others reach this node, HOST:PORT

    @abstractmethod
    async def start(self, on_packet: PacketHandler, on_stream: StreamHandler) -> None: ...

    @abstractmethod
    def send(self, addr: str, packet: Packet) -> int:
        """Send one packet, best effort; returns the bytes put on the wire (0 if not sent)."""

    @abstractmethod
    async def request(self, addr: str, message: dict[str, Any], timeout: float) -> tuple[str, dict[str, Any]]:
        """One request/response exchange over a stream; returns (responder's node id, answer)."""

    @abstractmethod
    async def close(self) -> None: ...


async def read_frame(reader: asyncio.StreamReader, max_size: int = MAX_FRAME) -> bytes:
    (size,) = struct.unpack(">I", await reader.readexactly(4))
    if size > max_size:
        raise TransportError(f"frame of {size} bytes exceeds {max_size}")
    return await reader.readexactly(size)


def frame(data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + data


class NetTransport(Transport):
    def __init__(
        self,
        packet_codec: wire.Codec,
        stream_codec: wire.Codec,
        listen: tuple[str, int],
        advertise: str,
        count_drop: DropCounter,
        on_join: JoinHandler | None = None,
        stream_timeout: float = 10.0,
    ) -> None:
        self.stream_timeout = stream_timeout
        self.packets = packet_codec
        self.streams = stream_codec
        self.listen = listen
        self.addr = advertise
        self.count_drop = count_drop
        self.on_join = on_join
        self._udp: asyncio.DatagramTransport | None = None
        self._tcp: asyncio.base_events.Server | None = None
        self._on_packet: PacketHandler | None = None
        self._on_stream: StreamHandler | None = None
        self.channels: dict[bytes, ChannelHandler] = {}
        self.bytes_sent = 0
        self.bytes_received = 0

    async def start(self, on_packet: PacketHandler, on_stream: StreamHandler) -> None:
        self._on_packet, self._on_stream = on_packet, on_stream
        loop = asyncio.get_running_loop()
        host, port = self.listen
        self._udp, _ = await loop.create_datagram_endpoint(
            lambda: _UdpProtocol(self), local_addr=(host, port), reuse_port=False
        )
        self._tcp = await asyncio.start_server(self._serve, host, port, reuse_address=True)

    async def close(self) -> None:
        if self._udp is not None:
            self._udp.close()
        if self._tcp is not None:
            self._tcp.close()
            with contextlib.suppress(Exception):
                await asyncio.wait_for(self._tcp.wait_closed(), 2)

    # -- packets -------------------------------------------------------------------------

    def send(self, addr: str, packet: Packet) -> int:
        if self._udp is None:
            return 0
        host, _, port = addr.rpartition(":")
        try:
            data = self.packets.seal(messages.encode(packet))
        except ValueError:
            log.warning("gossip.packet_too_large", type=packet.type, updates=len(packet.updates),
                        records=len(packet.records))
            return 0
        try:
            self._udp.sendto(data, (host.strip("[]"), int(port)))
        except OSError as exc:
            log.debug("gossip.send_failed", to=addr, error=str(exc))
            return 0
        self.bytes_sent += len(data)
        return len(data)

    def _received(self, data: bytes, source: tuple[str, int]) -> None:
        self.bytes_received += len(data)
        try:
            opened = self.packets.open(data)
            packet = messages.decode(opened.payload)
        except wire.Drop as drop:
            self.count_drop(drop.reason)
            return
        except MessageError as exc:
            self.count_drop("malformed")
            log.debug("gossip.malformed", error=str(exc))
            return
        assert self._on_packet is not None
        self._on_packet(opened.sender, packet, f"{source[0]}:{source[1]}")

    # -- streams -------------------------------------------------------------------------

    async def request(self, addr: str, message: dict[str, Any], timeout: float) -> tuple[str, dict[str, Any]]:
        host, _, port = addr.rpartition(":")
        try:
            async with asyncio.timeout(timeout):
                reader, writer = await asyncio.open_connection(host.strip("[]"), int(port))
                try:
                    writer.write(CHANNEL_STREAM + frame(self.streams.seal(messages.dumps(message))))
                    await writer.drain()
                    raw = await read_frame(reader)
                finally:
                    writer.close()
                    with contextlib.suppress(Exception):
                        await writer.wait_closed()
        except (OSError, TimeoutError, asyncio.IncompleteReadError) as exc:
            raise TransportError(f"stream to {addr}: {exc.__class__.__name__}: {exc}") from None
        try:
            opened = self.streams.open(raw)
            answer = messages.loads(opened.payload)
        except wire.Drop as drop:
            self.count_drop(drop.reason)
            raise TransportError(f"answer from {addr} dropped: {drop.reason}") from None
        except MessageError as exc:
            self.count_drop("malformed")
            raise TransportError(f"answer from {addr}: {exc}") from None
        if not isinstance(answer, dict):
            self.count_drop("malformed")
            raise TransportError(f"answer from {addr} is not an object")
        return opened.sender, answer

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            channel = await asyncio.wait_for(reader.readexactly(1), self.stream_timeout)
            if channel in self.channels:
                await self.channels[channel](reader, writer)
                return
            async with asyncio.timeout(self.stream_timeout * 2):
                raw = await read_frame(reader)
                if channel == CHANNEL_JOIN and self.on_join is not None:
                    writer.write(frame(await self.on_join(raw)))
                    await writer.drain()
                    return
                if channel != CHANNEL_STREAM:
                    self.count_drop("malformed")
                    return
                try:
                    opened = self.streams.open(raw)
                    request = messages.loads(opened.payload)
                    if not isinstance(request, dict):
                        raise MessageError("request is not an object")
                except wire.Drop as drop:
                    self.count_drop(drop.reason)
                    return
                except MessageError:
                    self.count_drop("malformed")
                    return
                assert self._on_stream is not None
                answer = await self._on_stream(opened.sender, request)
                writer.write(frame(self.streams.seal(messages.dumps(answer))))
                await writer.drain()
        except (OSError, TimeoutError, asyncio.IncompleteReadError, TransportError):
            pass
        except MessageError as exc:
            self.count_drop("malformed")
            log.debug("gossip.stream_rejected", error=str(exc))
        except Exception as exc:  # a bug must not take the listener down
            log.error("gossip.stream_failed", exc_info=True, error=str(exc))
        finally:
            writer.close()


class _UdpProtocol(asyncio.DatagramProtocol):
    def __init__(self, transport: NetTransport) -> None:
        self.owner = transport

    def datagram_received(self, data: bytes, addr: tuple[str | Any, int]) -> None:
        try:
            self.owner._received(data, (str(addr[0]), int(addr[1])))
        except Exception as exc:  # never let one packet stop the endpoint
            log.error("gossip.receive_failed", exc_info=True, error=str(exc))

    def error_received(self, exc: Exception) -> None:
        log.debug("gossip.udp_error", error=str(exc))
