"""The shop served by uvicorn on 127.0.0.1, for ``replay(serve=True)``.

    python -m cachelayer.surge.serve < spec.json    # the JSON spec replay.served writes

Not a user-facing command: the replay starts it, waits for ``/_surge/metrics`` to answer,
and stops it with SIGTERM, on which uvicorn shuts down and the lifespan closes the pool.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import sys
from collections.abc import AsyncIterator
from typing import Any

import uvicorn
from starlette.applications import Starlette

from . import db
from .app import build_app, make_cache, quiet_cache_warnings
from .scenario import Scenario


async def build(spec: dict[str, Any]) -> Starlette:
    sc = Scenario(**spec["scenario"])
    shop = await db.connect(db.Target(**spec["target"]), sc)
    cache = make_cache(sc, spec["redis_url"], spec["namespace"]) if spec["cached"] else None

    @contextlib.asynccontextmanager
    async def lifespan(app: Starlette) -> AsyncIterator[None]:
        try:
            yield
        finally:
            if cache is not None:
                await cache.aclose()
            await shop.close()

    return build_app(shop, cache, lifespan=lifespan)


async def serve(spec: dict[str, Any]) -> None:
    quiet_cache_warnings()
    app = await build(spec)
    config = uvicorn.Config(
        app,
        host="127.0.0.1",  # never reachable from another machine
        port=int(spec["port"]),
        log_level="warning",
        access_log=False,
        lifespan="on",
    )
    await uvicorn.Server(config).serve()


if __name__ == "__main__":
    asyncio.run(serve(json.loads(sys.stdin.read())))
