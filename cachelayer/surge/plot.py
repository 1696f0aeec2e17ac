"""A PNG of a replay over time: requests/s, DB queries/s and p99 latency, both runs.

matplotlib is imported here only, when a plot is asked for (``benchmarks/surge.py``).
"""

from __future__ import annotations

from typing import Any

COLORS = {"no cache": "#c0392b", "cachelayer": "#2471a3"}


def plot(result: dict[str, Any], path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")  # files only: never open a window, work without a display
    import matplotlib.pyplot as plt

    panels = (
        ("ok_per_s", "answered OK /s", False),
        ("db_queries_per_s", "DB queries /s", False),
        ("p99_ms", "p99 latency (ms, log)", True),
    )
    fig, axes = plt.subplots(len(panels), 1, figsize=(9, 8), sharex=True)
    brown = next(p for p in result["phases"] if p["name"] == "brown-out")
    first = result["runs"][0]["timeline"]
    axes[0].plot(
        *_steps(first, "requests_per_s"), color="#7f8c8d", ls="--", label="scheduled (both runs)"
    )
    for ax, (field, label, log) in zip(axes, panels, strict=True):
        for run in result["runs"]:
            xs, ys = _steps(run["timeline"], field)
            ax.plot(xs, ys, label=run["name"], color=COLORS.get(run["name"]))
        ax.axvspan(brown["start"], brown["end"], color="#f5b041", alpha=0.2, lw=0)
        ax.set_ylabel(label)
        if log:
            ax.set_yscale("log")
        ax.grid(True, alpha=0.3)
    axes[0].legend(loc="upper left")
    axes[-1].set_xlabel("seconds into the run (shaded: brown-out)")
    sc = result["scenario"]
    fig.suptitle(
        f"surge replay: {sc['rate']:g} -> {sc['rate'] * sc['surge']:g} req/s, "
        f"{result['database']}, pool {sc['pool_size']}, cache {result['cache_tiers']}, "
        f"TTL {sc['ttl']:g} s",
        fontsize=10,
    )
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def _steps(points: list[dict[str, Any]], field: str) -> tuple[list[float], list[float]]:
    """Each bucket drawn as a flat step over its whole width; gaps (no data) stay gaps."""
    xs: list[float] = []
    ys: list[float] = []
    width = points[1]["t"] - points[0]["t"] if len(points) > 1 else 0.5
    for p in points:
        value = p[field]
        y = float("nan") if value is None else float(value)
        xs += [p["t"], p["t"] + width]
        ys += [y, y]
    return xs, ys
