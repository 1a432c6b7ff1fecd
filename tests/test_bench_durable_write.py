"""bench/durable_write.py: each row comes from real appends synced to the directory it is given,
and it leaves nothing behind there."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO / "bench"))
import durable_write  # noqa: E402


def test_it_measures_synced_appends_at_both_pauses_and_cleans_up(tmp_path):
    figures = durable_write.measure(tmp_path, 5)
    assert set(figures) == {f"every {gap:g} ms" for gap in durable_write.GAPS_MS}
    for row in figures.values():
        assert 0 < row["p50_us"] <= row["p90_us"], row
        assert row["mean_us"] > 0
    assert list(tmp_path.iterdir()) == []


def test_a_directory_it_cannot_write_is_an_error_not_a_figure(tmp_path):
    with pytest.raises(FileNotFoundError):
        durable_write.measure(tmp_path / "gone", 1)
