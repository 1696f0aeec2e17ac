"""The open-loop load generator: sends each request at its scheduled instant, never later
because an earlier one is still waiting, and switches the brown-out on and off on time.

A closed-loop generator (N workers, each waiting for its response before sending the next)
slows down exactly when the server does, so it never shows an overload; this one keeps
sending at the scheduled rate and lets requests pile up, bounded by the client timeout and
by ``MAX_IN_FLIGHT``.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable, Sequence
from typing import Any

import httpx

from .app import INJECTED_STATUS, SESSION_COOKIE
from .db import session_token
from .metrics import DROPPED, ERROR, INJECTED, OK, TIMEOUT, RequestLog
from .scenario import Arrival, Phase, phase_at
from .wire import WireError

MAX_IN_FLIGHT = 20_000  # beyond this a request is not sent at all and counted as dropped
PROGRESS_EVERY = 0.25  # seconds between progress callbacks

# (seconds into the run, phase name, requests finished, requests failed, final report)
Progress = Callable[[float, str, int, int, bool], None]
# Sends one GET (path, headers) to the shop and returns the status code.
Get = Callable[[str, dict[str, str]], Awaitable[int]]


def httpx_get(client: httpx.AsyncClient) -> Get:
    async def get(path: str, headers: dict[str, str]) -> int:
        return (await client.get(path, headers=headers)).status_code

    return get


async def post(client: httpx.AsyncClient, path: str, body: dict[str, Any]) -> dict[str, Any]:
    """A control call to the app; these are not part of the measured load."""
    resp = await client.post(path, json=body, timeout=10.0)
    resp.raise_for_status()
    result: dict[str, Any] = resp.json()
    return result


async def generate(
    client: httpx.AsyncClient,
    get: Get,
    arrivals: Sequence[Arrival],
    phases: Sequence[Phase],
    *,
    request_timeout: float,
    progress: Progress | None = None,
) -> RequestLog:
    """Replay ``arrivals`` through ``get``; returns one log entry per arrival.

    ``client`` carries the control calls (start, brown-out on and off), apart from the load.
    """
    n = len(arrivals)
    # Until a request has its outcome it counts as dropped and as slow as a timeout, so one
    # that never completes can only make the figures worse, never flatter them.
    log = RequestLog([request_timeout] * n, [DROPPED] * n, [0.0] * n)
    done = [0, 0]  # finished, failed
    t0 = time.monotonic()
    await post(client, "/_surge/start", {"t0": t0})
    in_flight: set[asyncio.Task[None]] = set()

    async def send(i: int, a: Arrival) -> None:
        due = t0 + a.at
        log.send_lag[i] = time.monotonic() - due
        headers = (
            {"cookie": f"{SESSION_COOKIE}={session_token(a.ident)}"} if a.kind == "cart" else {}
        )
        try:
            status = await asyncio.wait_for(get(a.path, headers), request_timeout)
            outcome = OK if status < 400 else INJECTED if status == INJECTED_STATUS else ERROR
        except asyncio.TimeoutError:
            outcome = TIMEOUT
        except (httpx.HTTPError, WireError):
            outcome = ERROR  # the server refused or dropped the connection
        log.latency[i] = time.monotonic() - due
        log.outcome[i] = outcome
        done[0] += 1
        done[1] += outcome != OK

    control = asyncio.ensure_future(_switch_brownout(client, phases, t0))
    reporter = asyncio.ensure_future(_report(progress, phases, t0, done)) if progress else None
    try:
        i = 0
        while i < n:
            now = time.monotonic() - t0
            if arrivals[i].at > now:
                await asyncio.sleep(arrivals[i].at - now)
                continue
            # Everything already due goes out now, in one go: a late wake-up must not
            # spread the backlog over the following instants.
            while i < n and arrivals[i].at <= now:
                if len(in_flight) >= MAX_IN_FLIGHT:  # not sent: stays dropped in the log
                    done[0] += 1
                    done[1] += 1
                else:
                    task = asyncio.ensure_future(send(i, arrivals[i]))
                    in_flight.add(task)
                    task.add_done_callback(in_flight.discard)
                i += 1
        if in_flight:
            await asyncio.wait(in_flight, timeout=request_timeout + 5.0)
        await control
        if progress is not None:  # the final count, once every request has its outcome
            progress(phases[-1].end, phases[-1].name, done[0], done[1], True)
    finally:
        helpers = [control] if reporter is None else [control, reporter]
        for task in (*in_flight, *helpers):
            task.cancel()
        await asyncio.gather(*in_flight, *helpers, return_exceptions=True)
        # The run is over: a brown-out must not leak into whatever happens next.
        await post(client, "/_surge/degrade", {"slowdown": 1.0, "fail_share": 0.0})
    return log


async def _switch_brownout(client: httpx.AsyncClient, phases: Sequence[Phase], t0: float) -> None:
    current = (1.0, 0.0)
    for phase in phases:
        wanted = (phase.slowdown, phase.fail_share)
        if wanted == current:
            continue
        await asyncio.sleep(max(0.0, t0 + phase.start - time.monotonic()))
        await post(client, "/_surge/degrade", {"slowdown": wanted[0], "fail_share": wanted[1]})
        current = wanted


async def _report(progress: Progress, phases: Sequence[Phase], t0: float, done: list[int]) -> None:
    end = phases[-1].end
    while True:
        elapsed = min(end, time.monotonic() - t0)
        progress(elapsed, phase_at(list(phases), elapsed).name, done[0], done[1], False)
        await asyncio.sleep(PROGRESS_EVERY)
