"""API route for one-off jobs (pleaco/stacks/jobs.py).

    POST /v1/apps/{name}/run    {"command": ["CMD", "ARG", ...]}: runs a job of the app's
                                current release on this node (an app with volumes: only on
                                the node holding them, 409 naming it elsewhere), streaming,
                                as JSON lines:
                                {"job", "release"} first, then {"output": TEXT} as it comes
                                (stdout and stderr), then {"exit_code": N}, or {"error":
                                {"code", "message"}} when the job could not be watched to
                                its end. The container is removed at the end, also when the
                                client goes away before.
"""

from __future__ import annotations

import asyncio
import codecs
import contextlib
import json
import threading
from typing import Any

from aiohttp import web

from pleaco import logs
from pleaco.api import jsonbody
from pleaco.api.errors import ApiError, error_json
from pleaco.errors import PleacoError
from pleaco.stacks.jobs import Job, OneOffJobs

log = logs.get("pleaco.api.jobs")

# How often a job that prints nothing checks that its client is still there: a client gone
# is noticed within this, and its job's container removed.
CLIENT_CHECK = 1.0


def _line(value: dict[str, Any]) -> bytes:
    return json.dumps(value).encode() + b"\n"


def add_routes(app: web.Application, jobs: OneOffJobs) -> None:
    async def run(request: web.Request) -> web.StreamResponse:
        raw = await jsonbody.read(request)
        if not raw:
            raise ApiError(400, "invalid_body", 'request body is empty; expected {"command": ["CMD", ...]}')
        body = jsonbody.parse(request, raw)
        job = await asyncio.to_thread(jobs.start, request.match_info["name"], body)
        why = "client went away"
        resp = web.StreamResponse(headers={"Content-Type": "application/x-ndjson"})
        try:
            await resp.prepare(request)
            await resp.write(_line({"job": job.id, "release": job.release}))
            code = await _stream(request, resp, jobs, job)
            if code is not None:
                why = "finished"
                await resp.write(_line({"exit_code": code}))
                await resp.write_eof()
            return resp
        except ConnectionResetError:
            return resp  # nobody to answer
        except PleacoError as exc:
            why = f"failed: {exc}"
            with contextlib.suppress(ConnectionResetError):
                await resp.write(_line(error_json(exc)))
                await resp.write_eof()
            return resp
        finally:
            # Shielded: the container goes whatever happens to this request's task.
            await asyncio.shield(asyncio.to_thread(jobs.remove, job, why))

    app.router.add_post("/v1/apps/{name}/run", run)


async def _stream(request: web.Request, resp: web.StreamResponse, jobs: OneOffJobs, job: Job) -> int | None:
    """Copy the job's output to the client until the job ends (its exit code), or until the
    client goes away (None). A reader thread feeds a queue (the SDK's stream blocks)."""
    loop = asyncio.get_running_loop()
    queue: asyncio.Queue[bytes | None] = asyncio.Queue(maxsize=256)
    closed = threading.Event()
    stream: list[Any] = []

    def put(item: bytes | None) -> None:
        if not closed.is_set():
            with contextlib.suppress(RuntimeError):  # the loop closed under us: nobody reads
                asyncio.run_coroutine_threadsafe(queue.put(item), loop).result()

    def reader() -> None:
        try:
            output = jobs.output(job)
            stream.append(output)
            for chunk in output:
                if closed.is_set():
                    break
                put(chunk)
        except Exception as exc:  # the container removed under the stream ends it
            log.debug("job.output_ended", job=job.id, error=str(exc))
        finally:
            put(None)

    thread = threading.Thread(target=reader, name=f"job {job.id} output", daemon=True)
    thread.start()
    decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")
    try:
        while True:
            try:
                chunk = await asyncio.wait_for(queue.get(), CLIENT_CHECK)
            except TimeoutError:
                if request.transport is None or request.transport.is_closing():
                    return None
                continue
            if chunk is None:
                break
            if text := decoder.decode(chunk):
                await resp.write(_line({"output": text}))
        if text := decoder.decode(b"", final=True):
            await resp.write(_line({"output": text}))
        return await asyncio.to_thread(jobs.wait, job)
    finally:
        closed.set()
        for s in stream:
            with contextlib.suppress(Exception):
                s.close()
        while not queue.empty():
            queue.get_nowait()
