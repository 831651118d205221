"""Command line: ``python -m harness {run,methods,tasks,summarize,check,bench}`` (``bench kernels``, ``bench decode``).

Bad input gets one line naming the valid choices and exit code 2, never a traceback.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from harness.errors import UserError


class _Parser(argparse.ArgumentParser):
    def error(self, message: str):  # one line, exit 2
        self.exit(2, f"error: {message} (see --help)\n")


def _parser() -> argparse.ArgumentParser:
    from harness import config

    p = _Parser(prog="python -m harness",
                description="Compare KV-cache compression methods: accuracy, memory, latency.")
    sub = p.add_subparsers(dest="cmd", required=True, parser_class=_Parser)

    r = sub.add_parser("run", help="run (or resume) a sweep and print the summary table")
    r.add_argument("--methods", default="full", help="comma-separated specs, e.g. full,kivi:bits=2,h2o:budget=0.2")
    r.add_argument("--tasks", default=None,
                   help=f"task names or groups (ruler), comma-separated (default: {config.DEFAULT_TASKS}, "
                        f"answers capped at {config.DEFAULT_MAX_NEW_TOKENS} tokens)")
    r.add_argument("--lengths", default=config.DEFAULT_LENGTHS, help="prompt lengths in tokens, e.g. 4k,16k")
    r.add_argument("--samples", type=int, default=config.DEFAULT_SAMPLES, help="samples per task and length")
    r.add_argument("--seed", type=int, default=0)
    r.add_argument("--model", default=None, help="HF id, local folder or .gguf file (default: embedded SmolLM2-135M)")
    r.add_argument("--device", default="cpu", help="cpu, cuda, cuda:1 ...")
    r.add_argument("--dtype", default="auto", help="model dtype: auto (fp16 on CUDA, fp32 on CPU), float16, ...")
    r.add_argument("--kv-dtype", default="auto", help="dtype of dense cache rows and quantization parameters")
    r.add_argument("--out", type=Path, default=Path("runs/default"), help="run directory (results.jsonl, tables)")
    r.add_argument("--query-aware", action="store_true", help="compress the question together with the context")
    r.add_argument("--no-baseline", action="store_true", help="do not add the full-cache baseline")
    r.add_argument("--max-new-tokens", type=int, default=None, help="override the task's answer length")
    r.add_argument("--kernels", default="auto", choices=["auto", "reference", "triton"],
                   help="attention kernels: auto (Triton on CUDA; Gluon for KIVI-like fp16 pairs), or force one "
                        "for A/B checks")
    r.add_argument("--no-progress", action="store_true")

    sub.add_parser("methods", help="list every method with its parameters, defaults and paper")
    sub.add_parser("tasks", help="list every task and group")
    s = sub.add_parser("summarize", help="print and write the tables of a run directory")
    s.add_argument("run_dir", type=Path)
    c = sub.add_parser("check", help="compare a run with a committed leaderboard CSV; exit 1 on a regression")
    c.add_argument("run_dir", type=Path)
    c.add_argument("--baseline", type=Path, required=True, help="leaderboard CSV (summary format)")
    c.add_argument("--tolerance", type=float, default=0.0, help="allowed score drop below the baseline's CI")
    b = sub.add_parser("bench", help="benchmarks: kernels (decode attention), decode (a model's TPOT and memory)")
    b.add_argument("what", choices=["kernels", "decode"])
    b.add_argument("rest", nargs=argparse.REMAINDER)
    return p


def _cmd_run(a) -> int:
    import methods
    import tasks
    from harness import config, runner
    from harness.results import overall, to_markdown

    try:
        ms = methods.parse_specs(a.methods)
    except methods.SpecError as e:
        raise UserError(str(e)) from None
    if not a.no_baseline and "full" not in [m.spec() for m in ms]:
        ms = [methods.parse_spec("full"), *ms]
    try:
        ts = tasks.resolve_tasks(a.tasks or config.DEFAULT_TASKS)
    except tasks.UnknownTaskError as e:
        raise UserError(str(e)) from None
    max_new = a.max_new_tokens or (None if a.tasks else config.DEFAULT_MAX_NEW_TOKENS)
    cfg = config.RunConfig(methods=ms, tasks=ts, lengths=config.parse_lengths(a.lengths), samples=a.samples,
                           seed=a.seed, model=a.model, device=a.device, dtype=a.dtype, kv_dtype=a.kv_dtype,
                           out=a.out, query_aware=a.query_aware, max_new_tokens=max_new, kernels=a.kernels,
                           progress=not a.no_progress)
    try:
        records = runner.run(cfg)
    except methods.SpecError as e:
        raise UserError(str(e)) from None
    _print_tables(a.out, records, overall, to_markdown)
    return 0


def _print_tables(run_dir, records, overall, to_markdown) -> None:
    from harness.results import summarize

    summ = summarize(records)
    cols = ["method", "task", "length", "n", "score", "score_ci95", "drop", "compression_ratio", "tokens_kept",
            "ttft_s", "tpot_s", "timing"]
    print(to_markdown(summ[[c for c in cols if c in summ]]))
    print(to_markdown(overall(summ)))
    print(f"tables written to {run_dir}/summary.csv, summary.md, overall.csv, overall.md")


def _cmd_methods(_a) -> int:
    import methods

    for row in methods.describe():
        print(f"{row['name']} ({row['kind']}): {row['summary']}")
        print(f"    paper: {row['paper']}")
        for p in row["params"]:
            print(f"    {p['name']}: {p['type']} = {p['default']}  {p['help']}")
    return 0


def _cmd_tasks(_a) -> int:
    import tasks

    for name, t in tasks.TASKS.items():
        print(f"{name} ({t.metric})")
    for g, names in tasks.GROUPS.items():
        print(f"{g}: {', '.join(names)}")
    return 0


def _cmd_summarize(a) -> int:
    from harness.results import RESULTS, overall, read_records, to_markdown, write_tables

    path = a.run_dir / RESULTS
    if not path.exists():
        raise UserError(f"no results in {a.run_dir} (expected {path})")
    records = read_records(path)
    write_tables(a.run_dir, records)
    _print_tables(a.run_dir, records, overall, to_markdown)
    return 0


def _cmd_check(a) -> int:
    from harness.leaderboard import check

    return check(a.run_dir, a.baseline, a.tolerance)


def _cmd_bench(a) -> int:
    if a.what == "decode":
        from harness import decode_bench

        return decode_bench.main(list(a.rest))
    try:
        from kernels import bench
    except ImportError as e:
        raise UserError(f"kernel benchmarks unavailable: {e}") from None
    return bench.main(list(a.rest))


def main(argv: list[str] | None = None) -> int:
    a = _parser().parse_args(argv)
    try:
        return {"run": _cmd_run, "methods": _cmd_methods, "tasks": _cmd_tasks, "summarize": _cmd_summarize,
                "check": _cmd_check, "bench": _cmd_bench}[a.cmd](a)
    except UserError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted; finished samples are kept in the run directory", file=sys.stderr)
        return 130
