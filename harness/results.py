"""Results: one JSON line per (model, task, length, method spec, sample) and pandas summaries of them.

Appends are atomic (one ``os.write`` of a whole line on an ``O_APPEND`` descriptor), re-runs skip finished samples,
and a corrupt file is reported, never rewritten.
"""

from __future__ import annotations

import json
import math
import os
from pathlib import Path

import pandas as pd

from harness.errors import UserError

RESULTS = "results.jsonl"
KEY = ("model", "task", "length", "method", "index", "seed", "query_aware")


def record_key(rec: dict) -> tuple:
    return tuple(rec[k] for k in KEY)


def read_records(path: Path) -> list[dict]:
    """All records of a results file; a corrupt line is a :class:`UserError` naming the file and line."""
    if not path.exists():
        return []
    out = []
    with open(path, encoding="utf-8") as f:
        for i, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                rec = json.loads(line)
                record_key(rec)
            except (json.JSONDecodeError, KeyError, TypeError):
                raise UserError(f"results file {path} is corrupt at line {i}: fix or delete that line "
                                f"(the other records are kept)") from None
            out.append(rec)
    return out


def append_record(path: Path, rec: dict) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    data = (json.dumps(rec, sort_keys=True) + "\n").encode()
    fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
    try:
        os.write(fd, data)
        os.fsync(fd)
    finally:
        os.close(fd)


def _ci95(x: pd.Series) -> float:
    n = x.count()
    return float(1.96 * x.std(ddof=1) / math.sqrt(n)) if n > 1 else float("nan")


SUMMARY_COLUMNS = {
    "score": "mean",
    "compression_ratio": "mean",
    "bits_per_element": "mean",
    "tokens_kept": "mean",
    "kv_bytes_prefill": "mean",
    "ttft_s": "mean",
    "tpot_s": "mean",
    "peak_mem_bytes": "mean",
}


def summarize(records: list[dict], baseline: str = "full") -> pd.DataFrame:
    """Mean and 95% CI of the score per method x task x length, with memory and latency means.

    ``drop`` is the score minus the baseline method's score on the same task and length.
    """
    if not records:
        return pd.DataFrame()
    df = pd.DataFrame(records)
    for c in SUMMARY_COLUMNS:
        if c not in df:
            df[c] = float("nan")
        df[c] = pd.to_numeric(df[c], errors="coerce")
    g = df.groupby(["method", "task", "length"], sort=False)
    out = g.agg(n=("score", "count"), **{c: (c, f) for c, f in SUMMARY_COLUMNS.items()})
    out.insert(2, "score_ci95", g["score"].apply(_ci95))
    out = out.reset_index()
    base = out[out["method"] == baseline].set_index(["task", "length"])["score"]
    out.insert(5, "drop", [s - base.get((t, L), float("nan")) for s, t, L in
                           zip(out["score"], out["task"], out["length"])])
    timing = df.groupby("method", sort=False)["timing"].first() if "timing" in df else None
    if timing is not None:
        out["timing"] = out["method"].map(timing)
    return out


def overall(summary: pd.DataFrame) -> pd.DataFrame:
    """Average over tasks per method x length (the headline table)."""
    if summary.empty:
        return summary
    cols = ["score", "drop", "compression_ratio", "bits_per_element", "tokens_kept", "ttft_s", "tpot_s",
            "peak_mem_bytes"]
    return summary.groupby(["method", "length"], sort=False)[cols].mean().reset_index()


def to_markdown(df: pd.DataFrame, floatfmt: str = "{:.4g}") -> str:
    """A GitHub markdown table (no extra dependency)."""
    if df.empty:
        return "(no records)\n"
    cols = list(df.columns)

    def cell(v) -> str:
        if isinstance(v, float):
            return "" if math.isnan(v) else floatfmt.format(v)
        return str(v)

    lines = ["| " + " | ".join(cols) + " |", "|" + "|".join("---" for _ in cols) + "|"]
    lines += ["| " + " | ".join(cell(v) for v in row) + " |" for row in df.itertuples(index=False)]
    return "\n".join(lines) + "\n"


def write_tables(run_dir: Path, records: list[dict]) -> tuple[pd.DataFrame, pd.DataFrame]:
    """Write summary.csv / summary.md / overall.csv / overall.md and the PNG plots in the run directory."""
    summ = summarize(records)
    ov = overall(summ)
    summ.to_csv(run_dir / "summary.csv", index=False)
    ov.to_csv(run_dir / "overall.csv", index=False)
    (run_dir / "summary.md").write_text(to_markdown(summ))
    (run_dir / "overall.md").write_text(to_markdown(ov))
    from harness.plots import write_plots

    write_plots(run_dir, records, ov)
    return summ, ov
