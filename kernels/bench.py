"""Decode-attention and quantize benchmarks of the Triton and Gluon kernels (CUDA only).

    python -m kernels.bench [--contexts 4k,16k,32k,64k,128k] [--batch 8] [--csv out.csv]
    python -m kernels.bench --fit out.csv     # each row's marginal bandwidth and fixed cost (kernels/fit.py)

Per context length: fp16 SDPA (``enable_gqa``; flash-attn too when installed), the Triton kernel on dense fp16, packed
KIVI 4-bit and 2-bit (ChannelQuant keys G=32 + TokenQuant values G=32), and a QAQ-like mix (TokenQuant keys and values
in three segments at 2/3/4 bits over 30/50/20% of the tokens, 1% sparse outliers in K and V) and QAQ's format at one
width without outliers (``qaq-Nbit-rows``: TokenQuant K and V, a scale and zero per row) and with QAQ's default
outliers (``qaq-Nbit-rows+out``: quantized and packed by QAQ's own functions, each row's extremes exact, statistics
over the rest; ``qaq-2bit-rows+out5%``: at its ``outliers=0.05``, about 8 per row), and the mix's widths and shares
stored that way (``qaq-mix-rows-2/3/4bit+out``; the first mix's 3-bit pair, in groups of 32 channels, keeps it partly
on the Triton kernel), and what QAQ's default bounds store (``qaq-k3v1/k3v0-rows+out``: 3-bit keys, half the tokens
with 1-bit and half with 0-bit values, QAQ's outliers); then bf16 SDPA and KIVI 4-bit / 2-bit quantized from the same
K/V in bf16 (their speed-ups are against bf16 SDPA). Times are medians of CUDA-event timings; bytes are the real
tensors read (codes, scales, zeros, outliers, queries); the effective bandwidth is compared with a device-to-device
copy measured in the same run. ``time_us`` is the GPU time of one call replayed from a CUDA graph (how a decode loop
runs it; the host's Python launch cost is not in it), each replay after a 512 MiB read that leaves the L2 full of clean
lines of other data (as in a decode step, where the other layers' weights and caches pass through the L2 between two
calls of one layer; a zero-filling flush like ``do_bench``'s would leave dirty lines whose write-back lands in the
timed call); ``eager_us`` is one call launched from Python each time (``do_bench``), host cost included (it dominates
at short contexts).
The prefill rows compare quantize+pack of one layer's K and V with SDPA causal prefill at the same length.
"""

from __future__ import annotations

import argparse
import csv
import functools
import sys
from types import SimpleNamespace

import torch
import torch.nn.functional as F


def _parse_len(s: str) -> int:
    s = s.strip().lower()
    return int(float(s[:-1]) * 1024) if s.endswith("k") else int(s)


def _nbytes(*ts) -> int:
    return sum(t.numel() * t.element_size() for t in ts if t is not None)


def copy_bandwidth(nbytes: int = 2 << 30) -> float:
    """Device-to-device copy bandwidth in bytes/s (bytes read + bytes written over the median time)."""
    from triton.testing import do_bench

    a = torch.empty(nbytes // 4, dtype=torch.float32, device="cuda").uniform_()
    b = torch.empty_like(a)
    ms = do_bench(lambda: b.copy_(a), warmup=50, rep=300, return_mode="median")
    return 2 * nbytes / (ms * 1e-3)


def token_part(x: torch.Tensor, counts, bits: int, group: int, outlier_frac: float = 0.0):
    """A TokenQuant-like namespace from rows ``x`` quantized by the Triton kernel (+ random sparse outliers)."""
    from kernels import triton_quant as tq

    words, scale, zero = tq.quantize_tokens(x, bits, group)
    p = SimpleNamespace(words=words, scale=scale, zero=zero, nbits=bits, group=group, d=x.shape[1],
                        counts=tuple(counts), out_idx=None, out_val=None)
    if outlier_frac > 0:
        m = int(outlier_frac * x.numel())
        idx = torch.randperm(x.numel(), device=x.device)[:m].to(torch.int32)
        p.out_idx, p.out_val = idx, x.reshape(-1)[idx.long()].clone()
    return p


def qaq_rows(x: torch.Tensor, counts, bits: int, ratio: float = 0.01, chunk: int = 1 << 20):
    """Rows ``x`` as QAQ stores them at ``bits`` with its default outliers: ``qaq_quant.quantize_groups`` (faithful
    mode: statistics over the non-outliers, each row's extremes kept exact, code 0 at their positions) and
    ``pack_rows`` (one scale and zero per row, outliers as int32 flat indices + values), in chunks of rows."""
    from methods.qaq_quant import pack_rows, quantize_groups

    words, scale, zero, idx, val = [], [], [], [], []
    for r0 in range(0, x.shape[0], chunk):
        xs = x[r0:r0 + chunk]
        qg = quantize_groups(xs, torch.full((xs.shape[0],), bits, dtype=torch.int64, device=x.device), ratio)
        p = pack_rows(xs, qg.codes, qg.scale, qg.zero, qg.outliers, bits, (xs.shape[0],), x.dtype)
        words.append(p.words), scale.append(p.scale), zero.append(p.zero)
        if p.out_idx is not None:
            idx.append(p.out_idx + r0 * x.shape[1]), val.append(p.out_val)
        del qg
    return SimpleNamespace(words=torch.cat(words), scale=torch.cat(scale), zero=torch.cat(zero), nbits=bits,
                           group=x.shape[1], d=x.shape[1], counts=tuple(counts),
                           out_idx=torch.cat(idx) if idx else None, out_val=torch.cat(val) if val else None)


def channel_part(x: torch.Tensor, counts, bits: int, group: int):
    from kernels import triton_quant as tq

    words, scale, zero = tq.quantize_channels(x, bits, group)
    return SimpleNamespace(words=words, scale=scale, zero=zero, nbits=bits, group=group, counts=tuple(counts))


def part_bytes(p, spec=None, value: bool = False) -> int:
    """Bytes of a part's tensors that a decode step reads: codes, scales, zeros and its outliers, as stored (int32
    index + value) or, where the Gluon kernel serves the part (``spec`` given), as the fixed slots it reads instead
    (gluon_attention.outlier_slots, built once per part and kept beside the stored pairs): the first plane, 2 slots
    of 4 bytes per row, two 4-byte prefix counts per 64 rows (a half tile's flag), and the further planes of the
    half tiles that have a row with a third outlier (about 14% of them for QAQ's rows, nearly all with 1% of the
    elements at random positions), which the kernel reads only there."""
    if hasattr(p, "x"):
        return _nbytes(p.x)
    ell = None
    if spec is not None:
        from kernels.gluon_attention import outlier_slots, slot_views

        ell = outlier_slots(spec, value)
    codes = _nbytes(p.words, p.scale if p.nbits else None, p.zero)
    if ell is not None:
        plane0, pre, more = slot_views(ell, spec.nrows)
        extra = 0
        if more is not None:  # the half tiles whose prefix counts differ, as the kernel flags them (_more): each
            start = 0  # head's 2 ceil(rows / 128) from its first row, clamped to the part
            for c in p.counts:
                lo = torch.clamp(torch.arange(start, start + 128 * -(-c // 128), 64, device=pre.device), max=spec.nrows)
                hi = torch.clamp(lo + 64, max=spec.nrows)
                extra += int((pre[hi] > pre[lo]).sum()) * 64 * 8 * more.shape[0]
                start += c
        return codes + _nbytes(plane0) + 8 * -(-spec.nrows // 64) + extra
    return codes + _nbytes(getattr(p, "out_idx", None), getattr(p, "out_val", None))


def build_cases(B: int, hkv: int, T: int, d: int, seed: int = 0) -> dict:
    """Random fp16 K/V ``[B*hkv*T, d]`` and, per method, a list of (k_part, v_part, row_counts) pairs."""
    torch.manual_seed(seed)
    H = B * hkv
    k = torch.randn(H * T, d, device="cuda", dtype=torch.float16)
    v = torch.randn(H * T, d, device="cuda", dtype=torch.float16)
    counts = (T,) * H
    cases = {"triton-fp16": [(SimpleNamespace(x=k, counts=counts), SimpleNamespace(x=v, counts=counts), counts)]}
    for bits in (4, 2):
        cases[f"kivi-{bits}bit"] = [(channel_part(k, counts, bits, 32), token_part(v, counts, bits, 32), counts)]
    pairs, start = [], 0
    kh, vh = k.view(H, T, d), v.view(H, T, d)
    for bits, frac in ((2, 0.3), (3, 0.5), (4, 0.2)):
        n = int(round(frac * T)) if bits != 4 else T - start
        sub = (n,) * H
        ks = kh[:, start:start + n].reshape(-1, d)
        vs = vh[:, start:start + n].reshape(-1, d)
        pairs.append((token_part(ks, sub, bits, 32, 0.01), token_part(vs, sub, bits, 32, 0.01), sub))
        start += n
    cases["qaq-mix-2/3/4bit+1%"] = pairs
    for bits in (4, 3, 2):  # QAQ's format at one width: TokenQuant K and V, a scale and zero per row, no outliers
        cases[f"qaq-{bits}bit-rows"] = [(token_part(k, counts, bits, d), token_part(v, counts, bits, d), counts)]
    for bits in (4, 3, 2):  # ... and as QAQ stores them with its default outliers (each row's extremes exact)
        cases[f"qaq-{bits}bit-rows+out"] = [(qaq_rows(k, counts, bits), qaq_rows(v, counts, bits), counts)]
    # QAQ's outliers=0.05: about 8 per row, up to ~10 (the kernel's planes after the second)
    cases["qaq-2bit-rows+out5%"] = [(qaq_rows(k, counts, 2, 0.05), qaq_rows(v, counts, 2, 0.05), counts)]
    # the mix's widths and shares as QAQ stores them: rows with one scale and zero, each row's extremes exact
    pairs, start = [], 0
    for bits, frac in ((2, 0.3), (3, 0.5), (4, 0.2)):
        n = int(round(frac * T)) if bits != 4 else T - start
        ks = kh[:, start:start + n].reshape(-1, d)
        vs = vh[:, start:start + n].reshape(-1, d)
        pairs.append((qaq_rows(ks, (n,) * H, bits), qaq_rows(vs, (n,) * H, bits), (n,) * H))
        start += n
    cases["qaq-mix-rows-2/3/4bit+out"] = pairs
    # what QAQ's default bounds store (the embedded SmolLM2 at 2k tokens in fp16: 3-bit keys with 1-bit values 45% of
    # the rows, with 0-bit values 45%, the rest mostly 2/4-bit keys with 0/1-bit values): half and half
    half = T // 2
    pairs = []
    for vbits, sl in ((1, slice(0, half)), (0, slice(half, T))):
        ks, vs = kh[:, sl].reshape(-1, d), vh[:, sl].reshape(-1, d)
        n = (sl.stop - sl.start,) * H
        pairs.append((qaq_rows(ks, n, 3), qaq_rows(vs, n, vbits), n))
    cases["qaq-k3v1/k3v0-rows+out"] = pairs
    return {"k": k, "v": v, "cases": cases}


def plans_for(pairs, device) -> list:
    from kernels.dispatch import make_plan

    return [make_plan(kp, vp, [0] * len(c), list(c), device) for kp, vp, c in pairs]


def _flash():
    try:
        from flash_attn import flash_attn_with_kvcache  # type: ignore

        return flash_attn_with_kvcache
    except Exception:
        return None


@functools.cache
def _l2_sweep_buffer() -> torch.Tensor:
    return torch.ones(512 << 20, dtype=torch.uint8, device="cuda")


def _clean_l2() -> None:
    """Read 512 MiB (ten times the H100's L2): the L2 then holds clean lines of other data."""
    _l2_sweep_buffer().max()


def graph_time(fn, reps: int = 100) -> float:
    """Median ms of one replay of ``fn`` captured in a CUDA graph, each replay after :func:`_clean_l2`."""
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):  # warm-up (compilation, autotuning) outside the capture
        fn()
        fn()
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        fn()
    times = []
    for i in range(reps + 10):
        _clean_l2()
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        graph.replay()
        end.record()
        end.synchronize()
        if i >= 10:
            times.append(start.elapsed_time(end))
    return sorted(times)[len(times) // 2]


def _times(fn) -> tuple[float, float]:
    """(graph, eager) median ms of one call: replayed from a CUDA graph (:func:`graph_time`), and launched from
    Python each time (``do_bench``, whose L2 flush zero-fills a buffer)."""
    from triton.testing import do_bench

    eager = do_bench(fn, warmup=25, rep=200, return_mode="median")
    return graph_time(fn), eager


def bench_context(B: int, hq: int, hkv: int, T: int, d: int, copy_bw: float) -> list[dict]:
    from triton.testing import do_bench

    from kernels.triton_attention import attend_pairs, gluon_serves

    g = hq // hkv
    scale = d ** -0.5
    data = build_cases(B, hkv, T, d)
    k, v = data["k"], data["v"]
    q = torch.randn(B, hq, 1, d, device="cuda", dtype=torch.float16)
    k4, v4 = k.view(B, hkv, T, d), v.view(B, hkv, T, d)
    fp16_bytes = _nbytes(k, v, q)
    rows = []

    def add(method, times, nbytes, kernel="torch", base=None):
        """One row; ``base``: the SDPA time (ms) its speed-up is against (default: fp16 SDPA)."""
        ms, eager = times
        bw = nbytes / (ms * 1e-3)
        rows.append(dict(context=T, batch=B, method=method, kernel=kernel, time_us=round(ms * 1e3, 2), bytes=nbytes,
                         gbps=round(bw / 1e9, 1), frac_copy_bw=round(bw / copy_bw, 3),
                         eager_us=round(eager * 1e3, 2), base=base))

    def add_pairs(method, pairs, qq, base=None):
        plans = plans_for(pairs, q.device)
        served = [gluon_serves(p, qq) for p in plans]
        nbytes = sum(part_bytes(kp, pl.k if g else None) + part_bytes(vp, pl.v if g else None, True)
                     for (kp, vp, _), pl, g in zip(pairs, plans, served, strict=True)) + _nbytes(qq)
        kernel = "gluon" if all(served) else ("gluon+triton" if any(served) else "triton")
        add(method, _times(lambda: attend_pairs(qq, plans, scale)), nbytes, kernel, base)

    times = _times(lambda: F.scaled_dot_product_attention(q, k4, v4, scale=scale, enable_gqa=True))
    add("sdpa-fp16", times, fp16_bytes)
    t_sdpa = times[0]
    fl = _flash()
    if fl is not None:
        qf, kf, vf = q.transpose(1, 2), k4.transpose(1, 2).contiguous(), v4.transpose(1, 2).contiguous()
        add("flash-attn-fp16", _times(lambda: fl(qf, kf, vf, softmax_scale=scale)), fp16_bytes)
        del kf, vf
    qg = q.view(B, hkv, g, d).reshape(B * hkv, g, d)
    for name, pairs in data["cases"].items():
        add_pairs(name, pairs, qg)
    # bf16 caches (a bf16 model's): the KIVI parts quantized from the same K/V in bf16, against bf16 SDPA
    k16, v16, q16 = k.to(torch.bfloat16), v.to(torch.bfloat16), q.to(torch.bfloat16)
    t_bf16 = _times(lambda: F.scaled_dot_product_attention(q16, k16.view(B, hkv, T, d), v16.view(B, hkv, T, d),
                                                           scale=scale, enable_gqa=True))
    add("sdpa-bf16", t_bf16, fp16_bytes, base=t_bf16[0])
    qg16 = q16.view(B, hkv, g, d).reshape(B * hkv, g, d)
    counts = (T,) * (B * hkv)
    for bits in (4, 2):
        add_pairs(f"kivi-{bits}bit-bf16", [(channel_part(k16, counts, bits, 32), token_part(v16, counts, bits, 32),
                                             counts)], qg16, base=t_bf16[0])
    for r in rows:  # ratios against fp16 SDPA (bf16 rows: against bf16 SDPA)
        r["byte_ratio"] = round(fp16_bytes / r["bytes"], 3)
        base = r.pop("base")
        r["speedup_vs_sdpa"] = round((t_sdpa if base is None else base) / (r["time_us"] * 1e-3), 3)
        r["speedup_over_byte_ratio"] = round(r["speedup_vs_sdpa"] / r["byte_ratio"], 3)
    # prefill: quantize+pack of one layer (batch B) vs SDPA causal prefill at batch 1 scaled by B
    from kernels import triton_quant as tq

    t_q = do_bench(lambda: (tq.quantize_channels(k, 2, 32), tq.quantize_tokens(v, 2, 32)), warmup=10, rep=100,
                   return_mode="median")
    qp = torch.randn(1, hq, T, d, device="cuda", dtype=torch.float16)
    t_p = do_bench(lambda: F.scaled_dot_product_attention(qp, k4[:1], v4[:1], is_causal=True, scale=scale,
                                                          enable_gqa=True), warmup=1, rep=50, return_mode="median")
    rows.append(dict(context=T, batch=B, method="prefill: kivi-2bit quantize+pack K,V", time_us=round(t_q * 1e3, 2),
                     bytes=_nbytes(k, v), gbps=round(_nbytes(k, v) / (t_q * 1e-3) / 1e9, 1),
                     frac_copy_bw=round(_nbytes(k, v) / (t_q * 1e-3) / copy_bw, 3),
                     prefill_sdpa_us=round(t_p * B * 1e3, 1), quant_over_prefill=round(t_q / (t_p * B), 4)))
    return rows


COLS = ["context", "batch", "method", "kernel", "time_us", "bytes", "gbps", "frac_copy_bw", "byte_ratio",
        "speedup_vs_sdpa", "speedup_over_byte_ratio", "eager_us", "prefill_sdpa_us", "quant_over_prefill"]


SWEEP = [  # (BLOCK_N, num_warps, num_stages, programs per SM, BLOCK_O, fast loaders, fold K scales, fp16 V dequant)
    (32, 2, 2, 32, 16, True, False, False), (32, 2, 2, 32, 16, True, True, False),
    (32, 2, 2, 32, 16, True, False, True), (32, 2, 2, 32, 16, True, True, True),
    (32, 4, 2, 32, 16, True, True, True), (32, 2, 3, 32, 16, True, True, True), (32, 1, 2, 64, 16, True, True, True),
    (32, 2, 2, 16, 16, True, True, True), (16, 1, 2, 64, 16, True, True, True), (64, 4, 2, 16, 16, True, True, True),
    (32, 1, 3, 16, 16, True, True, True),  # the packed-pair defaults since session 3
]


def _set_config(cfg) -> None:
    from kernels import triton_attention as ta
    from kernels import triton_tiles

    ta.BLOCK_N, ta.NUM_WARPS, ta.NUM_STAGES, ta.PROGRAMS_PER_SM, ta.BLOCK_O, fast, ta.FOLD_K, ta.HALF_V = cfg
    # one config for every pair
    ta.PACKED_WARPS, ta.PACKED_PROGRAMS_PER_SM, ta.PACKED_STAGES = ta.NUM_WARPS, ta.PROGRAMS_PER_SM, ta.NUM_STAGES
    triton_tiles.FAST_PATHS = fast


def sweep(B: int, hkv: int, hq: int, T: int, d: int, copy_bw: float) -> list[dict]:
    """Time the packed cases under each launch configuration of :data:`SWEEP` (kernel-level, plans prebuilt)."""
    from triton.testing import do_bench

    from kernels import triton_attention as ta

    data = build_cases(B, hkv, T, d)
    q = torch.randn(B * hkv, hq // hkv, d, device="cuda", dtype=torch.float16)
    rows = []
    for cfg in SWEEP:
        _set_config(cfg)
        bn, nw, ns, pps, bo, fast, fold, half = cfg
        line = [f"BN={bn} w={nw} st={ns} pps={pps} BO={bo} fast={fast} foldK={fold} halfV={half}"]
        for name, pairs in data["cases"].items():
            plans = plans_for(pairs, q.device)
            nbytes = sum(part_bytes(kp) + part_bytes(vp) for kp, vp, _ in pairs)
            try:
                ms = do_bench(lambda plans=plans: ta.attend_pairs(q, plans, d ** -0.5), warmup=10, rep=60,
                              return_mode="median")
            except Exception as e:  # a configuration that does not compile (resources)
                print(f"# {line[0]} {name}: {type(e).__name__}")
                continue
            rows.append(dict(config=cfg, method=name, time_us=round(ms * 1e3, 1),
                             frac_copy_bw=round(nbytes / (ms * 1e-3) / copy_bw, 3)))
            line.append(f"{name}={ms * 1e3:.0f}us({nbytes / (ms * 1e-3) / copy_bw:.2f})")
        print("  ".join(line), flush=True)
    return rows


def _apply_best(rows: list[dict]) -> None:
    """Set the launch configuration with the lowest summed time of the packed cases."""
    tot: dict = {}
    for r in rows:
        if r["method"] != "triton-fp16":
            tot[r["config"]] = tot.get(r["config"], 0.0) + r["time_us"]
    best = min(tot, key=tot.get)
    _set_config(best)
    bn, nw, ns, pps, bo, fast, fold, half = best
    print(f"# best: BLOCK_N={bn} num_warps={nw} num_stages={ns} programs/SM={pps} BLOCK_O={bo} fast={fast} "
          f"fold_k={fold} half_v={half}")


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="kernels.bench", description=__doc__.splitlines()[0])
    ap.add_argument("--contexts", default="4k,16k,32k,64k,128k")
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--q-heads", type=int, default=32)
    ap.add_argument("--kv-heads", type=int, default=8)
    ap.add_argument("--head-dim", type=int, default=128)
    ap.add_argument("--csv", default="kernels-bench.csv")
    ap.add_argument("--sweep", action="store_true", help="sweep launch configurations at the first context only")
    ap.add_argument("--then-bench", action="store_true", help="after --sweep, run the benchmark with the best one")
    ap.add_argument("--fit", metavar="CSV", help="print each row's marginal bandwidth and fixed cost from a CSV of "
                    "this benchmark (kernels/fit.py; no GPU needed) and exit")
    a = ap.parse_args(argv)
    if a.fit:
        from kernels.fit import FitError, fit_rows, read_rows, to_markdown

        try:
            print(to_markdown(fit_rows(read_rows(a.fit))), end="")
        except FitError as e:
            print(f"kernels.bench: {e}", file=sys.stderr)
            return 2
        return 0
    if not torch.cuda.is_available():
        print("kernels.bench needs CUDA; nothing to do", file=sys.stderr)
        return 2
    copy_bw = copy_bandwidth()
    print(f"# {torch.cuda.get_device_name()}  torch {torch.__version__}  copy bandwidth {copy_bw / 1e9:.0f} GB/s")
    if a.sweep:
        res = sweep(a.batch, a.kv_heads, a.q_heads, _parse_len(a.contexts.split(",")[0]), a.head_dim, copy_bw)
        if not a.then_bench:
            return 0
        _apply_best(res)
    rows = []
    for T in [_parse_len(s) for s in a.contexts.split(",")]:
        try:
            rows += bench_context(a.batch, a.q_heads, a.kv_heads, T, a.head_dim, copy_bw)
            torch.cuda.empty_cache()
        except torch.OutOfMemoryError:
            print(f"# context {T}: out of memory, skipped")
            torch.cuda.empty_cache()
        for r in rows:
            if r["context"] == T:
                print("  ".join(f"{r.get(c, '')}" for c in COLS), flush=True)
    for r in rows:
        r["copy_gbps"] = round(copy_bw / 1e9, 1)
    with open(a.csv, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=COLS + ["copy_gbps"])
        w.writeheader()
        w.writerows(rows)
    print(f"# wrote {a.csv}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
