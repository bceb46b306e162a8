"""A tiny DNS server on loopback that tells the proxy where each app's replicas are.

Caddy reloads its whole config for any change made through the admin API, and a reload
closes idle keep-alive connections of the old server: a client that sends its next request
at that instant sees the connection close, a failed request. Rollouts would cause that
twice per replica. So upstreams are not in the config: each route looks them up here with
Caddy's ``srv`` dynamic upstreams (``APP.upstreams.pleaco.`` -> SRV records, refreshed every
second), and the config only changes when an app, its host name or its TLS settings do.

Answers:
- SRV ``APP.upstreams.pleaco.``: one record per routable replica (target and port);
- A ``ip-A-B-C-D.pleaco.``: the address the name spells, so SRV targets need no state
  (Go refuses SRV targets that are bare IP addresses);
- anything else under ``pleaco.``: an empty answer (AAAA) or NXDOMAIN.
"""

from __future__ import annotations

import asyncio
import ipaddress
import random
import struct

from pleaco import logs
from pleaco.net import dnswire

log = logs.get("pleaco.ingress.dns")

ZONE = "pleaco"
UPSTREAMS = "upstreams." + ZONE
TTL = 1
# A UDP answer stays within 512 bytes (Caddy 2.6's Go resolver sends no EDNS0 and cannot
# fall back to TCP through a custom resolver): 12 header + question (up to ~80) + 39 bytes
# per SRV record, whose target must not be compressed (RFC 2782; Go rejects it). With more
# replicas than this on one node, each answer is a random choice of them (refreshed each
# second), so all of them get traffic.
MAX_RECORDS = 10

QTYPE_A, QTYPE_SRV = dnswire.QTYPE_A, dnswire.QTYPE_SRV
RCODE_NXDOMAIN, RCODE_FORMERR = dnswire.RCODE_NXDOMAIN, dnswire.RCODE_FORMERR


def srv_name(app: str) -> str:
    return f"{app}.{UPSTREAMS}"


def target_name(ip: str) -> str:
    return "ip-" + ip.replace(".", "-") + "." + ZONE


class UpstreamDNS(asyncio.DatagramProtocol):
    def __init__(self) -> None:
        self.records: dict[str, list[tuple[str, int]]] = {}  # SRV name -> [(ip, port)]
        self.transport: asyncio.DatagramTransport | None = None
        self.queries = 0
        self.address_queries = 0  # for ip-A-B-C-D names: the proxy's hosts file missed them

    def set_upstreams(self, upstreams: dict[str, list[tuple[str, int]]]) -> None:
        """Replace the answers: app -> [(ip, port)]."""
        self.records = {srv_name(app): list(ups) for app, ups in upstreams.items()}

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]  # a datagram transport, by construction

    def datagram_received(self, data: bytes, addr: tuple[str | int, int]) -> None:
        if self.transport is None:
            return
        self.queries += 1
        answer = self.answer(data)
        if answer:
            self.transport.sendto(answer, addr)

    def answer(self, data: bytes) -> bytes:
        try:
            query = dnswire.parse_query(data)
        except dnswire.Malformed:
            return dnswire.error_reply(data, RCODE_FORMERR)
        name, qtype = query.name, query.qtype
        answers: list[bytes] = []
        rcode = 0
        if name in self.records:
            if qtype == QTYPE_SRV:
                ups = self.records[name]
                answers = self._srv(ups if len(ups) <= MAX_RECORDS else random.sample(ups, MAX_RECORDS))
        elif name.startswith("ip-") and name.endswith("." + ZONE):
            self.address_queries += 1
            try:
                ip = ipaddress.IPv4Address(name[3:-len(ZONE) - 1].replace("-", "."))
            except ValueError:
                rcode = RCODE_NXDOMAIN
            else:
                if qtype == QTYPE_A:
                    answers = [dnswire.record(QTYPE_A, TTL, ip.packed)]
        else:
            rcode = RCODE_NXDOMAIN
        return dnswire.response(query, rcode, answers)

    @staticmethod
    def _srv(upstreams: list[tuple[str, int]]) -> list[bytes]:
        """SRV records; the owner name points to the question's (offset 12)."""
        out = []
        for ip, port in upstreams:
            rdata = struct.pack(">HHH", 1, 1, port) + dnswire.encode_name(target_name(ip))
            out.append(dnswire.record(QTYPE_SRV, TTL, rdata))
        return out


async def start(host: str = "127.0.0.1", port: int = 0) -> tuple[UpstreamDNS, asyncio.DatagramTransport, int]:
    loop = asyncio.get_running_loop()
    transport, proto = await loop.create_datagram_endpoint(UpstreamDNS, local_addr=(host, port))
    bound = int(transport.get_extra_info("sockname")[1])
    log.info("proxy.dns_listening", address=f"{host}:{bound}")
    return proto, transport, bound
