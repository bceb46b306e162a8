"""Images from node to node: a node that needs an image and lacks it fetches it from a
member that has it, over the authenticated node-to-node channel, with no registry.

The fetching node opens a TCP connection to a member's gossip port on channel ``I`` and
sends a sealed request naming the image. The member answers with a sealed header and then
the ``docker save`` stream in sealed chunks (each signed by the member and encrypted with
the cluster key), ending with an empty chunk; the fetching node pipes them into
``docker load`` as they arrive. Both ends stream: neither holds the image in memory.
"""

from __future__ import annotations

import asyncio
import contextlib
import queue
import threading
from collections.abc import Iterator

from pleaco import logs
from pleaco.cluster import messages, wire
from pleaco.cluster.messages import MessageError
from pleaco.cluster.transport import CHANNEL_IMAGE, TransportError, frame, read_frame
from pleaco.runtime import DockerRuntime

log = logs.get("pleaco.cluster.images")

CHUNK_QUEUE = 8  # chunks of 1 MiB in flight between the socket and the engine


class ImageTransfer:
    def __init__(self, codec: wire.Codec, runtime: DockerRuntime, timeout: float) -> None:
        self.codec = codec
        self.runtime = runtime
        self.timeout = timeout

    # -- serving ---------------------------------------------------------------------------

    async def serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            opened = self.codec.open(await asyncio.wait_for(read_frame(reader), self.timeout))
            request = messages.loads(opened.payload)
            ref = request.get("image") if isinstance(request, dict) else None
            if not isinstance(ref, str) or not ref or len(ref) > 256:
                raise MessageError("image request: expected {\"image\": REF}")
        except (wire.Drop, MessageError, TransportError, TimeoutError, asyncio.IncompleteReadError) as exc:
            log.warning("image.request_refused", error=str(exc))
            return
        exists = await asyncio.to_thread(self.runtime.image_exists, ref)
        if not exists:
            writer.write(frame(self.codec.seal(messages.dumps({"error": f"image {ref} is not present here"}))))
            await writer.drain()
            return
        writer.write(frame(self.codec.seal(messages.dumps({"ok": True}))))
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
                writer.write(frame(self.codec.seal(chunk)))
                await writer.drain()
                sent += len(chunk)
            await producer  # raises when docker save failed: no end marker then
            writer.write(frame(self.codec.seal(b"")))
            await writer.drain()
            log.info("image.sent", image=ref, to=opened.sender, bytes=sent)
        except Exception as exc:
            stop.set()
            log.warning("image.send_failed", image=ref, to=opened.sender, error=str(exc))

    # -- fetching --------------------------------------------------------------------------

    async def fetch(self, addr: str, ref: str) -> int:
        """Fetch ``ref`` from the member at ``addr`` into the local engine; returns bytes.

        Raises TransportError when the member cannot give it (not present, unreachable,
        a chunk that does not open)."""
        host, _, port = addr.rpartition(":")
        try:
            reader, writer = await asyncio.wait_for(asyncio.open_connection(host.strip("[]"), int(port)),
                                                    self.timeout)
        except (OSError, TimeoutError) as exc:
            raise TransportError(f"image fetch from {addr}: {exc}") from None
        pipe: queue.Queue[bytes | None] = queue.Queue(CHUNK_QUEUE)
        loop = asyncio.get_running_loop()
        loader: asyncio.Future[None] | None = None
        received = 0
        try:
            writer.write(CHANNEL_IMAGE + frame(self.codec.seal(messages.dumps({"image": ref}))))
            await writer.drain()
            head = self.codec.open(await asyncio.wait_for(read_frame(reader), self.timeout))
            answer = messages.loads(head.payload)
            if not isinstance(answer, dict) or not answer.get("ok"):
                reason = answer.get("error") if isinstance(answer, dict) else "bad answer"
                raise TransportError(f"image fetch from {addr}: {reason}")

            def chunks() -> Iterator[bytes]:
                while (chunk := pipe.get()) is not None:
                    yield chunk

            loader = loop.run_in_executor(None, self.runtime.load_image, chunks())
            while True:
                opened = self.codec.open(await asyncio.wait_for(read_frame(reader), self.timeout))
                if opened.sender != head.sender:
                    raise TransportError(f"image fetch from {addr}: a chunk from another node")
                if not opened.payload:
                    break
                received += len(opened.payload)
                await loop.run_in_executor(None, pipe.put, opened.payload)
        except (wire.Drop, MessageError, TimeoutError, asyncio.IncompleteReadError, OSError) as exc:
            raise TransportError(f"image fetch from {addr}: {exc.__class__.__name__}: {exc}") from None
        finally:
            writer.close()
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

