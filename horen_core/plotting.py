"""Plots of `horen eval` reports. matplotlib is optional: only ``plot_checkpoints`` imports it."""

from __future__ import annotations

from pathlib import Path

# the summary fields that are rates in [0, 1], drawn against the number of edits when present
RATE_FIELDS = (
    "rewrite_acc",
    "rephrase_acc",
    "locality",
    "overall",
    "rewrite_contains",
    "rephrase_contains",
    "chat_rewrite_contains",
    "chat_rephrase_contains",
    "locality_free",
    "specificity",
    "portability",
    "fluency_ratio",
)


def checkpoint_series(report: dict) -> dict[str, list[tuple[int, float]]]:
    """Each rate field's (edits made, value) over the report's checkpoints and its final summary."""
    points = [*report.get("checkpoints", {}).values()]
    if "summary" in report:
        points.append(report["summary"])
    series: dict[str, list[tuple[int, float]]] = {}
    for point in sorted(points, key=lambda p: p["n"]):
        for name in RATE_FIELDS:
            if isinstance(point.get(name), (int, float)):
                series.setdefault(name, []).append((int(point["n"]), float(point[name])))
    return series


def plot_checkpoints(report: dict, path: str | Path, title: str = "") -> Path:
    """Writes a PNG of every rate metric against the number of edits; raises ``ValueError`` when the
    report has none, ``ImportError`` with the install hint when matplotlib is missing."""
    series = checkpoint_series(report)
    if not series:
        raise ValueError("the report has no metrics to plot")
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError as exc:
        raise ImportError("--plot needs matplotlib: pip install 'horen-server[eval]'") from exc
    fig, ax = plt.subplots(figsize=(8, 5), dpi=120)
    for name, pts in series.items():
        xs, ys = zip(*pts)
        ax.plot(xs, ys, marker="o", label=name)
    ax.set_xlabel("sequential edits")
    ax.set_ylabel("score")
    ax.set_ylim(0, max(1.05, max(y for pts in series.values() for _, y in pts) + 0.05))
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7, loc="lower left", ncol=2)
    if title:
        ax.set_title(title, fontsize=9)
    fig.tight_layout()
    out = Path(path)
    fig.savefig(out)
    plt.close(fig)
    return out
