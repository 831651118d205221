"""Leaderboards: the regression check catches drops, and CI re-checks a committed baseline on the embedded model."""

from __future__ import annotations

import json
from pathlib import Path

import pandas as pd
import pytest

from harness.leaderboard import check
from harness.results import summarize

ROOT = Path(__file__).resolve().parent.parent


def _records(method: str, scores: list[float], ratio: float) -> list[dict]:
    return [{"model": "m", "task": "t", "length": 1024, "method": method, "index": i, "seed": 0, "query_aware": False,
             "score": s, "compression_ratio": ratio} for i, s in enumerate(scores)]


def _write(run: Path, recs: list[dict]) -> None:
    run.mkdir(parents=True, exist_ok=True)
    (run / "results.jsonl").write_text("".join(json.dumps(r) + "\n" for r in recs))


def test_check_passes_equal_and_fails_on_drops(tmp_path, capsys):
    base = _records("full", [1, 1, 1, 1], 1.0) + _records("kivi", [1, 1, 0, 1], 4.0)
    summarize(base).to_csv(tmp_path / "base.csv", index=False)
    _write(tmp_path / "same", base)
    assert check(tmp_path / "same", tmp_path / "base.csv") == 0
    _write(tmp_path / "worse", _records("full", [1, 1, 1, 1], 1.0) + _records("kivi", [0, 0, 0, 0], 4.0))
    assert check(tmp_path / "worse", tmp_path / "base.csv") == 1
    assert "REGRESSION" in capsys.readouterr().out
    _write(tmp_path / "uncompressed", _records("full", [1, 1, 1, 1], 1.0) + _records("kivi", [1, 1, 0, 1], 1.0))
    assert check(tmp_path / "uncompressed", tmp_path / "base.csv") == 1
    _write(tmp_path / "missing", _records("full", [1, 1, 1, 1], 1.0))
    assert check(tmp_path / "missing", tmp_path / "base.csv") == 1


@pytest.mark.slow
def test_ci_leaderboard_still_holds(tmp_path):
    """Re-run the committed CI leaderboard's command (leaderboards/README.md) and compare (deterministic, greedy)."""
    from harness.cli import main

    board = ROOT / "leaderboards" / "ci-smollm2-1k.csv"
    methods = ",".join(pd.read_csv(board)["method"].unique())
    rc = main(["run", "--methods", methods, "--tasks", "niah_single_1", "--lengths", "1k", "--samples", "2",
               "--max-new-tokens", "24", "--out", str(tmp_path), "--no-progress"])
    assert rc == 0
    assert main(["check", str(tmp_path), "--baseline", str(board)]) == 0
