"""Marginal bandwidth and fixed cost of each row of a kernel benchmark (``python -m kernels.bench --fit CSV``).

A decode call's time grows with the bytes it reads; what a method costs splits into a **marginal rate** (the
bandwidth at which each further byte of its cache is read: the slope of time against bytes over the contexts of one
run) and a **fixed cost** (the intercept: the graph and kernel launches, the first loads, the programs' uneven ends,
the split merge). Both come from a least-squares line through the rows of one method at two or more contexts.
They tell apart a kernel that streams its bytes slowly from one that streams them at full speed but pays a per-call
cost that weighs more as its cache shrinks (the speed-up target's ratio hides which).
"""

from __future__ import annotations

import csv
from pathlib import Path

COLS = ["method", "contexts", "marginal_gbps", "marginal_vs_sdpa", "fixed_us", "fixed_share_32k", "max_resid_us"]


class FitError(ValueError):
    """A results file that cannot be fitted (missing, not a kernels.bench CSV, unreadable numbers)."""


def read_rows(path: str | Path) -> list[dict]:
    """The decode rows (context, method, time_us, bytes) of a ``kernels.bench`` CSV; prefill rows are skipped."""
    p = Path(path)
    try:
        with p.open(newline="") as f:
            raw = list(csv.DictReader(f))
    except OSError as e:
        raise FitError(f"cannot read {p}: {e.strerror}") from None
    need = {"context", "method", "time_us", "bytes"}
    if not raw or not need <= set(raw[0]):
        raise FitError(f"{p} is not a kernels.bench CSV (needs columns {', '.join(sorted(need))})")
    rows = []
    for i, r in enumerate(raw, start=2):
        if r["method"].startswith("prefill"):
            continue
        try:
            rows.append(dict(context=int(r["context"]), method=r["method"], time_us=float(r["time_us"]),
                             bytes=int(r["bytes"])))
        except (TypeError, ValueError):
            raise FitError(f"{p}, line {i}: context, time_us and bytes must be numbers") from None
    return rows


def _line(xs: list[float], ys: list[float]) -> tuple[float, float]:
    """Least-squares ``y = a + b x``: ``(a, b)``."""
    n = len(xs)
    mx, my = sum(xs) / n, sum(ys) / n
    sxx = sum((x - mx) ** 2 for x in xs)
    b = sum((x - mx) * (y - my) for x, y in zip(xs, ys)) / sxx
    return my - b * mx, b


def fit_rows(rows: list[dict], at: int = 32768) -> list[dict]:
    """Per method with two or more contexts (of different bytes): its marginal rate (GB/s), that rate over the
    same-dtype SDPA row's, its fixed cost (µs), that cost's share of its time at context ``at`` and the line's
    largest miss (µs: large when the rate changes with the context)."""
    by: dict[str, list[dict]] = {}
    for r in rows:
        by.setdefault(r["method"], []).append(r)
    fits = {}
    for m, rs in by.items():
        if len({r["bytes"] for r in rs}) < 2:
            continue
        fixed, slope = _line([r["bytes"] for r in rs], [r["time_us"] for r in rs])
        resid = max(abs(r["time_us"] - fixed - slope * r["bytes"]) for r in rs)
        fits[m] = (fixed, 1e-3 / slope if slope > 0 else float("inf"), rs, resid)
    out = []
    for m, (fixed, rate, rs, resid) in fits.items():
        sdpa = fits.get("sdpa-bf16" if m.endswith("-bf16") else "sdpa-fp16")
        t_at = [r["time_us"] for r in rs if r["context"] == at]
        out.append(dict(method=m, contexts=len(rs), marginal_gbps=round(rate, 1),
                        marginal_vs_sdpa=round(rate / sdpa[1], 3) if sdpa else "",
                        fixed_us=round(fixed, 1), fixed_share_32k=round(fixed / t_at[0], 3) if t_at else "",
                        max_resid_us=round(resid, 1)))
    return out


def to_markdown(fits: list[dict]) -> str:
    head = "| " + " | ".join(COLS) + " |\n|" + "---|" * len(COLS) + "\n"
    return head + "".join("| " + " | ".join(str(f[c]) for c in COLS) + " |\n" for f in fits)
