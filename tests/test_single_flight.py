"""One load per key per process, however many callers and however they wait."""

from __future__ import annotations

import asyncio
import threading
import time
from typing import Any

import pytest

from cachelayer import Cache

pytestmark = [pytest.mark.redis, pytest.mark.on_cluster]


@pytest.fixture(params=["l1", "l1+redis"])
def cache(request: pytest.FixtureRequest, redis_url: str) -> Any:
    c = Cache(None if request.param == "l1" else redis_url, jitter=0)
    yield c
    c.close()


class SlowLoader:
    """Counts calls; each call takes ``delay`` seconds so callers really overlap."""

    def __init__(self, delay: float = 0.2, value: Any = "v") -> None:
        self.delay = delay
        self.value = value
        self.calls = 0
        self.error: BaseException | None = None
        self.cancelled = 0
        self.lock = threading.Lock()

    def __call__(self) -> Any:
        with self.lock:
            self.calls += 1
        time.sleep(self.delay)
        if self.error is not None:
            raise self.error
        return self.value

    async def acall(self) -> Any:
        with self.lock:
            self.calls += 1
        try:
            await asyncio.sleep(self.delay)
        except asyncio.CancelledError:
            self.cancelled += 1
            raise
        if self.error is not None:
            raise self.error
        return self.value


async def loader_running(loader: SlowLoader, calls: int = 1, timeout: float = 5.0) -> None:
    """Wait until the loader runs: before that, a flight may still be talking to Redis
    (longer on a Cluster, whose client first learns the topology)."""
    deadline = time.monotonic() + timeout
    while loader.calls < calls:
        assert time.monotonic() < deadline, "the loader never started"
        await asyncio.sleep(0.005)


def test_1000_concurrent_async_callers_run_the_loader_once(cache: Cache) -> None:
    loader = SlowLoader()

    async def main() -> list[Any]:
        results = await asyncio.gather(
            *(cache.aget_or_load("cold", loader.acall) for _ in range(1000))
        )
        await cache.aclose()
        return results

    assert asyncio.run(main()) == ["v"] * 1000
    assert loader.calls == 1
    assert cache.stats()["coalesced"] == 999


def test_50_threads_run_the_loader_once(cache: Cache) -> None:
    loader = SlowLoader()
    barrier = threading.Barrier(50)
    results: list[Any] = []

    def call() -> None:
        barrier.wait()
        results.append(cache.get_or_load("cold", loader))

    threads = [threading.Thread(target=call) for _ in range(50)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(10)
    assert results == ["v"] * 50
    assert loader.calls == 1


def test_threads_and_tasks_on_several_event_loops_share_one_load(cache: Cache) -> None:
    loader = SlowLoader(delay=0.3)
    barrier = threading.Barrier(8)
    results: list[Any] = []
    lock = threading.Lock()

    def sync_caller() -> None:
        barrier.wait()
        value = cache.get_or_load("cold", loader)
        with lock:
            results.append(value)

    def loop_caller() -> None:
        async def main() -> list[Any]:
            barrier.wait()
            out = await asyncio.gather(
                *(cache.aget_or_load("cold", loader.acall) for _ in range(100))
            )
            await cache.aclose()
            return out

        out = asyncio.run(main())
        with lock:
            results.extend(out)

    threads = [threading.Thread(target=sync_caller) for _ in range(4)]
    threads += [threading.Thread(target=loop_caller) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(20)
    assert len(results) == 4 + 400
    assert set(results) == {"v"}
    assert loader.calls == 1


def test_an_exception_reaches_every_waiter_and_nothing_is_stored(cache: Cache) -> None:
    loader = SlowLoader()
    loader.error = ConnectionResetError("pool exhausted")

    async def main() -> list[Any]:
        results = await asyncio.gather(
            *(cache.aget_or_load("k", loader.acall) for _ in range(100)), return_exceptions=True
        )
        await cache.aclose()
        return results

    results = asyncio.run(main())
    assert all(r is loader.error for r in results)
    assert loader.calls == 1
    assert cache.get("k") is None
    loader.error = None
    assert cache.get_or_load("k", loader) == "v"  # the next call tries again
    assert loader.calls == 2


def test_an_exception_reaches_every_waiting_thread(cache: Cache) -> None:
    loader = SlowLoader()
    loader.error = TimeoutError("query timed out")
    errors: list[BaseException] = []
    barrier = threading.Barrier(20)

    def call() -> None:
        barrier.wait()
        try:
            cache.get_or_load("k", loader)
        except TimeoutError as exc:
            errors.append(exc)

    threads = [threading.Thread(target=call) for _ in range(20)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(10)
    assert len(errors) == 20 and all(e is loader.error for e in errors)
    assert loader.calls == 1


def test_a_cancelled_waiter_does_not_cancel_the_load_for_the_others(cache: Cache) -> None:
    loader = SlowLoader(delay=0.2)

    async def main() -> list[Any]:
        first = asyncio.create_task(cache.aget_or_load("k", loader.acall))  # the leader
        await loader_running(loader)
        others = [asyncio.create_task(cache.aget_or_load("k", loader.acall)) for _ in range(10)]
        await asyncio.sleep(0.01)
        first.cancel()
        others[0].cancel()
        results = await asyncio.gather(*others[1:])
        with pytest.raises(asyncio.CancelledError):
            await first
        await cache.aclose()
        return results

    assert asyncio.run(main()) == ["v"] * 9
    assert loader.calls == 1
    assert loader.cancelled == 0
    assert cache.get("k") == "v"


def test_the_load_is_abandoned_when_every_waiter_is_gone(cache: Cache) -> None:
    loader = SlowLoader(delay=5)

    async def main() -> None:
        tasks = [asyncio.create_task(cache.aget_or_load("k", loader.acall)) for _ in range(5)]
        await loader_running(loader)
        for t in tasks:
            t.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        await asyncio.sleep(0.05)  # let the abandoned load see its cancellation
        await cache.aclose()

    started = time.monotonic()
    asyncio.run(main())
    assert time.monotonic() - started < 2
    assert loader.cancelled == 1
    assert cache.stats()["loads_in_flight"] == 0
    assert cache.stats()["flights"] == 0


def test_callers_of_a_load_cancelled_elsewhere_load_again_rather_than_inherit_it(
    cache: Cache,
) -> None:
    loader = SlowLoader(delay=0.2)

    async def main() -> list[Any]:
        leader = asyncio.create_task(cache.aget_or_load("k", loader.acall))
        await loader_running(loader)
        flight = cache._flights._flights["k"]
        follower = asyncio.create_task(cache.aget_or_load("k", loader.acall))
        await asyncio.sleep(0.01)
        assert flight.task is not None
        flight.task.cancel()  # as when the loop running the load shuts down
        results = await asyncio.gather(leader, follower)
        await cache.aclose()
        return results

    # Neither caller was cancelled, so neither may see a CancelledError: they load again.
    assert asyncio.run(main()) == ["v", "v"]
    assert loader.calls == 2
    assert loader.cancelled == 1


def test_a_sync_call_inside_the_loop_that_runs_the_load_does_not_deadlock(cache: Cache) -> None:
    loader = SlowLoader(delay=0.1)

    async def main() -> Any:
        task = asyncio.create_task(cache.aget_or_load("k", loader.acall))
        await asyncio.sleep(0.01)
        value = cache.get_or_load("k", lambda: "sync")  # blocks the loop: must not wait on it
        await task
        await cache.aclose()
        return value

    assert asyncio.run(main()) == "sync"
