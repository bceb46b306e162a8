"""Service names: every app resolves as ``NAME.SUFFIX`` from every container of the cluster.

The agent runs one ``NameServer`` per node on its ``pleaco`` bridge gateway, port 53, and
containers get it as their resolver (HostConfig Dns). On a user-defined Docker network the
engine's embedded DNS (127.0.0.11) answers container names and forwards everything else
here, from the container's own address.

Answers:
- A ``NAME.SUFFIX`` (any case, with or without the trailing dot): the cluster addresses of
  the app's serving replicas on every node, shuffled (clients take the first), as many as
  fit in a UDP answer (512 bytes, or up to 1232 with EDNS0: the DNS flag day size that
  crosses any path unfragmented) with the truncation bit set beyond, all of them over TCP;
- any other type for a known app: an empty answer; an unknown app: NXDOMAIN;
- A ``SERVICE.STACK.SUFFIX``: the same for app ``STACK-SERVICE`` when it is service
  SERVICE of stack STACK (pleaco.stacks.service; its replicas search ``STACK.SUFFIX``, so
  they reach each other by bare service name, as in Compose); any other such name is
  forwarded like the next;
- anything else (deeper names under the suffix as well, such as the proxy's host names
  ``APP.pleaco.internal``): forwarded to the host's resolvers (the nameservers of /etc/resolv.conf,
  read again when the file changes) and their answer relayed, or SERVFAIL.

Only queries from the node's container subnet are answered (the socket is bound to the
gateway, but the source is checked as well): the server is never a resolver, still less an
amplifier, for anyone else. Responses, non-QUERY opcodes and malformed messages are never
forwarded.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import ipaddress
import os
import random
import struct
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

from pleaco import logs
from pleaco.metrics import Counter
from pleaco.net import dnswire

log = logs.get("pleaco.net.names")

# Containers' resolvers only ever ask port 53: neither resolv.conf nor Docker's Dns take a port.
PORT = 53
# The largest UDP answer we send to a client that offers EDNS0 (DNS flag day 2020: fits
# any path's MTU without fragments).
SAFE_UDP = 1232
TCP_MAX = 65535
# glibc reads at most three nameservers from resolv.conf (MAXNS); so do we.
MAX_NAMESERVERS = 3
# Fresh ports tried when the server is given port 0 and TCP finds the UDP port taken.
BIND_ATTEMPTS = 8
RESOLV_CONF = Path("/etc/resolv.conf")

# app -> the cluster addresses (IPv4) of its serving replicas; None when there is no such app.
Lookup = Callable[[str], "list[str] | None"]
# (stack, service) -> the app that is that stack's service, None when there is none.
StackLookup = Callable[[str, str], "str | None"]
Address = tuple[str, int]


@dataclass
class NameStats:
    answered: int = 0  # under the suffix
    forwarded: int = 0
    malformed: int = 0
    foreign: int = 0  # from outside the clients' networks: dropped
    busy: int = 0  # beyond the forwards in flight: dropped
    upstream_failed: int = 0  # no resolver answered in time: SERVFAIL


class HostResolvers:
    """The nameservers of the host's resolv.conf, read again whenever the file changes
    (its inode, size or modification time), never including ``exclude`` (our own address:
    forwarding to ourselves would loop)."""

    def __init__(self, path: Path = RESOLV_CONF, exclude: Callable[[], str] = lambda: "") -> None:
        self.path = path
        self.exclude = exclude
        self._seen: tuple[int, int, int] | None = None
        self._servers: list[Address] = []

    def current(self) -> list[Address]:
        try:
            st = os.stat(self.path)
        except OSError:
            self._seen, self._servers = None, []
            return []
        key = (st.st_ino, st.st_size, st.st_mtime_ns)
        if key != self._seen:
            self._seen = key
            try:
                self._servers = parse_resolv_conf(self.path.read_text(errors="replace"))
            except OSError:
                self._servers = []
            log.info("names.resolvers", path=str(self.path), servers=" ".join(h for h, _ in self._servers) or "none")
        own = self.exclude()
        return [s for s in self._servers if s[0] != own]


def parse_resolv_conf(text: str) -> list[Address]:
    """The ``nameserver`` addresses of a resolv.conf (nothing else of it: search domains
    and options are the client's business), at most three, as glibc reads them."""
    out: list[Address] = []
    for line in text.splitlines():
        fields = line.split()
        if len(fields) >= 2 and fields[0] == "nameserver":
            try:
                ipaddress.ip_address(fields[1])
            except ValueError:
                continue
            out.append((fields[1], PORT))
    return out[:MAX_NAMESERVERS]


class _Udp(asyncio.DatagramProtocol):
    def __init__(self, server: NameServer) -> None:
        self.server = server
        self.transport: asyncio.DatagramTransport | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]  # a datagram transport, by construction

    def datagram_received(self, data: bytes, addr: tuple[str | int, int]) -> None:
        if self.transport is not None:
            self.server.on_datagram(self.transport, data, addr)


class _UpstreamReply(asyncio.DatagramProtocol):
    """Waits for the one answer to a forwarded query: from the upstream (the socket is
    connected to it), with our id and our question (a spoofed or stale packet is ignored)."""

    def __init__(self, query_id: int, question: bytes) -> None:
        self.query_id = query_id
        self.question = question.lower()
        self.reply: asyncio.Future[bytes] = asyncio.get_running_loop().create_future()

    def datagram_received(self, data: bytes, addr: tuple[str | int, int]) -> None:
        if (len(data) >= dnswire.HEADER and struct.unpack(">H", data[:2])[0] == self.query_id and data[2] & 0x80
                and data[dnswire.HEADER:dnswire.HEADER + len(self.question)].lower() == self.question
                and not self.reply.done()):
            self.reply.set_result(data)

    def error_received(self, exc: Exception) -> None:
        if not self.reply.done():
            self.reply.set_exception(exc)


class NameServer:
    """The service-name DNS server of one node (UDP and TCP on ``listen_host:port``)."""

    def __init__(self, listen_host: str, port: int, lookup: Lookup, suffix: str = "internal",
                 upstreams: Sequence[Address] | None = None, *, clients: Sequence[str],
                 ttl: int = 1, forward_timeout: float = 3.0, max_forwards: int = 256, tcp_clients: int = 64,
                 resolv_conf: Path = RESOLV_CONF, metric: Counter | None = None,
                 stack_app: StackLookup | None = None) -> None:
        """``clients``: the networks whose queries are answered (the node's container
        subnet). ``upstreams``: where other names go; None: the host's resolv.conf."""
        self.listen_host = listen_host
        self.port = port
        self.lookup = lookup
        self.stack_app = stack_app
        self.suffix = tuple(suffix.lower().strip(".").split("."))
        self.clients = [ipaddress.ip_network(c, strict=False) for c in clients]
        self._fixed = list(upstreams) if upstreams is not None else None
        self._host = HostResolvers(resolv_conf, exclude=lambda: self.listen_host)
        self.ttl = ttl
        self.forward_timeout = forward_timeout
        self.max_forwards = max_forwards
        self.tcp_clients = tcp_clients
        self.stats = NameStats()
        # pleaco_names_queries_total{result} when the agent hands one in (results: NameStats' fields).
        self.metric = metric
        self._udp: asyncio.DatagramTransport | None = None
        self._tcp: asyncio.Server | None = None
        self._tasks: set[asyncio.Task[None]] = set()
        self._in_flight = 0
        self._tcp_open = 0

    # -- life --------------------------------------------------------------------------

    async def start(self) -> None:
        """Bind UDP and TCP on the listen address (OSError when it is not ours yet or taken)."""
        self._udp, self._tcp, self.port = await self._bind(self.listen_host, self.port)
        self.upstreams()  # read resolv.conf now, so a broken one shows in the log at start
        log.info("names.listening", address=f"{self.listen_host}:{self.port}", suffix=".".join(self.suffix),
                 clients=" ".join(str(c) for c in self.clients))

    async def _bind(self, host: str, port: int) -> tuple[asyncio.DatagramTransport, asyncio.Server, int]:
        loop = asyncio.get_running_loop()
        attempt = 1
        while True:
            udp, _ = await loop.create_datagram_endpoint(lambda: _Udp(self), local_addr=(host, port))
            # Port 0 (tests): TCP on the port UDP was given. A free UDP port says nothing
            # of TCP (a connection may hold it as its local port): then another one is
            # tried, a few times. A port asked for is tried once.
            bound = int(udp.get_extra_info("sockname")[1])
            try:
                tcp = await asyncio.start_server(self._serve_tcp, host, bound, reuse_address=True)
            except OSError as exc:
                udp.close()
                if port or exc.errno != errno.EADDRINUSE or attempt >= BIND_ATTEMPTS:
                    raise
                attempt += 1
                continue
            except BaseException:
                udp.close()
                raise
            return udp, tcp, bound

    async def close(self) -> None:
        """Stop listening and cancel the forwards in flight."""
        self._unbind()
        for task in list(self._tasks):
            task.cancel()
        for task in list(self._tasks):
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await task

    def _unbind(self) -> None:
        if self._udp is not None:
            self._udp.close()
            self._udp = None
        if self._tcp is not None:
            self._tcp.close()
            self._tcp = None

    async def move(self, listen_host: str, clients: Sequence[str]) -> None:
        """Listen on another address, same port, for other clients (the node's subnet
        changed). The new sockets are bound before the old ones close: on a failure the
        server stays where it was (and raises), and the port is never let go meanwhile."""
        if listen_host != self.listen_host or self._udp is None:
            udp, tcp, port = await self._bind(listen_host, self.port)
            self._unbind()
            self._udp, self._tcp, self.port = udp, tcp, port
            self.listen_host = listen_host
        self.clients = [ipaddress.ip_network(c, strict=False) for c in clients]
        log.info("names.listening", address=f"{self.listen_host}:{self.port}", suffix=".".join(self.suffix),
                 clients=" ".join(str(c) for c in self.clients))

    def _count(self, result: str) -> None:
        setattr(self.stats, result, getattr(self.stats, result) + 1)
        if self.metric is not None:
            self.metric.inc(result=result)

    def upstreams(self) -> list[Address]:
        return list(self._fixed) if self._fixed is not None else self._host.current()

    # -- answers -----------------------------------------------------------------------

    def allowed(self, host: str) -> bool:
        try:
            ip = ipaddress.ip_address(host)
        except ValueError:
            return False
        return any(ip in net for net in self.clients)

    def answer(self, data: bytes, limit: int | None) -> bytes | None:
        """The answer to a message (b"": none at all), or None when it is for the host's
        resolvers. ``limit``: the most bytes a UDP answer may have without EDNS0, None over TCP."""
        try:
            query = dnswire.parse_query(data)
        except dnswire.Malformed:
            self._count("malformed")
            return dnswire.error_reply(data, dnswire.RCODE_FORMERR)
        if query.is_response:
            return b""  # never answer an answer: two servers could bounce it forever
        if query.opcode != 0:
            return dnswire.response(query, dnswire.RCODE_NOTIMP, authoritative=False)
        labels, n = query.labels, len(self.suffix)
        app = labels[0] if len(labels) == n + 1 else ""
        if len(labels) == n + 2 and labels[-n:] == self.suffix and self.stack_app is not None:
            app = self.stack_app(labels[1], labels[0]) or ""
        if labels[-n:] != self.suffix or (len(labels) > n and not app):
            # Not a service name. Deeper names under the suffix too: the proxy's host names
            # (cluster_domain, pleaco.internal by default) live there, and whatever
            # resolves them for the operator (a DNS zone, the hosts file) stays in charge.
            return None
        self._count("answered")
        # An asker that speaks EDNS0 hears that we do too (RFC 6891 6.1.1), in every answer.
        opt = [dnswire.opt_record(SAFE_UDP)] if query.edns_size is not None else []
        if query.qclass != dnswire.QCLASS_IN:
            return dnswire.response(query, dnswire.RCODE_REFUSED, additional=opt)
        if len(labels) == n:
            return dnswire.response(query, 0, additional=opt)  # the zone itself: exists, holds no records
        try:
            ips = self.lookup(app)
        except Exception:
            log.error("names.lookup_failed", exc_info=True, app=app)
            return dnswire.response(query, dnswire.RCODE_SERVFAIL, additional=opt)
        if ips is None:
            return dnswire.response(query, dnswire.RCODE_NXDOMAIN, additional=opt)
        if query.qtype != dnswire.QTYPE_A:
            return dnswire.response(query, 0, additional=opt)
        records = []
        for ip in random.sample(ips, len(ips)):
            with contextlib.suppress(ValueError):
                records.append(dnswire.record(dnswire.QTYPE_A, self.ttl, ipaddress.IPv4Address(ip).packed))
        size = TCP_MAX
        if limit is not None:
            size = max(limit, min(query.edns_size, SAFE_UDP)) if query.edns_size is not None else limit
        room = size - dnswire.HEADER - len(query.question) - sum(len(a) for a in opt)
        fit = max(0, room // 16)  # an A record: pointer 2, type/class/ttl/len 10, address 4
        return dnswire.response(query, 0, records[:fit], truncated=fit < len(records), additional=opt)

    # -- UDP ---------------------------------------------------------------------------

    def on_datagram(self, transport: asyncio.DatagramTransport, data: bytes, addr: tuple[str | int, int]) -> None:
        if not self.allowed(str(addr[0])):
            self._count("foreign")
            return
        reply = self.answer(data, dnswire.CLASSIC_UDP)
        if reply is None:
            self._spawn_forward(data, lambda out: transport.sendto(out, addr), tcp=False)
        elif reply:
            transport.sendto(reply, addr)

    # -- TCP ---------------------------------------------------------------------------

    async def _serve_tcp(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        peer = writer.get_extra_info("peername")
        if not peer or not self.allowed(str(peer[0])):
            self._count("foreign")
            writer.close()
            return
        if self._tcp_open >= self.tcp_clients:
            self._count("busy")
            writer.close()
            return
        self._tcp_open += 1
        try:
            while True:
                # A client that says nothing for as long as a forward may take is gone.
                head = await asyncio.wait_for(reader.readexactly(2), self.forward_timeout)
                data = await asyncio.wait_for(reader.readexactly(struct.unpack(">H", head)[0]), self.forward_timeout)
                reply = self.answer(data, None)
                if reply is None:
                    if self._in_flight >= self.max_forwards:
                        self._count("busy")
                        return
                    reply = await self._forward(data, tcp=True)
                if not reply:
                    continue
                writer.write(struct.pack(">H", len(reply)) + reply)
                await writer.drain()
        except (TimeoutError, asyncio.IncompleteReadError, ConnectionError):
            return
        finally:
            self._tcp_open -= 1
            writer.close()

    # -- forwarding --------------------------------------------------------------------

    def _spawn_forward(self, data: bytes, send: Callable[[bytes], None], tcp: bool) -> None:
        if self._in_flight >= self.max_forwards:
            self._count("busy")
            return  # dropped: the client asks again, by which time some have finished

        async def run() -> None:
            reply = await self._forward(data, tcp)
            if reply:
                send(reply)

        task = asyncio.ensure_future(run())
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _forward(self, data: bytes, tcp: bool) -> bytes:
        """The host resolvers' answer to a query (with the asker's id), or SERVFAIL."""
        self._in_flight += 1
        try:
            self._count("forwarded")
            query = dnswire.parse_query(data)
            servers = self.upstreams()
            loop = asyncio.get_running_loop()
            deadline = loop.time() + self.forward_timeout
            for host, port in servers:
                share = min(self.forward_timeout / len(servers), deadline - loop.time())
                # Our own random id toward the upstream: the asker's id is its choice, and a
                # guessable one would make spoofed answers easier to slip in.
                qid = random.randrange(0x10000)
                message = struct.pack(">H", qid) + data[2:]
                try:
                    reply = await asyncio.wait_for(
                        (self._ask_tcp if tcp else self._ask_udp)(host, port, message, qid, query.question), share)
                except (TimeoutError, OSError, asyncio.IncompleteReadError, dnswire.Malformed) as exc:
                    log.debug("names.upstream_failed", upstream=f"{host}:{port}", error=repr(exc))
                    continue
                return data[:2] + reply[2:]
            self._count("upstream_failed")
            return dnswire.response(query, dnswire.RCODE_SERVFAIL, authoritative=False)
        finally:
            self._in_flight -= 1

    @staticmethod
    async def _ask_udp(host: str, port: int, message: bytes, qid: int, question: bytes) -> bytes:
        loop = asyncio.get_running_loop()
        transport, proto = await loop.create_datagram_endpoint(
            lambda: _UpstreamReply(qid, question), remote_addr=(host, port))
        try:
            transport.sendto(message)
            return await proto.reply
        finally:
            transport.close()

    @staticmethod
    async def _ask_tcp(host: str, port: int, message: bytes, qid: int, question: bytes) -> bytes:
        reader, writer = await asyncio.open_connection(host, port)
        try:
            writer.write(struct.pack(">H", len(message)) + message)
            await writer.drain()
            size = struct.unpack(">H", await reader.readexactly(2))[0]
            reply = await reader.readexactly(size)
        finally:
            writer.close()
        if len(reply) < dnswire.HEADER or struct.unpack(">H", reply[:2])[0] != qid:
            raise dnswire.Malformed("answer with another id")
        return reply
