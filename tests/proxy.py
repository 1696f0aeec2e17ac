"""A loopback TCP proxy the tests steer, to make Redis slow, flaky or silent for real.

Modes, switchable at any time (they apply to bytes in flight and to new connections):

* ``"pass"``: forward both ways;
* ``"delay"``: forward after ``delay`` seconds;
* ``"drop"``: close every connection (existing ones too), refuse-like;
* ``"blackhole"``: accept, read and discard; never answer (the worst case: a timeout).

Listens on 127.0.0.1 only and stops with the context manager.
"""

from __future__ import annotations

import select
import socket
import threading
import time
from typing import Any


class Proxy:
    def __init__(self, target_port: int) -> None:
        self.target = ("127.0.0.1", target_port)
        self.mode = "pass"
        self.delay = 0.0
        self._server = socket.create_server(("127.0.0.1", 0))
        self._server.settimeout(0.1)
        self.port: int = self._server.getsockname()[1]
        self._stop = threading.Event()
        self._conns: list[socket.socket] = []
        self._lock = threading.Lock()
        self._threads: list[threading.Thread] = []

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def set_mode(self, mode: str, delay: float = 0.0) -> None:
        assert mode in ("pass", "delay", "drop", "blackhole")
        self.mode, self.delay = mode, delay
        if mode == "drop":
            with self._lock:
                conns, self._conns = self._conns, []
            for c in conns:
                _close(c)

    def __enter__(self) -> Proxy:
        t = threading.Thread(target=self._accept_loop, daemon=True)
        t.start()
        self._threads.append(t)
        return self

    def __exit__(self, *exc: Any) -> None:
        self._stop.set()
        for t in self._threads:
            t.join(2)
        _close(self._server)
        with self._lock:
            for c in self._conns:
                _close(c)

    def _accept_loop(self) -> None:
        while not self._stop.is_set():
            try:
                client, _ = self._server.accept()
            except OSError:
                continue
            if self.mode == "drop":
                _close(client)
                continue
            try:
                upstream = socket.create_connection(self.target, timeout=1)
            except OSError:
                _close(client)
                continue
            with self._lock:
                self._conns += [client, upstream]
            t = threading.Thread(target=self._pump, args=(client, upstream), daemon=True)
            t.start()

    def _pump(self, client: socket.socket, upstream: socket.socket) -> None:
        peers = {client: upstream, upstream: client}
        try:
            while not self._stop.is_set():
                ready, _, _ = select.select(list(peers), [], [], 0.1)
                for sock in ready:
                    data = sock.recv(65536)
                    if not data:
                        return
                    if self.mode == "blackhole":
                        continue
                    if self.mode == "delay":
                        time.sleep(self.delay)
                    peers[sock].sendall(data)
        except (OSError, ValueError):  # a socket closed under us by set_mode("drop")
            return
        finally:
            _close(client)
            _close(upstream)


def _close(sock: socket.socket) -> None:
    try:
        sock.close()
    except OSError:
        pass
