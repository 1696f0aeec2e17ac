"""One load per key per process, however many callers and however they wait."""

from __future__ import annotations

import asyncio
import gc
import logging
import sys
import threading
import time
from typing import Any

import pytest
from conftest import subscribed, wait_for

from cachelayer import Cache
from cachelayer._redis import FAILED
from cachelayer.testing import redis_client

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


class Abort(BaseException):
    """A loader's own ending that is neither an ``Exception`` nor its caller's cancellation
    (as ``GeneratorExit``, or a ``CancelledError`` of something the loader awaited)."""


class EndingLoader:
    """Ends with a ``BaseException`` of its own, ``ending``: for its first ``limit`` calls
    only, so that a regression that calls it again and again ends with "v" instead of
    spinning for ever (``limit`` is the escape hatch, never reached when all is well)."""

    def __init__(self, ending: str, delay: float = 0.2, limit: int = 50) -> None:
        self.ending = ending
        self.delay = delay
        self.limit = limit
        self.calls = 0
        self.lock = threading.Lock()

    def _count(self) -> bool:
        with self.lock:
            self.calls += 1
            return self.calls <= self.limit

    def error(self) -> BaseException:
        return {"custom": Abort, "GeneratorExit": GeneratorExit}[self.ending]()

    def __call__(self) -> Any:
        ends = self._count()
        time.sleep(self.delay)
        if ends:
            raise self.error()
        return "v"

    async def acall(self) -> Any:
        ends = self._count()
        if self.ending == "inner-cancelled":
            # The loader awaits work of its own that somebody else cancels (a task it
            # started, a connection pool's waiter): it raises CancelledError, but neither it
            # nor the caller was cancelled.
            inner = asyncio.ensure_future(asyncio.sleep(10))
            asyncio.get_running_loop().call_later(self.delay, inner.cancel)
            if ends:
                await inner
            inner.cancel()
            return "v"
        await asyncio.sleep(self.delay)
        if ends:
            raise asyncio.CancelledError() if self.ending == "CancelledError" else self.error()
        return "v"


def never_retrieved(caplog: pytest.LogCaptureFixture) -> list[str]:
    """asyncio's complaints about tasks whose exception nobody retrieved (logged, not warned,
    when the task is collected)."""
    gc.collect()
    return [r.getMessage() for r in caplog.records if "never retrieved" in r.getMessage()]


ASYNC_ENDINGS = ["custom", "GeneratorExit", "CancelledError", "inner-cancelled"]
needs_cancelling = pytest.mark.skipif(
    sys.version_info < (3, 11), reason="a loader's own CancelledError is told apart by 3.11's"
)


@pytest.mark.parametrize("ending", ASYNC_ENDINGS)
def test_a_loader_s_own_base_exception_reaches_its_caller_once(
    cache: Cache, ending: str, caplog: pytest.LogCaptureFixture
) -> None:
    if "ancel" in ending and sys.version_info < (3, 11):
        pytest.skip("a loader's own CancelledError is told apart by 3.11's Task.cancelling()")
    loader = EndingLoader(ending, delay=0.01)

    async def main() -> BaseException | None:
        try:
            await asyncio.wait_for(cache.aget_or_load("k", loader.acall), 5)
        except BaseException as exc:  # what the caller sees, CancelledError included
            return exc
        finally:
            await cache.aclose()
        return None

    with caplog.at_level(logging.ERROR, logger="asyncio"):
        got = asyncio.run(main())
        assert never_retrieved(caplog) == []
    assert loader.calls == 1
    expected = {"custom": Abort, "GeneratorExit": GeneratorExit}.get(ending, asyncio.CancelledError)
    assert type(got) is expected
    assert cache.stats()["flights"] == 0
    assert cache.get("k") is None


@pytest.mark.parametrize("ending", ASYNC_ENDINGS)
def test_a_loader_s_own_base_exception_reaches_every_waiter_once(
    cache: Cache, ending: str, caplog: pytest.LogCaptureFixture
) -> None:
    if "ancel" in ending and sys.version_info < (3, 11):
        pytest.skip("a loader's own CancelledError is told apart by 3.11's Task.cancelling()")
    loader = EndingLoader(ending)

    async def call() -> Any:
        try:
            return await cache.aget_or_load("k", loader.acall)
        except BaseException as exc:
            return exc

    async def main() -> list[Any]:
        try:
            return await asyncio.wait_for(asyncio.gather(*(call() for _ in range(200))), 10)
        finally:
            await cache.aclose()

    with caplog.at_level(logging.ERROR, logger="asyncio"):
        results = asyncio.run(main())
        assert never_retrieved(caplog) == []
    assert loader.calls == 1
    assert len({id(r) for r in results}) == 1  # one exception, shared as errors are
    assert isinstance(results[0], BaseException) and not isinstance(results[0], Exception)


def test_a_cached_coroutine_function_s_base_exception_is_raised_once(cache: Cache) -> None:
    calls = 0

    @cache.cached(ttl=60)
    async def fetch(item: int) -> int:
        nonlocal calls
        calls += 1
        if calls <= 50:
            raise Abort
        return item

    async def main() -> None:
        try:
            with pytest.raises(Abort):
                await asyncio.wait_for(fetch(1), 5)
        finally:
            await cache.aclose()

    asyncio.run(main())
    assert calls == 1


@needs_cancelling
def test_a_load_cancelled_elsewhere_that_ends_in_its_own_exception_is_loaded_again(
    cache: Cache, caplog: pytest.LogCaptureFixture
) -> None:
    """The cancellation of the flight (not what the loader made of it) decides: its callers
    were not cancelled, so they load again rather than inherit the loader's ``Abort``."""
    calls = 0

    async def load() -> str:
        nonlocal calls
        calls += 1
        try:
            await asyncio.sleep(0.2)
        except asyncio.CancelledError:
            raise Abort from None
        return "v"

    async def main() -> list[Any]:
        leader = asyncio.create_task(cache.aget_or_load("k", load))
        deadline = time.monotonic() + 5
        while not calls:
            assert time.monotonic() < deadline
            await asyncio.sleep(0.005)
        flight = cache._flights._flights["k"]
        follower = asyncio.create_task(cache.aget_or_load("k", load))
        await asyncio.sleep(0.01)
        assert flight.task is not None
        flight.task.cancel()  # as when the loop running the load shuts down
        try:
            return await asyncio.wait_for(asyncio.gather(leader, follower), 5)
        finally:
            await cache.aclose()

    with caplog.at_level(logging.ERROR, logger="asyncio"):
        assert asyncio.run(main()) == ["v", "v"]
        assert never_retrieved(caplog) == []
    assert calls == 2


@pytest.mark.parametrize("ending", ["custom", "GeneratorExit"])
def test_a_sync_loader_s_base_exception_in_a_load_thread_reaches_every_thread_once(
    cache: Cache, ending: str
) -> None:
    """With a timeout the load runs in a thread of its own: what ends it is the loader's own
    ending (nothing interrupts that thread), shared like an exception."""
    loader = EndingLoader(ending)
    barrier = threading.Barrier(20)
    got: list[BaseException] = []

    def call() -> None:
        barrier.wait()
        try:
            cache.get_or_load("k", loader, hard_timeout=5)
        except BaseException as exc:
            got.append(exc)

    threads = [threading.Thread(target=call, daemon=True) for _ in range(20)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(10)
    assert loader.calls == 1
    assert len(got) == 20 and len({id(e) for e in got}) == 1
    assert type(got[0]) is type(loader.error())
    assert cache.stats()["flights"] == 0


def test_a_sync_loader_s_base_exception_in_its_caller_s_thread_is_raised_once(
    cache: Cache,
) -> None:
    """Without a timeout the load runs in the caller's thread, and a ``BaseException`` there
    may be that caller's own interruption (``KeyboardInterrupt``, gevent's ``Timeout``): it
    goes to that caller; those queued behind it load again, each at most once."""
    loader = EndingLoader("custom")
    barrier = threading.Barrier(20)
    got: list[BaseException] = []

    def call() -> None:
        barrier.wait()
        try:
            cache.get_or_load("k", loader)
        except Abort as exc:
            got.append(exc)

    threads = [threading.Thread(target=call, daemon=True) for _ in range(20)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(20)
    assert len(got) == 20
    assert 1 <= loader.calls <= 20
    with pytest.raises(Abort):
        cache.get_or_load("alone", EndingLoader("custom", delay=0))
    assert cache.stats()["flights"] == 0


def lease_held(url: str, key: str) -> bool:
    client = redis_client(url)
    try:
        return bool(client.exists(f"cachelayer:v1:lease:{{{key}}}"))
    finally:
        client.close()


@pytest.mark.parametrize("ending", ["custom", "inner-cancelled"])
@pytest.mark.parametrize("answer", ["taken", "lost"])
def test_a_load_ended_by_its_own_base_exception_hands_its_lease_on(
    redis_url: str, ending: str, answer: str
) -> None:
    """Another process need not wait out the lease (60 s) of a load that ended so; nor when
    Redis took the lease but its answer was lost (the flight may hold it unawares)."""
    if ending == "inner-cancelled" and sys.version_info < (3, 11):
        pytest.skip("a loader's own CancelledError is told apart by 3.11's Task.cancelling()")
    cache = subscribed(Cache(redis_url, lease_ttl=60, jitter=0))
    other = subscribed(Cache(redis_url, lease_ttl=60, jitter=0))
    loader = EndingLoader(ending, delay=0.05)
    if answer == "lost":
        tier = cache._async_tier
        assert tier is not None
        acquire = tier.acquire

        async def lost(key: str, token: str, px: int) -> Any:
            await acquire(key, token, px)  # Redis takes the lease; its answer is lost
            return FAILED

        tier.acquire = lost  # type: ignore[method-assign]

    async def value() -> str:
        return "v"

    async def main() -> None:
        try:
            expected = Abort if ending == "custom" else asyncio.CancelledError
            with pytest.raises(expected):
                await asyncio.wait_for(cache.aget_or_load("k", loader.acall), 5)
            await asyncio.to_thread(wait_for, lambda: not lease_held(redis_url, "k"), 5)
            assert await asyncio.wait_for(other.aget_or_load("k", value), 5) == "v"
        finally:
            await cache.aclose()
            await other.aclose()

    asyncio.run(main())
    assert loader.calls == 1


def test_a_sync_load_ended_by_its_own_base_exception_hands_its_lease_on(redis_url: str) -> None:
    cache = subscribed(Cache(redis_url, lease_ttl=60, jitter=0))
    other = subscribed(Cache(redis_url, lease_ttl=60, jitter=0))
    loader = EndingLoader("custom", delay=0.05)
    try:
        for timeout in (None, 5.0):  # in the caller's thread, then in a load thread
            with pytest.raises(Abort):
                cache.get_or_load("k", loader, hard_timeout=timeout)
            wait_for(lambda: not lease_held(redis_url, "k"), 5)
        assert loader.calls == 2
        assert other.get_or_load("k", lambda: "v", hard_timeout=5) == "v"
    finally:
        cache.close()
        other.close()


def test_a_caller_whose_flights_keep_being_cancelled_elsewhere_loads_on_its_own(
    cache: Cache,
) -> None:
    """A caller retries a flight cancelled elsewhere, but a few times only: it never spins
    (where a loader's own CancelledError cannot be told apart, before Python 3.11, it is
    what bounds the calls)."""
    calls = 0

    async def load() -> str:
        nonlocal calls
        calls += 1
        flight = cache._flights._flights.get("k")
        if calls <= 50 and flight is not None and flight.task is asyncio.current_task():
            flight.task.cancel()  # the flight's task, not the caller, is cancelled
        await asyncio.sleep(0.01)
        return "v"

    async def main() -> Any:
        try:
            return await asyncio.wait_for(cache.aget_or_load("k", load), 5)
        finally:
            await cache.aclose()

    assert asyncio.run(main()) == "v"
    assert calls == 5  # a flight and three retries cancelled, then a load of its own


# --- closing with loads in flight ---------------------------------------------------------


@pytest.mark.parametrize("caller_cancelled", [False, True], ids=["waited-for", "abandoned"])
def test_aclose_ends_the_loads_in_flight_and_releases_their_leases(
    redis_url: str, caller_cancelled: bool
) -> None:
    # aclose waits for a load still running (its caller gets the value), or for the lease
    # release of a load its caller abandoned: either way the lease is released, and no
    # client is reopened after the cache closed (on a Cluster that showed as "Unclosed
    # RedisCluster client" at exit).
    namespace = f"settle-{caller_cancelled}"

    async def main() -> tuple[Cache, Any]:
        cache = Cache(redis_url, namespace=namespace, lease_ttl=60)
        started = asyncio.Event()

        async def load() -> str:
            started.set()
            await asyncio.sleep(30 if caller_cancelled else 0.3)
            return "v"

        caller = asyncio.ensure_future(cache.aget_or_load("k", load))
        await started.wait()
        if caller_cancelled:
            caller.cancel()
        await cache.aclose(timeout=2.0)
        got = await asyncio.gather(caller, return_exceptions=True)
        return cache, got[0]

    cache, got = asyncio.run(main())
    try:
        assert cache._clients._async_owned == {}  # nothing reopened it
        assert not cache._background
        _, lease, _, _ = cache._rkeys.coordination("k")
        client = redis_client(redis_url)
        try:
            assert client.exists(lease) == 0
        finally:
            client.close()
        if caller_cancelled:
            assert isinstance(got, asyncio.CancelledError)
            assert cache.get("k") is None
        else:
            assert got == "v"
            assert cache.get("k") == "v"  # stored before the cache closed
    finally:
        cache.close()
