"""Run configuration: parsing and validating what the user asked for (before any model is loaded)."""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from pathlib import Path

from harness.errors import UserError

# the default job is a quick smoke suite (minutes on a 2-core CPU): two needle tasks at 1k tokens, answers capped at 12
# tokens (RULER's answers fit; a broken method stops there instead of at RULER's 128). Naming --tasks gives each
# task's own answer length.
DEFAULT_TASKS = "niah_single_1,niah_single_2"
DEFAULT_MAX_NEW_TOKENS = 12
DEFAULT_LENGTHS = "1k"
DEFAULT_SAMPLES = 1
KV_DTYPES = ("auto", "float16", "bfloat16", "float32")


def parse_lengths(text: str) -> list[int]:
    """``"4k,16k,1000"`` -> ``[4096, 16384, 1000]`` (k = 1024, as RULER's lengths)."""
    out = []
    for item in filter(None, (s.strip().lower() for s in text.split(","))):
        m = re.fullmatch(r"(\d+)(k?)", item)
        if not m or int(m.group(1)) <= 0:
            raise UserError(f"bad length {item!r}; write token counts like 4096 or 4k (k = 1024), comma-separated")
        out.append(int(m.group(1)) * (1024 if m.group(2) else 1))
    if not out:
        raise UserError("no length given; write e.g. --lengths 4k,16k")
    return list(dict.fromkeys(out))


@dataclass
class RunConfig:
    methods: list  # methods.Method
    tasks: list  # tasks.Task
    lengths: list[int]
    samples: int = DEFAULT_SAMPLES
    seed: int = 0
    model: str | None = None
    device: str = "cpu"
    dtype: str = "auto"
    kv_dtype: str = "auto"
    out: Path = field(default_factory=lambda: Path("runs/default"))
    query_aware: bool = False
    max_new_tokens: int | None = None
    kernels: str = "auto"
    progress: bool = True

    def __post_init__(self):
        if self.samples < 1:
            raise UserError(f"--samples must be >= 1 (got {self.samples})")
        if self.kv_dtype not in KV_DTYPES:
            raise UserError(f"unknown --kv-dtype {self.kv_dtype!r}; choose from: {', '.join(KV_DTYPES)}")
        if self.max_new_tokens is not None and self.max_new_tokens < 1:
            raise UserError(f"--max-new-tokens must be >= 1 (got {self.max_new_tokens})")
