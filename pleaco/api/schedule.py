"""API routes for scheduled jobs (pleaco/stacks/schedule.py).

    PUT    /v1/apps/{name}/jobs/{job}     {"cron": "*/5 * * * *", "command": ["CMD", ...]}: schedule
    DELETE /v1/apps/{name}/jobs/{job}     unschedule (its runs' records go too)
    GET    /v1/jobs                       ?app=NAME&limit=N: schedules with their next tick, and
                                          each schedule's last N runs (tick, node, state, exit
                                          code, duration)
    GET    /v1/jobs/runs/{app}/{job}/{tick}/logs   a run's output (text/plain), from the node
                                          that ran it; 409 on any other, naming that node
"""

from __future__ import annotations

from collections.abc import Callable

from aiohttp import web

from pleaco.api import jsonbody
from pleaco.api.errors import ApiError
from pleaco.apps import AppStore, validate_name
from pleaco.stacks.jobs import JobNotFound
from pleaco.stacks.schedule import Scheduler, parse_schedule

# Runs shown per schedule when the request names no limit.
DEFAULT_RUNS = 5


def add_routes(app: web.Application, scheduler: Scheduler, apps: AppStore,
               node_address: Callable[[str], tuple[str, str]]) -> None:
    """``node_address(node_id)``: a node's (name, API address), for the 409 of a log elsewhere."""

    async def put(request: web.Request) -> web.Response:
        raw = await jsonbody.read(request)
        if not raw:
            raise ApiError(400, "invalid_body", 'request body is empty; expected {"cron": "...", "command": [...]}')
        body = jsonbody.parse(request, raw)
        schedule = parse_schedule(request.match_info["name"], request.match_info["job"], body)
        if apps.get(schedule.app) is None:
            raise JobNotFound(f"app {schedule.app!r} does not exist")
        scheduler.schedules.put(schedule)
        scheduler.wake()
        shown = scheduler.listing(schedule.app, 0)["schedules"]
        return web.json_response(next(s for s in shown if s["name"] == schedule.name))

    async def delete(request: web.Request) -> web.Response:
        name, job = request.match_info["name"], request.match_info["job"]
        scheduler.schedules.remove(name, job)
        return web.json_response({"removed": job, "app": name})

    async def listing(request: web.Request) -> web.Response:
        app_name = request.query.get("app") or None
        if app_name is not None:
            validate_name(app_name)
        raw_limit = request.query.get("limit", str(DEFAULT_RUNS))
        if not raw_limit.isdigit() or not 0 <= int(raw_limit) <= 1000:
            raise ApiError(400, "invalid_query", f"limit: expected a whole number 0..1000, got {raw_limit!r}")
        return web.json_response(scheduler.listing(app_name, int(raw_limit)))

    async def run_logs(request: web.Request) -> web.Response:
        m = request.match_info
        text = scheduler.log_of(f"{m['app']}/{m['job']}/{m['tick']}", node_address)
        return web.Response(body=text, content_type="text/plain", charset="utf-8")

    app.router.add_put("/v1/apps/{name}/jobs/{job}", put)
    app.router.add_delete("/v1/apps/{name}/jobs/{job}", delete)
    app.router.add_get("/v1/jobs", listing)
    app.router.add_get("/v1/jobs/runs/{app}/{job}/{tick}/logs", run_logs)
