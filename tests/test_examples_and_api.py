"""Every example runs; the public surface is what __all__ says."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

import cachelayer
import cachelayer.exceptions

ROOT = Path(__file__).resolve().parent.parent


def run_example(name: str, redis_url: str | None) -> str:
    env = {k: v for k, v in os.environ.items() if k != "REDIS_URL"}
    if redis_url:
        env["REDIS_URL"] = redis_url
    out = subprocess.run(
        [sys.executable, str(ROOT / "examples" / name)],
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
        check=True,
    )
    return out.stdout


def test_slow_query_example_runs_l1_only() -> None:
    out = run_example("slow_query.py", None)
    assert "L1 only" in out
    assert re.search(r"database queries issued:\s+1$", out, re.M)


@pytest.mark.redis
def test_slow_query_example_runs_with_redis(redis_url: str) -> None:
    out = run_example("slow_query.py", redis_url)
    assert "L1 + Redis" in out
    assert re.search(r"database queries issued:\s+1$", out, re.M)


def test_all_is_sorted_and_complete() -> None:
    assert cachelayer.__all__ == sorted(cachelayer.__all__)
    public = {n for n in dir(cachelayer) if not n.startswith("_")}
    modules = {"exceptions", "testing", "asgi", "metrics", "cli", "surge"}
    assert public - modules == set(cachelayer.__all__)
    for name in cachelayer.exceptions.__all__:
        assert getattr(cachelayer, name) is getattr(cachelayer.exceptions, name)


def test_every_error_is_a_cache_error_and_a_familiar_builtin() -> None:
    e = cachelayer.exceptions
    assert issubclass(e.ConfigurationError, (e.CacheError, ValueError))
    assert issubclass(e.SerializationError, ValueError)
    assert issubclass(e.InvalidKeyError, TypeError)
    for name in e.__all__:
        assert issubclass(getattr(e, name), e.CacheError)


def test_importing_cachelayer_imports_no_optional_dependency() -> None:
    code = (
        "import sys, cachelayer; "
        "bad = [m for m in ('starlette', 'prometheus_client', 'uvicorn', 'asyncpg') "
        "if m in sys.modules]; print(bad)"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"
