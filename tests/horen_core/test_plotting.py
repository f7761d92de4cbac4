"""`horen eval --plot`: checkpoint series in edit order with the final summary last, a PNG written,
a clear error for a report with nothing to draw."""

from __future__ import annotations

import pytest

from horen_core.evaluate import summarize
from horen_core.plotting import checkpoint_series, plot_checkpoints

REPORT = {
    "checkpoints": {
        "20": {"n": 20, "rewrite_acc": 1.0, "locality": 0.95, "keys": 20},
        "10": {"n": 10, "rewrite_acc": 1.0, "rephrase_acc": 0.9, "locality": 1.0},
    },
    "summary": {"n": 30, "rewrite_acc": 0.9, "rephrase_acc": 0.8, "locality": 0.9, "median_s": 1.2},
}


def test_series_are_in_edit_order_and_end_with_the_summary():
    s = checkpoint_series(REPORT)
    assert s["rewrite_acc"] == [(10, 1.0), (20, 1.0), (30, 0.9)]
    assert s["rephrase_acc"] == [(10, 0.9), (30, 0.8)]  # a checkpoint without the field is skipped
    assert "keys" not in s and "median_s" not in s  # only rates are drawn


def test_plot_writes_a_png(tmp_path):
    pytest.importorskip("matplotlib")
    out = plot_checkpoints(REPORT, tmp_path / "m.png", title="t")
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert out.stat().st_size > 5000


def test_a_report_without_rates_is_refused(tmp_path):
    with pytest.raises(ValueError, match="no metrics"):
        plot_checkpoints({"summary": {"n": 3, "keys": 3}}, tmp_path / "m.png")


def test_overall_is_the_mean_of_the_papers_three():
    rows = [{"rewrite_acc": 1.0, "rephrase_acc": 0.5, "locality": 1.0}, {"rewrite_acc": 1.0, "rephrase_acc": 1.0}]
    s = summarize(rows)
    assert s["overall"] == round((1.0 + 0.75 + 1.0) / 3, 4)
    assert summarize([{"rewrite_acc": 0.5}])["overall"] == 0.5
