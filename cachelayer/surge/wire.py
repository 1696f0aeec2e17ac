"""A minimal HTTP/1.1 GET client over keep-alive loopback connections.

The served replay needs its load generator to be cheaper than the server it loads: httpx
spends about a millisecond of CPU per request, which at a few hundred requests per second
makes the generator, not the shop, the thing that falls behind. This client does only what
the replay needs (GET, Content-Length bodies, keep-alive) and nothing else.
"""

from __future__ import annotations

import asyncio


class WireError(Exception):
    """The server closed the connection or answered something this client cannot read."""


class LoopbackClient:
    """GETs against ``127.0.0.1:port``; idle connections are reused, broken ones dropped."""

    def __init__(self, port: int) -> None:
        self._port = port
        self._idle: list[tuple[asyncio.StreamReader, asyncio.StreamWriter]] = []
        self._open: set[asyncio.StreamWriter] = set()

    async def get(self, path: str, headers: dict[str, str]) -> int:
        """The response's status code; the body is read and discarded."""
        if self._idle:
            reader, writer = self._idle.pop()
        else:
            try:
                reader, writer = await asyncio.open_connection("127.0.0.1", self._port)
            except OSError as exc:
                raise WireError(f"cannot connect: {exc}") from exc
            self._open.add(writer)
        reusable = False
        try:
            extra = "".join(f"{k}: {v}\r\n" for k, v in headers.items())
            writer.write(f"GET {path} HTTP/1.1\r\nhost: 127.0.0.1\r\n{extra}\r\n".encode())
            head = await reader.readuntil(b"\r\n\r\n")
            status, length, keep_alive = _parse_head(head)
            await reader.readexactly(length)
            reusable = keep_alive
            return status
        except (OSError, asyncio.IncompleteReadError, asyncio.LimitOverrunError) as exc:
            raise WireError(f"connection failed: {exc}") from exc
        finally:
            # A cancelled or failed request leaves the connection mid-response: never reuse it.
            if reusable:
                self._idle.append((reader, writer))
            else:
                self._open.discard(writer)
                writer.close()

    async def aclose(self) -> None:
        writers, self._open, self._idle = self._open, set(), []
        for writer in writers:
            writer.close()
        for writer in writers:
            try:
                await writer.wait_closed()
            except OSError:
                pass


def _parse_head(head: bytes) -> tuple[int, int, bool]:
    lines = head.decode("latin-1").split("\r\n")
    try:
        status = int(lines[0].split(" ", 2)[1])
    except (IndexError, ValueError):
        raise WireError(f"not an HTTP status line: {lines[0]!r}") from None
    length, keep_alive = -1, True
    for line in lines[1:]:
        name, _, value = line.partition(":")
        name = name.strip().lower()
        if name == "content-length":
            length = int(value)
        elif name == "connection" and value.strip().lower() == "close":
            keep_alive = False
    if length < 0:
        raise WireError("response without Content-Length")
    return status, length, keep_alive
