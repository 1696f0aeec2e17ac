"""Helpers for tests of code that uses cachelayer (and for cachelayer's own tests)."""

from __future__ import annotations

import socket
import subprocess
import threading
import time
from typing import Any


def redis_client(url: str, timeout: float = 5.0) -> Any:
    """A sync redis-py client for any URL a ``Cache`` accepts (``redis+cluster://`` gives a
    ``RedisCluster``, ``redis+sentinel://`` the primary's client), to look at or tamper with
    what the cache stored. The caller closes it."""
    from ._clients import Clients

    return Clients(url, timeout).sync_client()


class FakeClock:
    """A wall clock that moves only when told to: pass it as ``Cache(clock=...)``.

    Thread-safe, so concurrent tests can advance it while callers read it.
    """

    def __init__(self, start: float = 1_700_000_000.0) -> None:
        self._now = float(start)
        self._lock = threading.Lock()

    def __call__(self) -> float:
        return self._now

    def advance(self, seconds: float) -> float:
        if seconds < 0:
            raise ValueError("time does not run backwards")
        with self._lock:
            self._now += seconds
            return self._now

    def set(self, now: float) -> None:
        with self._lock:
            self._now = float(now)


class RedisServer:
    """A private, throwaway ``redis-server`` on a free loopback port (no persistence).

    Used as a context manager; ``stop()`` and ``start()`` may be called in between to test
    what happens when Redis goes away and comes back (empty, as after a real restart).
    """

    def __init__(self, binary: str | None = None, port: int | None = None) -> None:
        import shutil

        found = binary or shutil.which("redis-server")
        if found is None:
            raise FileNotFoundError("redis-server is not installed")
        self.binary = found
        self.port = port or free_port()
        self._proc: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def start(self, timeout: float = 10.0) -> RedisServer:
        args = [self.binary, "--bind", "127.0.0.1", "--port", str(self.port), "--save", ""]
        args += ["--appendonly", "no", "--protected-mode", "yes", "--loglevel", "warning"]
        self._proc = subprocess.Popen(args, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self._proc.poll() is not None:
                raise RuntimeError(f"redis-server exited with {self._proc.returncode}")
            try:
                with socket.create_connection(("127.0.0.1", self.port), timeout=0.2) as s:
                    s.sendall(b"PING\r\n")
                    if s.recv(16).startswith(b"+PONG"):
                        return self
            except OSError:
                time.sleep(0.02)
        self.stop()
        raise RuntimeError(f"redis-server did not answer on port {self.port} in {timeout}s")

    def stop(self) -> None:
        proc, self._proc = self._proc, None
        if proc is not None and proc.poll() is None:
            proc.kill()
            proc.wait(timeout=10)

    def __enter__(self) -> RedisServer:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on right now."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])
