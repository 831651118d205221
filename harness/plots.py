"""PNG plots of a run: accuracy vs compression (with the Pareto front), needle depth x length, latency vs length."""

from __future__ import annotations

from pathlib import Path

import pandas as pd


def _plt():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def pareto_front(points: pd.DataFrame) -> pd.DataFrame:
    """Rows not dominated in (higher compression_ratio, higher score)."""
    pts = points.sort_values(["compression_ratio", "score"], ascending=[False, False])
    front, best = [], float("-inf")
    for _, r in pts.iterrows():
        if r["score"] > best:
            front.append(r)
            best = r["score"]
    return pd.DataFrame(front)


def _save(fig, path: Path, out: list[Path]) -> None:
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    _plt().close(fig)
    out.append(path)


def write_plots(run_dir: Path, records: list[dict], overall: pd.DataFrame) -> list[Path]:
    """Write the plots that the records support; returns their paths."""
    if overall.empty:
        return []
    plt = _plt()
    out = []
    fig, ax = plt.subplots(figsize=(7, 4.5))
    for L, grp in overall.groupby("length"):
        ax.scatter(grp["compression_ratio"], grp["score"], label=f"{L} tokens", alpha=0.8)
        for _, r in grp.iterrows():
            ax.annotate(r["method"].split(":")[0], (r["compression_ratio"], r["score"]), fontsize=6)
        front = pareto_front(grp)
        ax.plot(front["compression_ratio"], front["score"], linestyle="--", linewidth=0.8)
    ax.set_xscale("log")
    ax.set_xlabel("compression ratio vs fp16 (real bytes)")
    ax.set_ylabel("score (mean over tasks)")
    ax.legend(fontsize=7)
    _save(fig, run_dir / "pareto.png", out)
    df = pd.DataFrame(records)
    needle = df[df["task"] == "needle"] if "task" in df else df.iloc[0:0]
    if not needle.empty:
        needle = needle.assign(depth=[m.get("depth") for m in needle["meta"]])
        methods_ = list(needle["method"].unique())
        fig, axes = plt.subplots(1, len(methods_), figsize=(3 * len(methods_), 3), squeeze=False)
        for ax, m in zip(axes[0], methods_):
            piv = needle[needle["method"] == m].pivot_table(index="depth", columns="length", values="score")
            ax.imshow(piv.values, vmin=0, vmax=1, cmap="RdYlGn", aspect="auto")
            ax.set_xticks(range(len(piv.columns)), piv.columns, fontsize=6)
            ax.set_yticks(range(len(piv.index)), piv.index, fontsize=6)
            ax.set_title(m.split(":")[0], fontsize=7)
        _save(fig, run_dir / "needle_depth.png", out)
    if overall["length"].nunique() > 1:
        fig, ax = plt.subplots(figsize=(6, 4))
        for m, grp in overall.groupby("method"):
            ax.plot(grp["length"], grp["tpot_s"] * 1000, marker="o", label=m.split(":")[0])
        ax.set_xlabel("context length (tokens)")
        ax.set_ylabel("time per output token (ms)")
        ax.legend(fontsize=6)
        _save(fig, run_dir / "latency.png", out)
    return out
