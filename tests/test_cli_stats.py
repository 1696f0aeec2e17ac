"""``cachelayer stats``: what Redis holds for a namespace, and clear failures."""

from __future__ import annotations

import argparse
import json

import pytest

from cachelayer import Cache
from cachelayer._cli_stats import add_stats, kind_of
from cachelayer.testing import free_port


def run(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="cachelayer")
    add_stats(parser.add_subparsers())
    args = parser.parse_args(["stats", *argv])
    return args.handler(args)  # type: ignore[no-any-return]


def test_record_kinds_follow_the_key_layout() -> None:
    assert kind_of("{product:1}") == "values"
    assert kind_of("lease:{product:1}") == "leases"
    assert kind_of("fence:{product:1}") == "fences"
    assert kind_of("wait:{product:1}") == "waits"
    assert kind_of("tag:{catalog}") == "tags"
    assert kind_of("something-else") == "other"


@pytest.mark.redis
def test_stats_counts_records_by_kind_and_lists_tag_versions(
    redis_url: str, capsys: pytest.CaptureFixture[str]
) -> None:
    with Cache(redis_url, namespace="shop") as cache:
        for i in range(30):
            cache.get_or_load(f"product:{i}", lambda: {"id": 1}, tags=("catalog",))
        cache.delete("product:0")  # leaves a fence
        cache.invalidate_tags("catalog")
        cache.invalidate_tags("catalog", "promo")
    with Cache(redis_url, namespace="other") as other:
        other.set("unrelated", 1)
    assert run(["--redis", redis_url, "--namespace", "shop", "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["kinds"]["values"]["keys"] == 29
    assert report["kinds"]["fences"]["keys"] >= 1
    assert report["kinds"]["tags"]["keys"] == 2
    assert report["kinds"]["values"]["estimated_bytes"] > 0
    assert report["tag_versions"]["shown"] == {"catalog": 2, "promo": 1}
    assert report["kinds"]["other"]["keys"] == 0  # the other namespace is not counted


@pytest.mark.redis
def test_stats_prints_a_table_sampling_a_bounded_number_of_keys(
    redis_url: str, capsys: pytest.CaptureFixture[str]
) -> None:
    with Cache(redis_url, namespace="shop") as cache:
        for i in range(20):
            cache.set(f"k{i}", "x" * 100)
    assert run(["--redis", redis_url, "--namespace", "shop", "--sample", "5"]) == 0
    out = capsys.readouterr().out
    assert "namespace 'shop'" in out
    values = next(line for line in out.splitlines() if line.startswith("values"))
    assert values.split()[1:3] == ["20", "5"]


def test_an_unreachable_server_is_one_clear_line_and_status_1(
    capsys: pytest.CaptureFixture[str],
) -> None:
    url = f"redis://:secret@127.0.0.1:{free_port()}/0"
    assert run(["--redis", url, "--namespace", "shop"]) == 1
    err = capsys.readouterr().err
    assert err.startswith("cachelayer stats: error: cannot read Redis at 127.0.0.1:")
    assert "secret" not in err
    assert "Traceback" not in err


def test_a_bad_url_is_one_clear_line_and_status_1(capsys: pytest.CaptureFixture[str]) -> None:
    assert run(["--redis", "http://example.com", "--namespace", "shop"]) == 1
    assert "cachelayer stats: error:" in capsys.readouterr().err


def test_a_bad_namespace_is_refused(capsys: pytest.CaptureFixture[str]) -> None:
    assert run(["--redis", "redis://127.0.0.1:1/0", "--namespace", "has space"]) == 1
    assert "namespace" in capsys.readouterr().err
