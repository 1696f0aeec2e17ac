"""The documentation stays true: its runnable blocks run, its alert rules and dashboard name
only metrics the library exports, and promtool accepts (and unit-tests) the rules."""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from conftest import missing
from test_metrics import EXPORTED

ROOT = Path(__file__).resolve().parent.parent
DOCS = ROOT / "docs"
OPS = DOCS / "operations"
# A block that claims to run: an HTML comment `<!-- run -->` on the line before ```python.
RUNNABLE = re.compile(r"<!-- run -->\n```python\n(.*?)\n```", re.S)
METRIC = re.compile(r"\bcachelayer_[a-z0-9_]+")


def runnable_blocks() -> list[tuple[str, str]]:
    found = []
    for page in sorted(DOCS.rglob("*.md")):
        text = page.read_text()
        for match in RUNNABLE.finditer(text):
            line = text.count("\n", 0, match.start()) + 2
            found.append((f"{page.relative_to(DOCS)}:{line}", match.group(1)))
    return found


BLOCKS = runnable_blocks()


def test_every_guide_has_runnable_blocks_each_marker_touching_its_block() -> None:
    pages = {where.split(":")[0] for where, _ in BLOCKS}
    assert {
        "quickstart.md",
        "guides/fastapi.md",
        "guides/starlette.md",
        "guides/wsgi.md",
        "operations/metrics.md",
    } <= pages
    # A ```python block right after a <!-- run --> marker must not be separated by a blank
    # line (the marker would then silently not apply).
    for page in DOCS.rglob("*.md"):
        assert "<!-- run -->\n\n```" not in page.read_text(), page


@pytest.mark.parametrize(("where", "code"), BLOCKS, ids=[where for where, _ in BLOCKS])
def test_runnable_doc_block(where: str, code: str, tmp_path: Path) -> None:
    # Each block in a fresh interpreter: blocks are self-contained, as a reader would run them.
    # L1 only: REDIS_URL is removed so a developer's own Redis is never written to.
    env = {k: v for k, v in os.environ.items() if k != "REDIS_URL"}
    done = subprocess.run(
        [sys.executable, "-c", code], cwd=tmp_path, env=env, capture_output=True, text=True
    )
    assert done.returncode == 0, f"{where} failed:\n{done.stderr}"


@pytest.mark.redis
@pytest.mark.parametrize(
    ("where", "code"),
    [b for b in BLOCKS if "REDIS_URL" in b[1]],
    ids=[w for w, c in BLOCKS if "REDIS_URL" in c],
)
def test_runnable_doc_block_with_redis(
    where: str, code: str, redis_url: str, tmp_path: Path
) -> None:
    env = {**os.environ, "REDIS_URL": redis_url}
    done = subprocess.run(
        [sys.executable, "-c", code], cwd=tmp_path, env=env, capture_output=True, text=True
    )
    assert done.returncode == 0, f"{where} failed with Redis:\n{done.stderr}"


def exported(name: str) -> bool:
    for suffix in ("_bucket", "_count", "_sum"):
        if name.endswith(suffix) and name.removesuffix(suffix) in EXPORTED:
            return True
    return name in EXPORTED


def rules() -> list[dict[str, str]]:
    doc = yaml.safe_load((OPS / "alerts.yml").read_text())
    return [rule for group in doc["groups"] for rule in group["rules"]]


def test_the_metrics_page_documents_every_exported_name() -> None:
    page = (OPS / "metrics.md").read_text()
    for name in sorted(EXPORTED):
        assert f"`{name}`" in page, f"{name} is exported but not in docs/operations/metrics.md"


def test_alert_rules_name_only_exported_metrics() -> None:
    for rule in rules():
        for name in METRIC.findall(rule["expr"]):
            assert exported(name), f"{rule.get('alert') or rule['record']}: {name} is not exported"


def test_the_issue_s_alerts_exist_each_with_a_runbook_section() -> None:
    alerts = {rule["alert"]: rule for rule in rules() if "alert" in rule}
    assert {
        "CachelayerOriginSaturated",
        "CachelayerOriginShedding",
        "CachelayerHitRatioCollapse",
        "CachelayerStaleServingHigh",
        "CachelayerRedisCircuitOpen",
        "CachelayerInvalidationSubscriptionLost",
    } <= set(alerts)
    runbooks = (OPS / "runbooks.md").read_text()
    for name, rule in alerts.items():
        assert f"\n## {name}\n" in runbooks, f"no runbook section for {name}"
        assert rule["annotations"]["runbook"].endswith(f"runbooks.md#{name.lower()}")


def dashboard_exprs() -> list[str]:
    board = json.loads((OPS / "dashboard.json").read_text())
    exprs = [t["expr"] for panel in board["panels"] for t in panel["targets"]]
    return [
        e.replace("$__rate_interval", "5m").replace("$job", ".*").replace("$cache", ".*")
        for e in exprs
    ]


def test_the_dashboard_names_only_exported_metrics() -> None:
    exprs = dashboard_exprs()
    assert len(exprs) >= 15
    for expr in exprs:
        for name in METRIC.findall(expr):
            assert exported(name), f"dashboard: {name} is not exported"


def test_the_dashboard_has_the_issue_s_panels() -> None:
    board = json.loads((OPS / "dashboard.json").read_text())
    titles = {panel["title"] for panel in board["panels"]}
    assert {
        "Hit ratio per tier",
        "DB queries saved vs made",
        "Loads in flight vs origin limit",
        "Stale served and loads shed",
        "Load latency (database)",
    } <= titles


def promtool() -> str:
    found = shutil.which("promtool")
    if found is None:
        missing("promtool is not installed (Debian: apt-get install prometheus)")
    assert found
    return found


def test_promtool_accepts_the_rules() -> None:
    subprocess.run([promtool(), "check", "rules", "alerts.yml"], cwd=OPS, check=True)


def test_promtool_unit_tests_of_the_alerts_pass() -> None:
    subprocess.run([promtool(), "test", "rules", "alerts_test.yml"], cwd=OPS, check=True)


def test_promtool_parses_every_dashboard_query(tmp_path: Path) -> None:
    # promtool has no PromQL linter of its own; recording rules are PromQL it must parse.
    group = {
        "name": "dashboard",
        "rules": [
            {"record": f"dashboard:q{i}", "expr": e} for i, e in enumerate(dashboard_exprs())
        ],
    }
    path = tmp_path / "dashboard_rules.yml"
    path.write_text(yaml.safe_dump({"groups": [group]}))
    subprocess.run([promtool(), "check", "rules", str(path)], check=True)
