"""Release bundles kept on a node and carried between nodes.

The node that received a bundle (``POST /v1/upgrade``) keeps it as
``DATA_DIR/upgrades/SHA256.bundle``; a node whose turn it is to upgrade fetches it from
there over the cluster's authenticated node-to-node streams: it opens a sealed stream to
the member on channel ``U`` with the header ``{"bundle": SHA256}``, the member answers
``{"ok": true, "size": N}`` (or an error) and then the file in sealed chunks, ending with an
empty chunk. The fetching node writes the chunks to a temporary file as they arrive,
checks size and SHA-256 against what the plan says, and only then renames it into place,
so a bundle file here is always whole and the one named. A node that fetched a bundle
serves it too: when the origin cannot be reached, another member that has it will do.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import os
import re
from pathlib import Path
from typing import Any

from pleaco import logs
from pleaco.cluster import wire
from pleaco.cluster.messages import MessageError
from pleaco.cluster.service import Cluster
from pleaco.cluster.transport import SealedStream, TransportError
from pleaco.errors import InvalidInput

log = logs.get("pleaco.host.bundleship")

CHANNEL_BUNDLE = b"U"
CHUNK = 1 << 20
SHA256_HEX = re.compile(r"[0-9a-f]{64}")


class BundleMismatch(InvalidInput, code="bundle_mismatch"):
    """A fetched bundle is not the one named (its size or SHA-256 differ)."""


class BundleShelf:
    """The bundles this node keeps (DATA_DIR/upgrades), served to members and fetched from them."""

    def __init__(self, data_dir: Path, cluster: Cluster | None = None) -> None:
        self.dir = data_dir / "upgrades"
        self.dir.mkdir(mode=0o700, exist_ok=True)  # now: an upload that is refused changes nothing here
        self.cluster = cluster
        self._refused = logs.Burst(log, "bundle.request_refused")
        if cluster is not None:
            self.timeout = cluster.gossip.stream_timeout
            cluster.register_channel(CHANNEL_BUNDLE, self.serve)

    def path(self, sha256: str) -> Path:
        return self.dir / f"{sha256}.bundle"

    def temp_path(self) -> Path:
        """A new file name for a bundle being received (renamed by ``keep``)."""
        return self.dir / f".incoming-{os.getpid()}-{os.urandom(6).hex()}"

    def keep(self, temp: Path, sha256: str) -> Path:
        """Move a received, checked bundle into place, and drop every other bundle kept
        here (one plan at a time: only the newest is ever asked for)."""
        final = self.path(sha256)
        os.replace(temp, final)
        for other in self.dir.iterdir():
            if other != final and (other.suffix == ".bundle" or other.name.startswith(".incoming-")) \
                    and not other.name.startswith(f".incoming-{os.getpid()}-"):
                with contextlib.suppress(OSError):
                    other.unlink()
        return final

    # -- serving ---------------------------------------------------------------------------

    async def serve(self, stream: SealedStream, header: dict[str, Any]) -> None:
        sha = header.get("bundle")
        if not isinstance(sha, str) or not SHA256_HEX.fullmatch(sha):
            self._refused.log(peer=stream.sender, error='expected {"bundle": SHA256}')
            return
        path = self.path(sha)
        try:
            f = open(path, "rb")  # noqa: SIM115 (closed below, across awaits)
        except OSError:
            await stream.send_message({"error": f"bundle {sha[:12]} is not kept here"})
            return
        sent = 0
        try:
            await stream.send_message({"ok": True, "size": os.fstat(f.fileno()).st_size})
            while chunk := await asyncio.to_thread(f.read, CHUNK):
                await stream.send(chunk)
                sent += len(chunk)
            await stream.send(b"")
            log.info("bundle.sent", sha256=sha[:12], to=stream.sender, bytes=sent)
        except (OSError, asyncio.IncompleteReadError) as exc:
            log.warning("bundle.send_failed", sha256=sha[:12], to=stream.sender, error=str(exc))
        finally:
            f.close()

    # -- fetching --------------------------------------------------------------------------

    async def fetch(self, sha256: str, size: int, origin: str) -> Path:
        """The bundle, kept here already or fetched from ``origin`` (else any other live
        member). Raises BundleMismatch when what arrived is not it, TransportError when no
        member could give it."""
        path = self.path(sha256)
        if await asyncio.to_thread(_matches, path, sha256, size):
            return path
        if self.cluster is None:
            raise TransportError(f"bundle {sha256[:12]} is not kept here and this node is not in a cluster")
        peers = sorted(self.cluster.live_peers(), key=lambda m: m.node_id != origin)  # the origin first
        errors = []
        for peer in peers:
            try:
                got = await self.fetch_from(peer.addr, sha256, size)
            except TransportError as exc:
                errors.append(f"{peer.node_id[:12]}: {exc}")
                continue
            log.info("bundle.fetched", sha256=sha256[:12], peer=peer.node_id, bytes=size)
            return got
        raise TransportError(f"bundle {sha256[:12]}: no member could give it ({'; '.join(errors) or 'none live'})")

    async def fetch_from(self, addr: str, sha256: str, size: int) -> Path:
        assert self.cluster is not None
        stream = await self.cluster.open_stream(addr, CHANNEL_BUNDLE, {"bundle": sha256})
        temp = self.temp_path()
        digest = hashlib.sha256()
        received = 0
        try:
            with open(temp, "wb") as out:
                answer = await asyncio.wait_for(stream.receive_message(), self.timeout)
                if not answer.get("ok"):
                    raise TransportError(f"bundle fetch from {addr}: {answer.get('error', 'bad answer')}")
                while payload := await asyncio.wait_for(stream.receive(), self.timeout):
                    received += len(payload)
                    if received > size:
                        raise BundleMismatch(f"bundle {sha256[:12]} from {addr}: more than the {size} bytes named")
                    digest.update(payload)
                    await asyncio.to_thread(out.write, payload)
                await asyncio.to_thread(_sync, out)
            if received != size or digest.hexdigest() != sha256:
                raise BundleMismatch(f"bundle from {addr}: {received} bytes with SHA-256 {digest.hexdigest()[:12]}, "
                                     f"the plan names {size} bytes with SHA-256 {sha256[:12]}")
            return self.keep(temp, sha256)
        except (wire.Drop, MessageError, TimeoutError, asyncio.IncompleteReadError, OSError) as exc:
            raise TransportError(f"bundle fetch from {addr}: {exc.__class__.__name__}: {exc}") from None
        finally:
            await stream.close()
            with contextlib.suppress(FileNotFoundError):
                temp.unlink()


def file_digest(path: Path) -> tuple[str, int]:
    """SHA-256 (hex) and size of a file, read in chunks."""
    digest = hashlib.sha256()
    size = 0
    with open(path, "rb") as f:
        while chunk := f.read(CHUNK):
            digest.update(chunk)
            size += len(chunk)
    return digest.hexdigest(), size


def _matches(path: Path, sha256: str, size: int) -> bool:
    try:
        return path.stat().st_size == size and file_digest(path)[0] == sha256
    except OSError:
        return False


def _sync(f: Any) -> None:
    f.flush()
    os.fsync(f.fileno())
