"""Decode latency and memory at a real model's shape, with random weights: ``python -m harness bench decode``.

Accuracy needs real weights, but time and memory depend only on the shapes: this benchmark builds a model from a config
(``--shape``: a named shape such as ``llama-3.1-8b``, or a local ``config.json`` / model folder), with random weights
and no download. It prefills ``--context`` random tokens through each method's compressed cache, then decodes
``--new-tokens`` greedily, and records:

- the prefill time (with the compression);
- the time per output token: the median and the 90th percentile over the decode steps. It is timed like the
  harness's ``run`` (CUDA events around each step's forward, host launch cost included; wall clock on CPU);
- the KV bytes after the prefill and at the end (bytes of the real tensors), and the compression ratio against an
  fp16 cache of the same tokens;
- the peak CUDA memory above the weights;
- on CUDA, ``gpu_ms``: the GPU time of one more decode step's device operations, from the profiler (CUPTI), and
  ``launches``, their number (kernels, copies). Where ``tpot_ms`` is far above ``gpu_ms``, the step is bound by the
  host (Python and launches: eager decoding of a large model is), and the gap is the host's, not the method's GPU
  work.

A first row, ``stock:dynamic-cache+sdpa``, runs the model's own path (transformers' ``DynamicCache``, uncompressed, in
the model's dtype, and SDPA): the reference a deployment starts from, against which the harness's own ``full`` shows
what the cache interface costs by itself (``--no-stock`` skips it). Each row gets one untimed warm-up first, the same
prefill and two steps (kernels compile, the allocator warms), as ``harness run`` warms up on the full prompt. Every row
says ``weights=random``: the tokens generated are meaningless, only the time and the bytes count.

    python -m harness bench decode --shape llama-3.1-8b --context 32k --new-tokens 64 \\
        --methods full,kivi:bits=2,qaq --device cuda --csv decode.csv
"""

from __future__ import annotations

import argparse
import csv
import math
import os
import statistics
import time
from pathlib import Path

import torch

from harness.errors import UserError

_LLAMA31_ROPE = {"rope_type": "llama3", "rope_theta": 500000.0, "factor": 8.0, "low_freq_factor": 1.0,
                 "high_freq_factor": 4.0, "original_max_position_embeddings": 8192}
# named shapes (LlamaConfig fields): the published configs' sizes, no weights
SHAPES: dict[str, dict] = {
    "llama-3.1-8b": dict(vocab_size=128256, hidden_size=4096, intermediate_size=14336, num_hidden_layers=32,
                         num_attention_heads=32, num_key_value_heads=8, head_dim=128, max_position_embeddings=131072,
                         rms_norm_eps=1e-5, rope_parameters=_LLAMA31_ROPE),
    "smollm2-135m": dict(vocab_size=49152, hidden_size=576, intermediate_size=1536, num_hidden_layers=30,
                         num_attention_heads=9, num_key_value_heads=3, head_dim=64, max_position_embeddings=8192,
                         rms_norm_eps=1e-5, tie_word_embeddings=True,
                         rope_parameters={"rope_type": "default", "rope_theta": 100000.0}),
    "tiny": dict(vocab_size=256, hidden_size=128, intermediate_size=256, num_hidden_layers=2, num_attention_heads=4,
                 num_key_value_heads=2, head_dim=32, max_position_embeddings=4096),
}
STOCK = "stock:dynamic-cache+sdpa"  # the row of the model's own path (not a method of the registry)
COLS = ["shape", "weights", "device", "dtype", "kernels", "method", "context", "new_tokens", "prefill_s",
        "tpot_ms", "tpot_p90_ms", "gpu_ms", "launches", "kv_bytes_prefill", "kv_bytes_end", "compression_ratio",
        "peak_mem_bytes", "timing", "commit"]


def model_config(shape: str):
    """The config of a named shape (:data:`SHAPES`) or of a local ``config.json`` / model folder."""
    from transformers import AutoConfig, LlamaConfig

    if shape in SHAPES:
        return LlamaConfig(**SHAPES[shape])
    path = Path(shape)
    if path.is_file() and path.name == "config.json":
        path = path.parent
    if path.is_dir() and (path / "config.json").is_file():
        try:
            cfg = AutoConfig.from_pretrained(path)
        except (OSError, ValueError, KeyError) as e:
            raise UserError(f"cannot read the config in {path}: {str(e).splitlines()[0]}") from None
        kinds = set(getattr(cfg, "layer_types", None) or ["full_attention"])
        if getattr(cfg, "sliding_window", None) or kinds != {"full_attention"}:
            raise UserError(f"{path}: sliding-window or mixed attention layers ({', '.join(sorted(kinds))}); the "
                            f"compressed cache keeps every token of every layer, so choose a full-attention model")
        if getattr(cfg, "is_encoder_decoder", False):
            raise UserError(f"{path}: an encoder-decoder model; choose a decoder-only causal LM")
        return cfg
    raise UserError(f"unknown shape {shape!r}; choose from: {', '.join(SHAPES)}, or a local config.json / model "
                    f"folder")


def random_model(cfg, device: torch.device, dtype: torch.dtype):
    """A causal LM of config ``cfg`` with random weights, built in ``dtype`` directly on ``device``."""
    from transformers import AutoModelForCausalLM

    from methods.attention import register

    old = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        with torch.device(device):
            model = AutoModelForCausalLM.from_config(cfg)
        model.set_attn_implementation(register())
    except ValueError as e:  # not a causal LM, or one without attention implementations
        raise UserError(f"cannot run {type(cfg).__name__} ({getattr(cfg, 'model_type', '?')}) as a causal LM with "
                        f"the compressed cache: {str(e).splitlines()[0]}") from None
    finally:
        torch.set_default_dtype(old)
    return model.eval()


def _parse(argv: list[str]) -> argparse.Namespace:
    from harness.cli import _Parser
    from harness.config import parse_lengths

    p = _Parser(prog="python -m harness bench decode", description=__doc__.split("\n\n")[0])
    p.add_argument("--shape", default="tiny", help=f"{', '.join(SHAPES)}, or a local config.json / model folder")
    p.add_argument("--methods", default="full,kivi:bits=2", help="comma-separated method specs")
    p.add_argument("--context", default="1k", help="prompt tokens, e.g. 32k (k = 1024)")
    p.add_argument("--new-tokens", type=int, default=16, help="decode steps timed (at least 2)")
    p.add_argument("--device", default="cpu", help="cpu, cuda, cuda:1 ...")
    p.add_argument("--dtype", default="auto", choices=["auto", "float16", "bfloat16", "float32"],
                   help="weights and cache dtype (auto: float16 on CUDA, float32 on CPU)")
    p.add_argument("--kernels", default="auto", choices=["auto", "reference", "triton"])
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--csv", type=Path, default=None, help="append the rows to this CSV")
    p.add_argument("--no-stock", action="store_true",
                   help="skip the stock row (transformers' DynamicCache with SDPA, no compression)")
    a = p.parse_args(argv)
    lengths = parse_lengths(a.context)
    if len(lengths) != 1:
        raise UserError(f"--context takes one length, got {a.context!r}")
    a.context = lengths[0]
    if a.new_tokens < 2:
        raise UserError(f"--new-tokens must be at least 2, got {a.new_tokens}")
    if not 0 <= a.seed < 2**63:
        raise UserError(f"--seed must be in [0, 2^63), got {a.seed}")
    return a


def _device(name: str) -> torch.device:
    try:
        dev = torch.device(name)
    except RuntimeError:
        raise UserError(f"bad device {name!r}; choose cpu, cuda or cuda:N") from None
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise UserError("CUDA is not available on this machine; choose --device cpu")
    if dev.type == "cuda" and dev.index is not None and dev.index >= torch.cuda.device_count():
        raise UserError(f"no device {name}; this machine has cuda:0 .. cuda:{torch.cuda.device_count() - 1}")
    if dev.type not in ("cpu", "cuda"):
        raise UserError(f"bad device {name!r}; choose cpu, cuda or cuda:N")
    return dev


def _check_csv(path: Path | None) -> None:
    """Before anything runs: ``--csv`` must be a file this benchmark can append to, and an existing one must have
    its columns (rows are appended; nothing in it is lost)."""
    if path is None:
        return
    if path.is_dir():
        raise UserError(f"--csv {path} is a directory; give a file name")
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        if path.exists() and path.stat().st_size:
            with path.open(newline="") as f:
                header = next(csv.reader(f), [])
        else:
            header = COLS
        with path.open("a"):
            pass
    except (OSError, UnicodeDecodeError, csv.Error) as e:
        raise UserError(f"cannot append to --csv {path}: {str(e).splitlines()[0]}") from None
    if header != COLS:
        raise UserError(f"{path} exists with other columns; choose another --csv")


def _append_csv(path: Path, row: dict) -> None:
    size = path.stat().st_size if path.exists() else 0
    with path.open("a+b") as f:  # a last line without its newline gets one first (rows never join)
        if size:
            f.seek(size - 1)
            if f.read(1) != b"\n":
                f.write(b"\n")
    with path.open("a", newline="") as f:
        w = csv.DictWriter(f, fieldnames=COLS)
        if not size:
            w.writeheader()
        w.writerow(row)


def measure(model, method, context: int, new_tokens: int, kv_dtype: torch.dtype, device: torch.device,
            seed: int = 0) -> dict:
    """Prefill ``context`` random tokens through ``method``'s compressed cache, decode ``new_tokens`` greedily; the
    times, bytes and peak memory of that run (see the module docstring)."""
    from methods.attention import register
    from methods.cache import CompressedCache

    model.set_attn_implementation(register())
    return _decode(model, lambda: CompressedCache(model.config, method, kv_dtype, device, seed), _compressed_bytes,
                   context, new_tokens, device, seed)


def measure_stock(model, context: int, new_tokens: int, device: torch.device, seed: int = 0) -> dict:
    """The same run on the model's stock path: transformers' ``DynamicCache`` (uncompressed, the model's dtype) and
    SDPA attention, the reference a user's deployment starts from."""
    from transformers import DynamicCache

    model.set_attn_implementation("sdpa")
    return _decode(model, lambda: DynamicCache(config=model.config), _dynamic_bytes, context, new_tokens, device,
                   seed)


def _compressed_bytes(cache) -> tuple[int, int]:
    """(KV bytes, fp16 bytes of the same tokens) of a compressed cache."""
    return cache.nbytes(), cache.seen_rows() * cache.head_dim() * 2 * 2


def _dynamic_bytes(cache) -> tuple[int, int]:
    """(KV bytes, fp16 bytes of the same tokens) of a ``DynamicCache``."""
    ts = [t for layer in cache.layers for t in (getattr(layer, "keys", None), getattr(layer, "values", None))
          if isinstance(t, torch.Tensor)]
    return sum(t.numel() * t.element_size() for t in ts), sum(t.numel() * 2 for t in ts)


@torch.no_grad()
def _decode(model, make_cache, nbytes, context: int, new_tokens: int, device: torch.device, seed: int) -> dict:
    """Prefill and decode through the cache ``make_cache()`` makes; ``nbytes(cache)`` gives its bytes."""
    from harness.measure import PeakMemory, Timer

    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(model.config.vocab_size, (1, context), generator=g).to(device)
    timer = Timer(device)

    def forward(cache, x, start):
        pos = torch.arange(start, start + x.shape[1], device=device)[None]
        return model(x, past_key_values=cache, position_ids=pos, use_cache=True, logits_to_keep=1).logits[0, -1]

    with PeakMemory(device) as peak:
        cache = make_cache()
        with timer.span() as t_pre:
            logits = forward(cache, ids, 0)
            tok = int(logits.argmax())
        if not bool(torch.isfinite(logits).all()):  # data-dependent methods would then measure garbage decisions
            raise UserError("the random model's logits are not finite in this dtype; choose --dtype bfloat16 or "
                            "float32")
        kv_prefill = nbytes(cache)[0]
        steps = []
        for i in range(new_tokens):
            with timer.span() as t:
                tok = int(forward(cache, torch.tensor([[tok]], device=device), context + i).argmax())
            steps.append(t)
        timer.sync()
        end, fp16 = nbytes(cache)
    gpu_ms = launches = None
    if device.type == "cuda":  # one more step, after the bytes and outside the peak: it adds a token
        gpu_ms, launches = kernel_time(lambda: forward(cache, torch.tensor([[tok]], device=device),
                                                       context + new_tokens).argmax())
    ms = sorted(s.seconds * 1e3 for s in steps)
    return {"prefill_s": t_pre.seconds, "tpot_ms": statistics.median(ms), "tpot_p90_ms": nearest_rank(ms, 0.9),
            "gpu_ms": gpu_ms, "launches": launches,
            "kv_bytes_prefill": kv_prefill, "kv_bytes_end": end, "compression_ratio": fp16 / end,
            "peak_mem_bytes": peak.peak, "timing": timer.kind}


def kernel_time(step) -> tuple[float, int]:
    """(milliseconds, count) of the device operations (kernels, copies, sets) of one call of ``step``, from the
    profiler's device activity; concurrent streams' times add up."""
    from torch.autograd import DeviceType
    from torch.profiler import ProfilerActivity, profile

    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        step()
        torch.cuda.synchronize()
    ops = [e for e in prof.events() if e.device_type == DeviceType.CUDA]  # kernels, copies and sets on the device
    return sum(e.device_time_total for e in ops) / 1e3, len(ops)


def nearest_rank(sorted_values: list[float], q: float) -> float:
    """The nearest-rank ``q`` quantile of ascending values: the smallest value with at least ``q`` of them at or
    below it."""
    return sorted_values[max(0, math.ceil(q * len(sorted_values)) - 1)]


def _size(n: int) -> str:
    for unit in ("B", "KiB", "MiB"):
        if n < 1024:
            return f"{n:.1f} {unit}" if unit != "B" else f"{n} B"
        n /= 1024
    return f"{n:.2f} GiB"


def run(argv: list[str]) -> list[dict]:
    """Parse the arguments, measure every method; returns the rows (also printed, and appended to ``--csv``)."""
    import methods
    from harness.measure import device_name
    from harness.runner import git_commit, kv_dtype_of
    from methods import attention

    a = _parse(argv)
    try:
        ms = methods.parse_specs(a.methods)
    except methods.SpecError as e:
        raise UserError(str(e)) from None
    device = _device(a.device)
    cfg = model_config(a.shape)
    window = getattr(cfg, "max_position_embeddings", None)
    if window and a.context + a.new_tokens > window:
        raise UserError(f"context {a.context} + {a.new_tokens} new tokens exceeds the {a.shape} window of {window} "
                        f"tokens; choose --context up to {window - a.new_tokens}")
    _check_csv(a.csv)
    if a.dtype == "auto":
        dtype = torch.float16 if device.type == "cuda" else torch.float32
    else:
        dtype = getattr(torch, a.dtype)
    if a.kernels == "triton" and device.type != "cuda" and os.environ.get("TRITON_INTERPRET") != "1":
        raise UserError("--kernels triton needs a CUDA device (or TRITON_INTERPRET=1); choose auto or reference")
    if a.kernels != "auto":
        attention.set_backend(a.kernels)
    torch.manual_seed(a.seed)
    model = random_model(cfg, device, dtype)
    kv_dtype = kv_dtype_of("auto", dtype)  # as `harness run` stores it: 16-bit, the model's when it is
    rows = []
    runs = [] if a.no_stock else [(STOCK, lambda n, k: measure_stock(model, n, k, device, a.seed))]
    runs += [(m.spec(), lambda n, k, m=m: measure(model, m, n, k, kv_dtype, device, a.seed)) for m in ms]
    for name, fn in runs:
        try:
            fn(a.context, 2)  # warm-up at the same length (the same kernels and specialisations), not recorded
            r = fn(a.context, a.new_tokens)
        except methods.SpecError as e:
            raise UserError(str(e)) from None
        row = {"shape": a.shape, "weights": "random", "device": device_name(device),
               "dtype": str(dtype).removeprefix("torch."), "kernels": a.kernels, "method": name,
               "context": a.context, "new_tokens": a.new_tokens, **r, "commit": git_commit()}
        rows.append(row)
        gpu = "" if row["gpu_ms"] is None else f", GPU {row['gpu_ms']:.2f} ms in {row['launches']} launches"
        print(f"{name}: prefill {row['prefill_s']:.3f} s, TPOT {row['tpot_ms']:.2f} ms (p90 "
              f"{row['tpot_p90_ms']:.2f}{gpu}), KV {_size(row['kv_bytes_end'])} ({row['compression_ratio']:.2f}x)",
              flush=True)
        if a.csv is not None:
            _append_csv(a.csv, row)
    return rows


def main(argv: list[str]) -> int:
    t0 = time.perf_counter()
    rows = run(argv)
    print(f"{len(rows)} method(s) measured in {time.perf_counter() - t0:.0f} s")
    return 0
