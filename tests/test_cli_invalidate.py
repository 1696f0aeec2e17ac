"""``cachelayer invalidate`` against a real Redis, and its errors."""

from __future__ import annotations

import subprocess
import sys
import time

import pytest
from conftest import subscribed

from cachelayer import Cache

pytestmark = pytest.mark.redis


def run(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "cachelayer", "invalidate", *args],
        capture_output=True,
        text=True,
        timeout=60,
    )


def test_it_invalidates_keys_and_tags_in_a_running_process(redis_url: str) -> None:
    cache = subscribed(Cache(redis_url, namespace="shop"))
    cache.set("product:1", "old")
    cache.set("page:home", "old", tags=("catalog",))
    cache.set("untouched", "kept")
    out = run("--redis", redis_url, "--namespace", "shop", "--key", "product:1", "--tag", "catalog")
    assert out.returncode == 0, out.stderr
    assert "deleted key 'product:1'" in out.stdout
    assert "invalidated tag 'catalog'" in out.stdout
    deadline = time.monotonic() + 5
    while "product:1" in cache._l1.data or "page:home" in cache._l1.data:
        assert time.monotonic() < deadline, "the running process did not hear it"
        time.sleep(0.01)
    assert cache.get("product:1") is None
    assert cache.get("page:home") is None
    assert cache.get("untouched") == "kept"
    cache.close()


def test_expire_marks_keys_stale(redis_url: str) -> None:
    cache = subscribed(Cache(redis_url, namespace="shop"))
    cache.set("k", "v")
    out = run("--redis", redis_url, "--namespace", "shop", "--key", "k", "--expire")
    assert out.returncode == 0, out.stderr
    assert "expired key 'k'" in out.stdout
    cache.close()


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--redis", "redis://127.0.0.1:1/0", "--namespace", "shop", "--key", "k"], "error"),
        (["--redis", "not a url", "--namespace", "shop", "--key", "k"], "malformed redis URL"),
        (["--redis", "redis://127.0.0.1:6379/0", "--namespace", "shop"], "at least one"),
        (["--redis", "redis://127.0.0.1:6379/0", "--namespace", "a b", "--key", "k"], "namespace"),
    ],
)
def test_bad_input_gets_a_clear_message_and_a_nonzero_exit(args: list[str], message: str) -> None:
    out = run(*args)
    assert out.returncode != 0
    assert message in out.stderr
    assert "Traceback" not in out.stderr
