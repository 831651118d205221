"""Leaderboards: committed summary CSVs, and the regression check of a fresh run against one."""

from __future__ import annotations

from pathlib import Path

import pandas as pd

from harness.errors import UserError
from harness.results import RESULTS, read_records, summarize


def load_csv(path: Path) -> pd.DataFrame:
    try:
        df = pd.read_csv(path)
    except (OSError, pd.errors.ParserError, pd.errors.EmptyDataError) as e:
        raise UserError(f"cannot read leaderboard {path}: {e}") from None
    need = {"method", "task", "length", "score", "score_ci95"}
    if not need <= set(df.columns):
        raise UserError(f"leaderboard {path} lacks columns {sorted(need - set(df.columns))}")
    return df


def check(run_dir: Path, baseline: Path, tolerance: float = 0.0) -> int:
    """Exit status 1 if any (method, task, length) in both scores below baseline - CI - tolerance; else 0.

    Also fails when a cell of the baseline is missing from the run, or when the compression ratio of a cell fell
    (a method that silently stopped compressing is a regression too).
    """
    path = run_dir / RESULTS
    if not path.exists():
        raise UserError(f"no results in {run_dir} (expected {path})")
    new = summarize(read_records(path)).set_index(["method", "task", "length"])
    old = load_csv(baseline).set_index(["method", "task", "length"])
    failures = []
    for key, row in old.iterrows():
        if key not in new.index:
            failures.append(f"{key}: missing from the run")
            continue
        cur = new.loc[key]
        ci = max(float(row.get("score_ci95", 0) or 0), float(cur.get("score_ci95", 0) or 0))
        ci = 0.0 if pd.isna(ci) else ci
        if cur["score"] < row["score"] - ci - tolerance:
            failures.append(f"{key}: score {cur['score']:.3f} < baseline {row['score']:.3f} - {ci + tolerance:.3f}")
        if "compression_ratio" in row and pd.notna(row["compression_ratio"]) and \
                cur["compression_ratio"] < 0.99 * row["compression_ratio"]:
            failures.append(f"{key}: compression {cur['compression_ratio']:.3f} < baseline "
                            f"{row['compression_ratio']:.3f}")
    for f in failures:
        print("REGRESSION", f)
    print(f"checked {len(old)} cells against {baseline}: {'FAIL' if failures else 'ok'}")
    return 1 if failures else 0
