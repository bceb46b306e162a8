"""DNS messages on the wire (RFC 1035): the one parser and encoder of pleaco's two DNS
servers, the proxy's upstream DNS (pleaco.ingress.dns) and the service names
(pleaco.net.names).

Only what a server that answers one question needs: read a query's header, question and
EDNS0 buffer size, and build an answer whose records point back at the question's name.
Anything else in a message is never interpreted (a forwarded query travels as its bytes).
"""

from __future__ import annotations

import struct
from collections.abc import Sequence
from dataclasses import dataclass

QTYPE_A, QTYPE_AAAA, QTYPE_SRV, QTYPE_OPT = 1, 28, 33, 41
QCLASS_IN = 1
RCODE_FORMERR, RCODE_SERVFAIL, RCODE_NXDOMAIN, RCODE_NOTIMP, RCODE_REFUSED = 1, 2, 3, 4, 5

HEADER = 12
# Flag bits of the header's second word.
QR, AA, TC, RD, RA = 0x8000, 0x0400, 0x0200, 0x0100, 0x0080
OPCODE_MASK = 0x7800
# The largest UDP answer to a client that sent no EDNS0 (RFC 1035 4.2.1).
CLASSIC_UDP = 512
# The offset of the question's name in every message: what answers' owner names point at.
QUESTION_POINTER = b"\xc0\x0c"


class Malformed(ValueError):
    """A message this parser cannot read as a query."""


@dataclass(frozen=True)
class Query:
    id: int
    flags: int
    labels: tuple[str, ...]  # lower-cased; the question's own bytes keep the asker's case
    qtype: int
    qclass: int
    question: bytes  # the question section exactly as sent (RFC 5452: echo the 0x20 case)
    # The asker's UDP buffer size from its EDNS0 OPT record, None when it sent none.
    edns_size: int | None = None

    @property
    def name(self) -> str:
        return ".".join(self.labels)

    @property
    def is_response(self) -> bool:
        return bool(self.flags & QR)

    @property
    def opcode(self) -> int:
        return (self.flags & OPCODE_MASK) >> 11


def encode_name(name: str) -> bytes:
    return b"".join(bytes([len(p)]) + p.encode() for p in name.strip(".").split(".") if p) + b"\0"


def parse_query(data: bytes) -> Query:
    """The header and the one question of a message; Malformed when it has not exactly one
    question or the question runs past the end. A label is read as ASCII (other bytes become
    U+FFFD, which matches no name of ours); compressed names are refused (no query needs
    them, and following pointers is where parsers loop)."""
    if len(data) < HEADER:
        raise Malformed("short header")
    qid, flags, qdcount, _an, _ns, arcount = struct.unpack(">HHHHHH", data[:HEADER])
    if qdcount != 1:
        raise Malformed("expected one question")
    i, labels = HEADER, []
    while True:
        if i >= len(data):
            raise Malformed("truncated name")
        n = data[i]
        if n == 0:
            i += 1
            break
        if n & 0xC0 or i + 1 + n > len(data):
            raise Malformed("bad label")
        labels.append(data[i + 1:i + 1 + n].decode("ascii", "replace").lower())
        i += 1 + n
    if i + 4 > len(data):
        raise Malformed("truncated question")
    qtype, qclass = struct.unpack(">HH", data[i:i + 4])
    end = i + 4
    return Query(qid, flags, tuple(labels), qtype, qclass, data[HEADER:end], _edns_size(data, end, arcount))


def _edns_size(data: bytes, at: int, arcount: int) -> int | None:
    """The UDP size of an OPT record right after the question (where resolvers put it:
    a query has no answer or authority records), None when there is none."""
    if arcount != 1 or len(data) < at + 11 or data[at] != 0:
        return None
    rtype, size = struct.unpack(">HH", data[at + 1:at + 5])
    return size if rtype == QTYPE_OPT else None


def record(rtype: int, ttl: int, rdata: bytes) -> bytes:
    """An IN-class resource record owned by the question's name."""
    return QUESTION_POINTER + struct.pack(">HHIH", rtype, QCLASS_IN, ttl, len(rdata)) + rdata


def opt_record(udp_size: int) -> bytes:
    """The EDNS0 OPT pseudo-record (RFC 6891): our own UDP buffer size, no options."""
    return b"\0" + struct.pack(">HHIH", QTYPE_OPT, udp_size, 0, 0)


def response(query: Query, rcode: int, answers: Sequence[bytes] = (), *, authoritative: bool = True,
             truncated: bool = False, additional: Sequence[bytes] = ()) -> bytes:
    """An answer to ``query``: its id, its recursion-desired bit, recursion available,
    its question as asked, then the records."""
    flags = QR | RA | (query.flags & (RD | OPCODE_MASK)) | rcode
    flags |= (AA if authoritative else 0) | (TC if truncated else 0)
    header = struct.pack(">HHHHHH", query.id, flags, 1, len(answers), 0, len(additional))
    return header + query.question + b"".join(answers) + b"".join(additional)


def error_reply(data: bytes, rcode: int) -> bytes:
    """A bare error answer (no question) to a message that could not be parsed, with its
    id; b"" when it has none (too short to answer at all) or is itself a response."""
    if len(data) < 3 or data[2] & 0x80:
        return b""
    flags = QR | RA | ((data[2] << 8) & (RD | OPCODE_MASK)) | rcode
    return data[:2] + struct.pack(">HHHHH", flags, 0, 0, 0, 0)
