"""The sweep: models x methods x tasks x lengths x samples, one JSON record per sample."""

from __future__ import annotations

import hashlib
import os
import platform
import subprocess
import time
from pathlib import Path

import torch
from tqdm import tqdm

from harness import models
from harness.config import RunConfig
from harness.errors import UserError
from harness.measure import PeakMemory, device_name, timing_kind
from harness.protocol import Session, build_prompt
from harness.results import RESULTS, append_record, read_records, record_key, write_tables
from tasks import LengthError
from tasks.scoring import score as score_answer

CODE_DIRS = ("harness", "methods", "kernels", "tasks")


def _git(root: Path, *args: str) -> str:
    return subprocess.run(["git", *args], cwd=root, capture_output=True, text=True, timeout=5).stdout.strip()


def code_digest(root: Path | None = None) -> str:
    """First 10 hex digits of a sha256 over the measured code as it is on disk: every file under
    :data:`CODE_DIRS` that git tracks or would track (path and bytes, sorted by path). Two copies of a commit's code
    give the same digest, so a ``+dirty`` row can be matched to a commit. It hashes the bytes on disk: a checkout
    that rewrites line ends (``core.autocrlf``) differs, and a file ignored by this machine's git exclude settings is
    left out (nor does it make the tree dirty)."""
    root = root or Path(__file__).resolve().parent.parent
    listed = _git(root, "ls-files", "-z", "-co", "--exclude-standard", "--", *CODE_DIRS)  # -z: names as they are
    names = sorted(set(filter(None, listed.split("\0"))))
    h = hashlib.sha256()
    for name in names:
        f = root / name
        if f.is_file():
            h.update(name.encode() + b"\0" + f.read_bytes() + b"\0")
    return h.hexdigest()[:10]


def git_commit() -> str:
    """Short commit of this checkout; ``+dirty:<code_digest>`` when the code measured (harness, methods, kernels,
    tasks) differs from it (``$KVHARNESS_GIT_COMMIT`` for copies without ``.git``)."""
    if os.environ.get("KVHARNESS_GIT_COMMIT"):
        return os.environ["KVHARNESS_GIT_COMMIT"]
    root = Path(__file__).resolve().parent.parent
    try:
        head = _git(root, "rev-parse", "--short=12", "HEAD")
        if not head:
            return "unknown"
        dirty = _git(root, "status", "--porcelain", "--", *CODE_DIRS)  # untracked too
        return head + (f"+dirty:{code_digest(root)}" if dirty else "")
    except (OSError, subprocess.SubprocessError):
        return "unknown"


def versions() -> dict:
    import transformers

    v = {"python": platform.python_version(), "torch": torch.__version__, "transformers": transformers.__version__}
    try:
        import triton

        v["triton"] = triton.__version__
    except ImportError:
        pass
    return v


def kv_dtype_of(name: str, model_dtype: torch.dtype) -> torch.dtype:
    """``auto``: the model dtype when it is 16-bit, else float16 (what a deployment stores)."""
    if name == "auto":
        return model_dtype if model_dtype in (torch.float16, torch.bfloat16) else torch.float16
    return getattr(torch, name)


def _metrics(ans, head_dim: int) -> dict:
    p = ans.stats_prefill
    elems = p["kept_rows"] * head_dim * 2  # K and V
    return {
        "kv_bytes_prefill": p["kv_bytes"],
        "kv_bytes_end": ans.stats_end["kv_bytes"],
        "aux_bytes": p["aux_bytes"],
        "kept_rows": p["kept_rows"],
        "seen_rows": p["seen_rows"],
        "tokens_kept": p["kept_rows"] / p["seen_rows"] if p["seen_rows"] else float("nan"),
        "bits_per_element": 8 * p["kv_bytes"] / elems if elems else float("nan"),
        "compression_ratio": p["seen_rows"] * head_dim * 2 * 2 / p["kv_bytes"] if p["kv_bytes"] else float("nan"),
        "n_outliers": p["n_outliers"],
    }


def run(cfg: RunConfig) -> list[dict]:
    """Run (or resume) a sweep; returns all records of the run directory."""
    path = cfg.out / RESULTS
    done = {record_key(r) for r in read_records(path)}  # fails early on a corrupt file
    lm = models.load(cfg.model, cfg.device, cfg.dtype)
    kv_dtype = kv_dtype_of(cfg.kv_dtype, lm.dtype)
    window = lm.max_length
    room = (cfg.max_new_tokens or 128) + 64  # the answer and the chat template
    for L in cfg.lengths:
        if window and L + room > window:
            raise UserError(f"length {L} (+ answer and template) exceeds {lm.model_id}'s window of {window} "
                            f"tokens; choose lengths up to {window - room}")
    if cfg.kernels != "auto":
        from methods import attention

        attention.set_backend(cfg.kernels)
    try:
        samples = [(task, L, i, task.generate(lm.tokenizer, L, i, cfg.seed))
                   for task in cfg.tasks for L in cfg.lengths for i in range(cfg.samples)]
    except (FileNotFoundError, LengthError) as e:
        raise UserError(str(e).splitlines()[0]) from None
    head_dim = getattr(lm.model.config, "head_dim", None) or lm.model.config.hidden_size // \
        lm.model.config.num_attention_heads
    common = {
        "model": lm.model_id, "model_hash": lm.file_hash, "dtype": str(lm.dtype).removeprefix("torch."),
        "kv_dtype": str(kv_dtype).removeprefix("torch."), "device": device_name(cfg.device),
        "timing": timing_kind(cfg.device), "versions": versions(), "git_commit": git_commit(),
        "kernels": cfg.kernels,
    }
    todo = [(m, s) for m in cfg.methods for s in samples
            if (lm.model_id, s[0].name, s[1], m.spec(), s[2], cfg.seed, cfg.query_aware) not in done]
    bar = tqdm(total=len(todo), desc="samples", disable=not cfg.progress, unit="sample")
    warmed: set[str] = set()
    for method, (task, L, i, sample) in todo:
        session = Session(lm.model, lm.tokenizer, method, kv_dtype, seed=cfg.seed * 1_000_003 + i)
        prompt = build_prompt(lm.tokenizer, sample.context, [(q.text, q.answer_prefix) for q in sample.questions],
                              cfg.query_aware)
        max_new = cfg.max_new_tokens or sample.max_new_tokens
        if torch.device(cfg.device).type == "cuda" and method.spec() not in warmed:
            session.run(prompt, 4)  # warm-up: kernels compiled, allocator primed; not recorded
            warmed.add(method.spec())
        with PeakMemory(cfg.device) as peak:
            answers = session.run(prompt, max_new)
        scores = [score_answer(sample.metric, a.text, q.answers) for a, q in zip(answers, sample.questions)]
        first = answers[0]
        rec = {
            **common, "task": task.name, "length": L, "index": i, "seed": cfg.seed, "method": method.spec(),
            "method_name": method.name, "query_aware": cfg.query_aware, "metric": sample.metric,
            "prompt_tokens": len(prompt.context) + len(prompt.questions[0]),
            "score": sum(scores) / len(scores), "scores": scores,
            "predictions": [a.text for a in answers], "answers": [list(q.answers) for q in sample.questions],
            "generated_tokens": [a.tokens for a in answers], "meta": sample.meta,
            "ttft_s": first.ttft_s, "tpot_s": first.tpot_s, "peak_mem_bytes": peak.peak,
            **_metrics(first, head_dim), **method.extra_metrics([ly.store for ly in session.last_cache.layers]),
            "time": time.strftime("%Y-%m-%dT%H:%M:%S"),
        }
        append_record(path, rec)
        bar.update(1)
    bar.close()
    records = read_records(path)
    write_tables(cfg.out, records)
    return records
