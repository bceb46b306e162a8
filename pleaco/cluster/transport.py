"""How the protocol reaches other nodes: packets (UDP) and request/response streams (TCP).

The membership and dissemination code talks only to ``Transport``. ``NetTransport`` is the
real one: every packet and stream frame is sealed by ``wire.Codec`` (signed, encrypted,
replay-checked), and whatever fails to open or decode is dropped and counted by reason.
``pleaco.cluster.simnet`` provides an in-memory one with virtual time, loss, latency and
partitions, so the same protocol code runs a thousand nodes in one process (the split of
memberlist's transport.go and mock_transport.go).

A TCP connection starts with one channel byte: ``J`` for a join request from a node that
is not a member yet (handled by ``pleaco.cluster.trust``, which has its own encryption);
any other channel is a ``SealedStream`` between members: ``S`` for membership's
request/response exchanges, and the channels other parts register (image transfer,
``pleaco.builds.transfer``). A sealed stream opens with a small sealed header frame, and
nothing larger is read until that frame opened with the key of an admitted member.

What a stranger can make a node do is bounded: frames read before anything is
authenticated are at most ``PREAUTH_FRAME`` bytes (refused on their length prefix, before
the body is read, so the cost of parsing them is bounded too), at most
``gossip.max_pending_streams`` connections are in that state at once (more are closed
unread), and that state must end within ``gossip.stream_timeout``.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import struct
from abc import ABC, abstractmethod
from collections.abc import Awaitable, Callable
from typing import Any

from pleaco import hostport, logs
from pleaco.cluster import messages, wire
from pleaco.cluster.messages import MessageError, Packet
from pleaco.errors import Unavailable
from pleaco.hostport import HostPortError

log = logs.get("pleaco.cluster.transport")

PacketHandler = Callable[[str, Packet, str], None]  # (sender node id, packet, from address)
StreamHandler = Callable[[str, dict[str, Any]], Awaitable[dict[str, Any]]]  # (sender, request) -> response
JoinHandler = Callable[[bytes], Awaitable[bytes]]
DropCounter = Callable[[str], None]

# Largest frame read before its sender has proven anything: a join request (under 2 KiB:
# a key, a name, two addresses, a MAC and a signature) or the header frame a sealed stream
# opens with (a small JSON object). 64 KiB leaves ample room and caps what a stranger makes
# a node buffer, decrypt and parse per connection.
PREAUTH_FRAME = 64 << 10
# Largest frame once the stream's first frame opened with a member's key: push-pull of a
# whole store, image chunks (1 MiB each). Members are admitted nodes of the same cluster.
MAX_FRAME = 64 << 20
CHANNEL_STREAM = b"S"
CHANNEL_JOIN = b"J"
RESERVED_CHANNELS = (CHANNEL_STREAM, CHANNEL_JOIN)
# Packets from a node whose admission (the ``node`` record with its key) has not reached
# this one yet, kept to be opened once it does (NetTransport.admitted). Nodes joining at
# once send to each other before every member knows of every joiner; a packet dropped
# then takes with it the sends of what rides in it (the joiner's first records, news),
# and only a push-pull (30 s) would bring those. Such packets decrypt with the cluster key,
# so only members make them; 128 of at most 1400 bytes bound what they hold to 175 KiB,
# and one still held past the replay window is dropped when opened, as any replay is.
MAX_HELD_PACKETS = 128


class TransportError(Unavailable, ConnectionError, code="peer_unreachable"):
    """A stream exchange failed: unreachable, timed out, or an answer that does not open."""


class FrameTooLarge(TransportError):
    """A frame's length prefix is over the limit of where it arrives: refused unread."""


async def read_frame(reader: asyncio.StreamReader, max_size: int = MAX_FRAME) -> bytes:
    (size,) = struct.unpack(">I", await reader.readexactly(4))
    if size > max_size:
        raise FrameTooLarge(f"frame of {size} bytes exceeds {max_size}")
    return await reader.readexactly(size)


def frame(data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + data


def check_channel(channel: bytes) -> None:
    """A channel other parts may register: one byte, not one the transport itself serves."""
    if len(channel) != 1 or channel in RESERVED_CHANNELS:
        raise ValueError(f"channel {channel!r}: expected one byte other than S and J")


def seal_packet(codec: wire.Codec, packet: Packet) -> bytes:
    """A packet as it goes on the wire; ValueError when it exceeds the codec's size."""
    return codec.seal(messages.encode(packet))


def open_packet(codec: wire.Codec, data: bytes) -> tuple[str, Packet]:
    """(sender, packet) of bytes off the wire; raises wire.Drop or MessageError."""
    opened = codec.open(data)
    return opened.sender, messages.decode(opened.payload)


def json_object(payload: bytes) -> dict[str, Any]:
    """A stream message: a JSON object, or MessageError."""
    message = messages.loads(payload)
    if not isinstance(message, dict):
        raise MessageError("expected a JSON object")
    return message


class SealedStream:
    """A TCP connection between two members after its channel byte: every frame sealed by
    the stream codec, and every frame received from the node that sent the first one."""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter, codec: wire.Codec) -> None:
        self.reader = reader
        self.writer = writer
        self.codec = codec
        self.sender = ""  # the member at the other end, once a frame from it opened

    async def send(self, payload: bytes) -> None:
        self.writer.write(frame(self.codec.seal(payload)))
        await self.writer.drain()

    async def send_message(self, message: dict[str, Any]) -> None:
        await self.send(messages.dumps(message))

    async def receive(self, limit: int = MAX_FRAME) -> bytes:
        """The next frame's payload. Raises FrameTooLarge, wire.Drop (it does not open, or
        comes from another node than the first frame), asyncio.IncompleteReadError."""
        opened = self.codec.open(await read_frame(self.reader, limit))
        if self.sender and opened.sender != self.sender:
            raise wire.Drop("bad_signature", f"a frame from {opened.sender} in a stream from {self.sender}")
        self.sender = opened.sender
        return opened.payload

    async def receive_message(self, limit: int = MAX_FRAME) -> dict[str, Any]:
        """The next frame as a JSON object; MessageError for anything else."""
        return json_object(await self.receive(limit))

    async def close(self) -> None:
        self.writer.close()
        with contextlib.suppress(Exception):
            await self.writer.wait_closed()


# Serves one member channel: the stream (its sender known) and its opening header.
ChannelHandler = Callable[[SealedStream, dict[str, Any]], Awaitable[None]]


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
        max_pending: int = 32,
    ) -> None:
        self.stream_timeout = stream_timeout
        self.max_pending = max_pending
        self._pending = 0  # connections that have not authenticated yet
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
        self.channels: dict[bytes, ChannelHandler] = {CHANNEL_STREAM: self._serve_request}
        # A flood of refused streams is one warning line per burst, with its count.
        self._refused = logs.Burst(log, "gossip.stream_refused")
        self.bytes_sent = 0
        self.bytes_received = 0
        # Packets from nodes whose admission has not arrived yet (see MAX_HELD_PACKETS).
        self._held: collections.deque[tuple[str, bytes, tuple[str, int]]] = collections.deque(
            maxlen=MAX_HELD_PACKETS)

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
        try:
            dest = hostport.split(addr)
        except HostPortError:
            log.debug("gossip.send_failed", to=addr, error="not HOST:PORT")
            return 0
        try:
            data = seal_packet(self.packets, packet)
        except ValueError:
            log.warning("gossip.packet_too_large", type=packet.type, updates=len(packet.updates),
                        records=len(packet.records))
            return 0
        try:
            self._udp.sendto(data, dest)
        except OSError as exc:
            log.debug("gossip.send_failed", to=addr, error=str(exc))
            return 0
        self.bytes_sent += len(data)
        return len(data)

    def _received(self, data: bytes, source: tuple[str, int]) -> None:
        self.bytes_received += len(data)
        self._open(data, source)

    def admitted(self, node_id: str) -> None:
        """``node_id``'s key is known now: open the packets it sent before (held)."""
        mine = [held for held in self._held if held[0] == node_id]
        if not mine:
            return
        self._held = collections.deque((h for h in self._held if h[0] != node_id), maxlen=MAX_HELD_PACKETS)
        log.debug("gossip.held_packets_opened", member=node_id, packets=len(mine))
        for _, data, source in mine:
            self._open(data, source)

    def _open(self, data: bytes, source: tuple[str, int]) -> None:
        try:
            sender, packet = open_packet(self.packets, data)
        except wire.Drop as drop:
            self.count_drop(drop.reason)
            if drop.reason == "unknown_sender":
                self._held.append((drop.sender, data, source))  # the oldest goes when full
            return
        except MessageError as exc:
            self.count_drop("malformed")
            log.debug("gossip.malformed", error=str(exc))
            return
        assert self._on_packet is not None
        self._on_packet(sender, packet, f"{source[0]}:{source[1]}")

    # -- streams -------------------------------------------------------------------------

    def register(self, channel: bytes, handler: ChannelHandler) -> None:
        check_channel(channel)
        self.channels[channel] = handler

    async def open_stream(self, addr: str, channel: bytes, header: dict[str, Any], timeout: float) -> SealedStream:
        """Connect to the member at ``addr`` on ``channel`` and send the opening header."""
        try:
            host, port = hostport.split(addr)
            async with asyncio.timeout(timeout):
                reader, writer = await asyncio.open_connection(host, port)
                stream = SealedStream(reader, writer, self.streams)
                writer.write(channel)
                await stream.send_message(header)
        except (OSError, TimeoutError, HostPortError) as exc:
            raise TransportError(f"stream to {addr}: {exc.__class__.__name__}: {exc}") from None
        return stream

    async def request(self, addr: str, message: dict[str, Any], timeout: float) -> tuple[str, dict[str, Any]]:
        try:
            async with asyncio.timeout(timeout):
                stream = await self.open_stream(addr, CHANNEL_STREAM, {}, timeout)
                try:
                    await stream.send_message(message)
                    answer = await stream.receive_message()
                finally:
                    await stream.close()
        except (OSError, TimeoutError, asyncio.IncompleteReadError) as exc:
            raise TransportError(f"stream to {addr}: {exc.__class__.__name__}: {exc}") from None
        except wire.Drop as drop:
            self.count_drop(drop.reason)
            raise TransportError(f"answer from {addr} dropped: {drop.reason}") from None
        except MessageError as exc:
            self.count_drop("malformed")
            raise TransportError(f"answer from {addr}: {exc}") from None
        return stream.sender, answer

    async def _serve_request(self, stream: SealedStream, header: dict[str, Any]) -> None:
        """Membership's channel: one request, one answer."""
        async with asyncio.timeout(self.stream_timeout * 2):
            request = await stream.receive_message()
            assert self._on_stream is not None
            await stream.send_message(await self._on_stream(stream.sender, request))

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        if self._pending >= self.max_pending:
            # Refused before reading a byte: strangers cannot queue unbounded work.
            self.count_drop("busy")
            self._refused.log(reason="busy", pending=self._pending)
            writer.close()
            return
        self._pending += 1
        authenticated = False
        channel = b""
        try:
            # Everything before the peer is known, within one deadline.
            async with asyncio.timeout(self.stream_timeout):
                channel = await reader.readexactly(1)
                if channel == CHANNEL_JOIN and self.on_join is not None:
                    raw = await read_frame(reader, PREAUTH_FRAME)
                    writer.write(frame(await self.on_join(raw)))
                    await writer.drain()
                    return
                handler = self.channels.get(channel)
                if handler is None:
                    raise wire.Drop("malformed", f"unknown channel {channel!r}")
                stream = SealedStream(reader, writer, self.streams)
                header = await stream.receive_message(PREAUTH_FRAME)
            self._pending -= 1
            authenticated = True
            await handler(stream, header)
        except asyncio.IncompleteReadError:
            if not authenticated:
                self.count_drop("too_short")  # a frame cut short (or a bare connect)
        except FrameTooLarge as exc:
            self.count_drop("too_large")
            self._refused.log(reason="too_large", channel=channel.hex(), error=str(exc))
        except wire.Drop as drop:
            self.count_drop(drop.reason)
            self._refused.log(reason=drop.reason, channel=channel.hex(), error=str(drop))
        except MessageError as exc:
            self.count_drop("malformed")
            self._refused.log(reason="malformed", channel=channel.hex(), error=str(exc))
        except (OSError, TimeoutError, TransportError):
            pass
        except Exception as exc:  # a bug must not take the listener down
            log.error("gossip.stream_failed", exc_info=True, error=str(exc))
        finally:
            if not authenticated:
                self._pending -= 1
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
