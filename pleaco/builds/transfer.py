"""Images from node to node: a node that needs an image and lacks it fetches it from a
member that has it, over the cluster's authenticated node-to-node streams, with no
registry; an image whose reference names a registry is pulled from there otherwise.

The fetching node opens a sealed stream (``Cluster.open_stream``) to a member on channel
``I`` with the header ``{"image": REF}``. The member answers with a sealed header and then
the ``docker save`` stream in sealed chunks (each signed by the member and encrypted with
the cluster key), ending with an empty chunk; the fetching node pipes them into
``docker load`` as they arrive. Both ends stream: neither holds the image in memory. The
cluster authenticates the stream before this module sees it.
"""

from __future__ import annotations

import asyncio
import contextlib
import queue
import random
import threading
from collections.abc import Iterator
from typing import Any

from pleaco import logs
from pleaco.cluster import wire
from pleaco.cluster.messages import MessageError
from pleaco.cluster.service import Cluster
from pleaco.cluster.transport import SealedStream, TransportError
from pleaco.runtime import DockerRuntime

log = logs.get("pleaco.builds.transfer")

CHANNEL_IMAGE = b"I"
CHUNK_QUEUE = 8  # chunks of 1 MiB in flight between the socket and the engine
MAX_REF = 256


def names_registry(ref: str) -> bool:
    """Whether an image reference starts with a registry host ("host.example:5000/app:tag",
    "localhost/app"), as Docker tells one from a Docker Hub namespace; image ids do not."""
    first, sep, _ = ref.partition("/")
    return bool(sep) and ("." in first or ":" in first or first == "localhost")


class ImageTransfer:
    def __init__(self, cluster: Cluster, runtime: DockerRuntime) -> None:
        self.cluster = cluster
        self.runtime = runtime
        # Seconds one step (the answer, one chunk) may take: the cluster's stream timeout.
        self.timeout = cluster.gossip.stream_timeout
        self._refused = logs.Burst(log, "image.request_refused")
        cluster.register_channel(CHANNEL_IMAGE, self.serve)

    # -- serving ---------------------------------------------------------------------------

    async def serve(self, stream: SealedStream, header: dict[str, Any]) -> None:
        ref = header.get("image")
        if not isinstance(ref, str) or not ref or len(ref) > MAX_REF:
            self._refused.log(peer=stream.sender, error="expected {\"image\": REF}")
            return
        exists = await asyncio.to_thread(self.runtime.image_exists, ref)
        if not exists:
            await stream.send_message({"error": f"image {ref} is not present here"})
            return
        await stream.send_message({"ok": True})
        loop = asyncio.get_running_loop()
        chunks: asyncio.Queue[bytes | None] = asyncio.Queue(CHUNK_QUEUE)
        stop = threading.Event()

        def produce() -> None:
            try:
                for chunk in self.runtime.save_image(ref):
                    if stop.is_set():
                        return
                    asyncio.run_coroutine_threadsafe(chunks.put(chunk), loop).result()
            finally:
                asyncio.run_coroutine_threadsafe(chunks.put(None), loop).result()

        producer = loop.run_in_executor(None, produce)
        sent = 0
        try:
            while (chunk := await chunks.get()) is not None:
                await stream.send(chunk)
                sent += len(chunk)
            await producer  # raises when docker save failed: no end marker then
            await stream.send(b"")
            log.info("image.sent", image=ref, to=stream.sender, bytes=sent)
        except Exception as exc:
            stop.set()
            log.warning("image.send_failed", image=ref, to=stream.sender, error=str(exc))

    # -- fetching --------------------------------------------------------------------------

    async def fetch_image(self, ref: str) -> bool:
        """Fetch an image this node lacks from a member that has it, or else, when the
        reference names a registry (a build pushed with ``build.registry``), pull it from
        there; True when it did."""
        peers = self.cluster.live_peers()
        random.shuffle(peers)
        for peer in peers:
            try:
                size = await self.fetch(peer.addr, ref)
            except TransportError as exc:
                log.debug("image.fetch_failed", image=ref, peer=peer.node_id, error=str(exc))
                continue
            log.info("image.fetched", image=ref, peer=peer.node_id, bytes=size)
            return True
        if not names_registry(ref):
            return False
        try:
            await asyncio.to_thread(self.runtime.pull_image, ref)
        except RuntimeError as exc:
            log.warning("image.pull_failed", image=ref, error=str(exc))
            return False
        log.info("image.pulled", image=ref)
        return True

    async def fetch(self, addr: str, ref: str) -> int:
        """Fetch ``ref`` from the member at ``addr`` into the local engine; returns bytes.

        Raises TransportError when the member cannot give it (not present, unreachable,
        a chunk that does not open)."""
        stream = await self.cluster.open_stream(addr, CHANNEL_IMAGE, {"image": ref})
        pipe: queue.Queue[bytes | None] = queue.Queue(CHUNK_QUEUE)
        loop = asyncio.get_running_loop()
        loader: asyncio.Future[None] | None = None
        received = 0
        try:
            answer = await asyncio.wait_for(stream.receive_message(), self.timeout)
            if not answer.get("ok"):
                raise TransportError(f"image fetch from {addr}: {answer.get('error', 'bad answer')}")

            def chunks() -> Iterator[bytes]:
                while (chunk := pipe.get()) is not None:
                    yield chunk

            loader = loop.run_in_executor(None, self.runtime.load_image, chunks())
            while True:
                payload = await asyncio.wait_for(stream.receive(), self.timeout)
                if not payload:
                    break
                received += len(payload)
                await loop.run_in_executor(None, pipe.put, payload)
        except (wire.Drop, MessageError, TimeoutError, asyncio.IncompleteReadError, OSError) as exc:
            raise TransportError(f"image fetch from {addr}: {exc.__class__.__name__}: {exc}") from None
        finally:
            await stream.close()
            if loader is not None:
                # End the stream either way: a truncated one makes docker load fail.
                await loop.run_in_executor(None, pipe.put, None)
                with contextlib.suppress(Exception):
                    await asyncio.wait_for(asyncio.shield(loader), self.timeout * 6)
        if loader is not None and loader.done() and loader.exception() is not None:
            raise TransportError(f"image fetch from {addr}: {loader.exception()}")
        if not await asyncio.to_thread(self.runtime.image_exists, ref):
            raise TransportError(f"image fetch from {addr}: {ref} not present after loading")
        return received
