"""Fused split-K (flash-decoding) attention of grouped queries over packed KV parts, and the merge.

Layout: ``q [H, M, d]`` with ``H`` = KV heads (or sequences x KV heads: a batch is just more "heads", each with its own
row range) and ``M`` = query heads per KV head x query tokens. One program handles one head and one split of its
row range, all ``M`` queries at once (GQA without repeating K/V), reading K and V tiles straight from their packed
parts (:func:`kernels.triton_tiles.load_tile`). Each split writes a normalised partial output and its natural-log
log-sum-exp into a shared ``[H, S, M, d]`` buffer; one merge launch combines all splits of all part-pairs.

When scores are asked for, the kernel also writes the raw scaled scores ``s [H, M, n_max]`` (``-inf`` where a head
has fewer rows); the caller forms the statistics of the final probabilities ``exp(s - lse_total)``.
"""

from __future__ import annotations

import contextlib
import functools
import math
import os

import torch
import triton
import triton.language as tl

from kernels import fast_launch
from kernels.triton_tiles import (
    CHANNEL,
    DENSE,
    TOKEN,
    PartSpec,
    channel_codes,
    channel_codes_t,
    channel_half_t,
    load_tile,
    new_empty,
    outlier_corrections,
)

try:  # Gluon (explicit layouts) ships with Triton >= 3.5
    from kernels import gluon_attention as _gluon
except ImportError:  # pragma: no cover - older Triton
    _gluon = None

LOG2E = 1.4426950408889634
LN2 = 0.6931471805599453
# launch parameters (module-level so benchmarks can sweep them; env overrides for experiments)
# defaults: best of the H100 sweep in kernels/NOTES.md
BLOCK_N = int(os.environ.get("KV_BLOCK_N", 32))
BLOCK_O = int(os.environ.get("KV_BLOCK_O", 16))
NUM_WARPS = int(os.environ.get("KV_WARPS", 2))
NUM_STAGES = int(os.environ.get("KV_STAGES", 2))
PROGRAMS_PER_SM = int(os.environ.get("KV_PROGRAMS_PER_SM", 32))
# pairs with a packed part read by the fast loaders and no outliers (KIVI-like): one warp per program and twice the
# programs (H100 sweep at 32k: -10% vs 2 warps); pairs with outliers or general-path loaders (QAQ's mix) keep 2 warps,
# 32 programs/SM (same sweep: 4.1 ms vs 5.2 ms with 1 warp)
PACKED_WARPS = int(os.environ.get("KV_PACKED_WARPS", 1))
PACKED_PROGRAMS_PER_SM = int(os.environ.get("KV_PACKED_PROGRAMS_PER_SM", 16))
PACKED_STAGES = int(os.environ.get("KV_PACKED_STAGES", 3))
# several part pairs (QAQ's widths, MiKV's two precisions, a packed part beside its dense residual) captured into a
# CUDA graph: each pair's launch on a stream of its own, forked from and joined back to the caller's, so in the replay
# a launch's tail overlaps the next one's programs instead of the GPU idling between them (32k QAQ-format mix: 200-202
# us against 210). Eager calls keep one stream: the fork and join cost 50-70 us of host time per extra pair, far more
# than the overlap gains (0: never)
STREAMS = os.environ.get("KV_STREAMS", "1") == "1"
FOLD_K = os.environ.get("KV_FOLD_K", "1") == "1"  # per-channel keys: scales folded into q (tile = raw codes)
# fp16 caches: dequantize per-channel keys in fp16 too (instead of folding), and on GPUs turn codes into fp16 with the
# inline-PTX pair trick of triton_tiles.pair_dequant (H100, 32k: KIVI 2/4-bit 362/377 -> see kernels/NOTES.md)
HALF_K = os.environ.get("KV_HALF_K", "1") == "1"
PAIR_DEQUANT = os.environ.get("KV_PAIR", "1") == "1"
HALF_V = os.environ.get("KV_HALF_V", "1") == "1"  # per-token values of fp16 caches dequantized in fp16
# sparse outliers added as corrections to the scores / output (small dots per 16 outliers) instead of patched into
# the [BLOCK_N, d] tiles; lets outlier parts use the fast fp16 value paths
CORRECT_OUTLIERS = os.environ.get("KV_CORR", "1") == "1"
CORR_PACKED = os.environ.get("KV_CORR_PACKED", "0") == "1"  # corrected pairs take the 1-warp packed launch


# sizes are runtime values: specialising on them (== 1, multiple of 16) would recompile as a decode cache grows
_SIZES = ["k_nrows", "v_nrows", "M", "NMAX", "SPLIT_OFF", "S_TOTAL", "NSPLIT", "KB0", "KHS", "VB0", "VHS", "CNT"]


@triton.jit(do_not_specialize=_SIZES)
def _attn_split_kernel(
    q_ptr, out_ptr, lse_ptr, s_ptr,
    k_data, k_scale, k_zero, k_optr, k_oidx, k_oval,
    v_data, v_scale, v_zero, v_optr, v_oidx, v_oval,
    meta_ptr, KB0, KHS, VB0, VHS, CNT, COL0, k_nrows, v_nrows, M, NMAX, COLBASE, NEWR, LQ,
    SPLIT_OFF, S_TOTAL, NSPLIT, sm_scale,
    K_FMT: tl.constexpr, K_BITS: tl.constexpr, K_GROUP: tl.constexpr, K_PER: tl.constexpr, K_WPR: tl.constexpr,
    K_FAST: tl.constexpr, K_HAS_OUT: tl.constexpr, K_IEEE: tl.constexpr,
    V_FMT: tl.constexpr, V_BITS: tl.constexpr, V_GROUP: tl.constexpr, V_PER: tl.constexpr, V_WPR: tl.constexpr,
    V_FAST: tl.constexpr, V_HAS_OUT: tl.constexpr, V_IEEE: tl.constexpr,
    D: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_O: tl.constexpr,
    UNIFORM: tl.constexpr, ALIGN: tl.constexpr, WANT_SCORES: tl.constexpr, F32: tl.constexpr,
    K_FOLD: tl.constexpr, V_HALF: tl.constexpr, K_HALF: tl.constexpr = False, PAIR_ASM: tl.constexpr = False,
    K_CORR: tl.constexpr = False, V_CORR: tl.constexpr = False,
    BIAS_CHUNK: tl.constexpr = 16,
):
    h = tl.program_id(0)
    sp = tl.program_id(1)
    if UNIFORM:  # every head: rows KB0 + h*KHS (K) / VB0 + h*VHS (V), CNT of them, score column COL0
        kbeg = (KB0 + h * KHS).to(tl.int64)
        vbeg = (VB0 + h * VHS).to(tl.int64)
        cnt = tl.full([], CNT, tl.int64)
        col = tl.full([], COL0, tl.int64)
    else:  # meta [4, H]: kbeg, vbeg, count, score column per head
        nh = tl.num_programs(0)
        kbeg = tl.load(meta_ptr + h).to(tl.int64)
        vbeg = tl.load(meta_ptr + nh + h).to(tl.int64)
        cnt = tl.load(meta_ptr + 2 * nh + h).to(tl.int64)
        col = tl.load(meta_ptr + 3 * nh + h).to(tl.int64)
    abeg = kbeg - kbeg % ALIGN
    ntiles = tl.where(cnt > 0, tl.cdiv(kbeg + cnt - abeg, BLOCK_N), 0)
    tps = tl.cdiv(ntiles, NSPLIT)
    t_lo = sp * tps
    t_hi = tl.minimum(t_lo + tps, ntiles)
    # the last NEWR rows of each head are this step's tokens: query token i (= m % LQ) sees new row t iff t <= i
    new0 = kbeg + cnt - NEWR

    offs_m = tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    mmask = offs_m < M
    dmask = offs_d < D
    q = tl.load(q_ptr + (h * M + offs_m[:, None]) * D + offs_d[None, :], mask=mmask[:, None] & dmask[None, :],
                other=0.0)
    m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK_M], tl.float32)
    acc = tl.zeros([BLOCK_M, BLOCK_D], tl.float32)
    qk_scale = sm_scale * 1.4426950408889634
    for tc in range(t_lo, t_hi, BIAS_CHUNK):
        if K_FOLD and not K_HALF:
            # q.zero of the next BIAS_CHUNK tiles' key blocks in one small dot (instead of a reduction per tile)
            tt = tc + tl.arange(0, BIAS_CHUNK)
            zb = (abeg + tt * BLOCK_N) // K_GROUP
            zt = tl.load(k_zero + zb[:, None] * D + offs_d[None, :], mask=(tt < t_hi)[:, None] & dmask[None, :],
                         other=0.0)
            if F32:
                bz = tl.dot(q, tl.trans(zt.to(tl.float32)), input_precision="ieee")  # [BLOCK_M, BIAS_CHUNK]
            else:
                bz = tl.dot(q, tl.trans(zt.to(q.dtype)))
        for t in range(tc, tl.minimum(tc + BIAS_CHUNK, t_hi)):
            t0 = abeg + t * BLOCK_N
            krows = t0 + tl.arange(0, BLOCK_N)
            rmask = (krows >= kbeg) & (krows < kbeg + cnt)
            if K_HALF:
                # per-channel keys of an fp16 cache, one quantization block per tile, dequantized in fp16 (by inline
                # PTX on GPUs: no int-to-float conversions)
                kt = channel_half_t(k_data, k_scale, k_zero, t0, k_nrows, offs_d, dmask, K_BITS, K_GROUP, K_PER, K_WPR,
                                    D, BLOCK_N, PAIR_ASM)
                s = tl.dot(q, kt)
            elif K_FOLD:
                # per-channel keys, one quantization block per tile: q.(c*scale + zero) = (q*scale).c + q.zero, so the
                # tile stays raw codes (exact in fp16) and the scales touch only the M query rows
                blk = t0 // K_GROUP
                # (no row mask: t0 < k_nrows, every tile holds a valid row)
                ksc = tl.load(k_scale + blk * D + offs_d, mask=dmask, other=0.0).to(tl.float32)
                qf = q.to(tl.float32)
                bias = tl.sum(tl.where((tl.arange(0, BIAS_CHUNK) == t - tc)[None, :], bz, 0.0), 1)
                if K_FAST == 2:
                    ct = channel_codes_t(k_data, t0, k_nrows, offs_d, dmask, K_BITS, K_GROUP, K_PER, K_WPR, D, BLOCK_N)
                else:
                    ct = tl.trans(channel_codes(k_data, t0, k_nrows, offs_d, dmask, K_BITS, K_GROUP, K_PER, K_WPR, D,
                                                BLOCK_N))
                if F32:
                    s = tl.dot(qf * ksc[None, :], ct.to(tl.float32), input_precision="ieee")
                else:
                    s = tl.dot((qf * ksc[None, :]).to(q.dtype), ct.to(q.dtype))
                s = s + bias[:, None]
            else:
                k = load_tile(k_data, k_scale, k_zero, k_optr, k_oidx, k_oval, t0, k_nrows, rmask, offs_d, dmask,
                              K_FMT, K_BITS, K_GROUP, K_PER, K_WPR, K_FAST, K_HAS_OUT, K_IEEE, D, BLOCK_N, BLOCK_D,
                              BLOCK_O)
                if F32:
                    s = tl.dot(q, tl.trans(k), input_precision="ieee")
                else:
                    s = tl.dot(q, tl.trans(k.to(q.dtype)))
                if K_CORR:  # outliers as corrections of the scores (the tile was not patched)
                    qrow = q_ptr + (h * M + tl.minimum(offs_m, M - 1))[:, None] * D
                    s = outlier_corrections(s, qrow, k_optr, k_oidx, k_oval, t0, k_nrows, 1, D, BLOCK_N, BLOCK_D,
                                            BLOCK_O, K_IEEE)
            see = rmask[None, :] & ((krows - new0)[None, :] <= (offs_m % LQ)[:, None])
            s = tl.where(see, s * qk_scale, float("-inf"))
            if WANT_SCORES:
                j = COLBASE + col + krows - kbeg
                tl.store(s_ptr + (h * M + offs_m[:, None]).to(tl.int64) * NMAX + j[None, :], s * 0.6931471805599453,
                         mask=mmask[:, None] & rmask[None, :])
            v0 = t0 - kbeg + vbeg
            v = load_tile(v_data, v_scale, v_zero, v_optr, v_oidx, v_oval, v0, v_nrows, rmask, offs_d, dmask,
                          V_FMT, V_BITS, V_GROUP, V_PER, V_WPR, V_FAST, V_HAS_OUT, V_IEEE, D, BLOCK_N, BLOCK_D, BLOCK_O,
                          V_HALF, V_HALF and PAIR_ASM and V_GROUP % V_PER == 0)
            m_new = tl.maximum(m_i, tl.max(s, 1))
            m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)  # a query may see no row of a tile (causal tail)
            alpha = tl.exp2(m_i - m_safe)
            p = tl.exp2(s - m_safe[:, None])
            l_i = l_i * alpha + tl.sum(p, 1)
            if F32:
                acc = acc * alpha[:, None] + tl.dot(p, v, input_precision="ieee")
            else:
                acc = acc * alpha[:, None] + tl.dot(p.to(q.dtype), v.to(q.dtype))
            m_i = m_new
            if V_CORR:  # outliers as corrections of the output (the tile was not patched)
                acc = outlier_corrections(acc, p, v_optr, v_oidx, v_oval, v0, v_nrows, 0, D, BLOCK_N, BLOCK_D, BLOCK_O,
                                          V_IEEE)
    has = l_i > 0
    out = acc / tl.where(has, l_i, 1.0)[:, None]
    lse = tl.where(has, (m_i + tl.log2(tl.where(has, l_i, 1.0))) * 0.6931471805599453, float("-inf"))
    row = (h * S_TOTAL + SPLIT_OFF + sp) * M + offs_m
    tl.store(out_ptr + row[:, None] * D + offs_d[None, :], out, mask=mmask[:, None] & dmask[None, :])
    tl.store(lse_ptr + row, lse, mask=mmask)


@triton.jit(do_not_specialize=["M", "S", "stride_h", "stride_s"])
def _merge_kernel(out_p, lse_p, out_ptr, lse_ptr, M, S, stride_h, stride_s,
                  D: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_S: tl.constexpr):
    """Combine ``S`` normalised partials ``[.., S, M, D]`` (strides in units of ``M*D`` / ``M``) by their lse.

    A program owns one output row ``[D]`` of one head and reads ``BLOCK_S`` splits per step: their lse once per
    split (the weights), their rows in one load, so at the usual split counts (<= 32) the whole merge is one round of
    loads."""
    h = tl.program_id(0)
    m = tl.program_id(1)
    c = tl.arange(0, BLOCK_D)
    cm = c < D
    m_i = tl.full([1], float("-inf"), tl.float32)
    l_i = tl.zeros([1], tl.float32)
    acc = tl.zeros([BLOCK_D], tl.float32)
    for s0 in range(0, S, BLOCK_S):
        s = s0 + tl.arange(0, BLOCK_S)
        sm = s < S
        row = (h * stride_h + s * stride_s).to(tl.int64) * M + m
        x = tl.load(lse_p + row, mask=sm, other=float("-inf")) * 1.4426950408889634
        o = tl.load(out_p + row[:, None] * D + c[None, :], mask=sm[:, None] & cm[None, :], other=0.0)
        m_new = tl.maximum(m_i, tl.max(x, 0))
        safe = tl.where(m_new == float("-inf"), 0.0, m_new)
        alpha = tl.exp2(m_i - safe)
        w = tl.exp2(x - safe)
        l_i = l_i * alpha + tl.sum(w, 0)
        acc = acc * alpha + tl.sum(w[:, None] * o, 0)
        m_i = m_new
    has = l_i > 0
    out = acc / tl.where(has, l_i, 1.0)
    lse_out = tl.where(has, (m_i + tl.log2(tl.where(has, l_i, 1.0))) * 0.6931471805599453, float("-inf"))
    tl.store(out_ptr + (h * M + m).to(tl.int64) * D + c, out, mask=cm)
    tl.store(lse_ptr + h * M + m + tl.zeros([1], tl.int32), lse_out)


@functools.cache
def _num_sms_cached(index: int) -> int:
    return torch.cuda.get_device_properties(index).multi_processor_count


def _num_sms(device: torch.device) -> int:
    if device.type == "cuda":
        return _num_sms_cached(device.index if device.index is not None else torch.cuda.current_device())
    return 4


def choose_splits(n_heads: int, max_rows: int, device: torch.device, min_tiles: int = 4,
                  programs_per_sm: int | None = None) -> int:
    """Splits per head: about ``programs_per_sm`` (default :data:`PROGRAMS_PER_SM`) programs per SM, each with at
    least ``min_tiles`` row tiles."""
    if max_rows <= 0:
        return 1
    pps = programs_per_sm or PROGRAMS_PER_SM
    want = max(1, math.ceil(pps * _num_sms(device) / max(n_heads, 1)))
    most = max(1, math.ceil(max_rows / (BLOCK_N * min_tiles)))
    return min(want, most, 256)


def _progression(x: list[int]) -> tuple[int, int] | None:
    """``(first, step)`` when ``x`` is an arithmetic progression, else None."""
    step = x[1] - x[0] if len(x) > 1 else 0
    return (x[0], step) if all(b - a == step for a, b in zip(x, x[1:])) else None


class PairPlan:
    """One K part + one V part over the same rows, with per-head row ranges; reusable across decode steps.

    Parameters
    ----------
    kspec, vspec : PartSpec
    kbeg, vbeg, cnt : list[int]
        Per head: first row in the K part and in the V part (absolute, in the part's head-grouped rows) and row count.
    col : list[int] or None
        Per head: column of the pair's first row in the score buffer (added to ``col_base``); default 0.
    nsplit : int or None
        Splits per head (default :func:`choose_splits`).
    col_base : int
        Score-buffer column where the pair's owner (a segment) starts.
    newr : int
        The last ``newr`` rows of every head are the current step's tokens (causal among themselves).

    When the per-head numbers are arithmetic progressions (equal counts, evenly spaced heads: every dense segment
    that was not evicted per head) they travel as kernel scalars; otherwise as one int64 ``[4, H]`` device tensor,
    built here once.
    """

    def __init__(self, kspec: PartSpec, vspec: PartSpec, kbeg, vbeg, cnt, col=None, nsplit: int | None = None,
                 col_base: int = 0, newr: int = 0, device: torch.device | None = None):
        kbeg, vbeg, cnt = [int(x) for x in kbeg], [int(x) for x in vbeg], [int(x) for x in cnt]
        col = [0] * len(cnt) if col is None else [int(x) for x in col]
        self.k, self.v, self.n_heads = kspec, vspec, len(cnt)
        self.max_cnt = max(cnt) if cnt else 0
        device = device if device is not None else _device_of(kspec)
        self.k_corr = CORRECT_OUTLIERS and kspec.has_out and kspec.odelta is not None
        self.v_corr = CORRECT_OUTLIERS and vspec.has_out and vspec.odelta is not None
        corr = {id(kspec): self.k_corr, id(vspec): self.v_corr}
        simple = all(sp.fmt == DENSE or (sp.fast and (not sp.has_out or (corr[id(sp)] and CORR_PACKED)))
                     for sp in (kspec, vspec))
        self.packed = (kspec.fmt != DENSE or vspec.fmt != DENSE) and simple
        self.gluon = _gluon is not None and _gluon.pair_fits(kspec, vspec)  # served by kernels.gluon_attention
        self.col_base, self.newr = col_base, newr
        # every head's first key and value rows of one parity (the Gluon kernel's staged rows start at even rows)
        self.kv_parity = all((a - b) % 2 == 0 for a, b in zip(kbeg, vbeg, strict=True))
        kp, vp = _progression(kbeg), _progression(vbeg)
        self.uniform = kp is not None and vp is not None and len(set(cnt)) <= 1 and len(set(col)) <= 1
        if self.uniform:
            self.meta = None
            self.scalars = (kp[0], kp[1], vp[0], vp[1], cnt[0] if cnt else 0, col[0] if col else 0)
        else:
            self.meta = torch.tensor([kbeg, vbeg, cnt, col], dtype=torch.int64, device=device)
            self.scalars = (0, 0, 0, 0, 0, 0)
        # per-head unit counters of the Gluon kernel's dynamic schedule (used when it is on at launch)
        self.counters = _gluon.counters(len(cnt), device) if self.gluon and device.type == "cuda" else None
        if nsplit is not None:
            self.nsplit = nsplit
        elif self.gluon and device.type == "cuda":
            self.nsplit = self._gluon_splits(len(cnt), device)
        else:
            pps = PACKED_PROGRAMS_PER_SM if self.packed else PROGRAMS_PER_SM
            self.nsplit = choose_splits(len(cnt), self.max_cnt, device, 4, pps)
        k_fast = kspec.fast and (kspec.fmt != CHANNEL or BLOCK_N % kspec.per == 0)
        self.align = BLOCK_N if kspec.fmt == CHANNEL and k_fast else 1
        v_fast = vspec.fast and vspec.fmt != CHANNEL
        self.consts = {**kspec.consts("K_", k_fast), **vspec.consts("V_", v_fast), "K_CORR": self.k_corr,
                       "V_CORR": self.v_corr}
        if self.k_corr:
            self.consts["K_HAS_OUT"] = False
        if self.v_corr:
            self.consts["V_HAS_OUT"] = False
        self.fold_k = k_fast and kspec.fmt == CHANNEL and not kspec.has_out  # and one block per tile
        self.half_v = v_fast and vspec.fmt == TOKEN and (not vspec.has_out or self.v_corr) and vspec.bits > 0
        self.args = (*kspec.args(self.k_corr), *vspec.args(self.v_corr))

    def _gluon_splits(self, n_heads: int, device: torch.device) -> int:
        """Splits per head for the Gluon kernel: as many programs as fit on the GPU at once (one wave: no tail), and
        no split without a 128-token tile."""
        try:
            fit = _gluon.resident_programs(self)
        except Exception as exc:  # it cannot be built here: the Triton kernel will serve the plan
            _gluon.disable(exc)
            self.gluon = False
            return choose_splits(n_heads, self.max_cnt, device, 4, PACKED_PROGRAMS_PER_SM)
        tiles = max(1, math.ceil(self.max_cnt / 128))
        want = max(1, fit * _num_sms(device) // max(n_heads, 1))
        if _gluon.dynamic_enabled() and tiles >= want * _gluon.unit_halves(self.k):
            return min(want, 256)  # two units or more per program: the counter balances them
        per = math.ceil(tiles / min(want, tiles))
        return max(1, min(math.ceil(tiles / per), 256))


def _device_of(spec: PartSpec) -> torch.device:
    return spec.data.device


def _pair_asm_ok(q: torch.Tensor) -> bool:
    """Inline PTX needs an NVIDIA GPU (not ROCm, not the interpreter)."""
    return PAIR_DEQUANT and q.is_cuda and torch.version.hip is None and os.environ.get("TRITON_INTERPRET") != "1"


def gluon_serves(plan: PairPlan, q: torch.Tensor) -> bool:
    """Whether the Gluon kernel (:mod:`kernels.gluon_attention`) serves ``plan`` for these queries."""
    return _gluon is not None and _gluon.supports(plan, q)


def _launch_split(q: torch.Tensor, plan: PairPlan, out_p, lse_p, scores, split_off: int, s_total: int, scale: float,
                  lq: int, chain: int = 0, ve: torch.Tensor | None = None):
    if gluon_serves(plan, q):  # packed 2/4-bit pairs (few outliers per row): dequantized in the mma operand layout
        try:
            _gluon.launch(q, plan, out_p, lse_p, scores, split_off, s_total, scale, lq, chain, ve=ve)
            return
        except Exception as exc:  # Gluon is experimental: a Triton release that cannot build it falls back
            _gluon.disable(exc)
    H, M, D = q.shape
    want = scores is not None
    one_block = plan.fold_k and plan.k.group % BLOCK_N == 0  # per-channel keys, one quantization block per tile
    fast_launch.launch(_attn_split_kernel, (H, plan.nsplit), (
        q, out_p, lse_p, scores if want else lse_p, *plan.args,
        plan.meta if plan.meta is not None else lse_p, *plan.scalars, plan.k.nrows, plan.v.nrows, M,
        scores.shape[-1] if want else 0, plan.col_base, plan.newr, lq, split_off, s_total, plan.nsplit, float(scale)),
        dict(**plan.consts, D=D, BLOCK_D=triton.next_power_of_2(D), BLOCK_M=max(16, triton.next_power_of_2(M)),
             BLOCK_N=BLOCK_N, BLOCK_O=BLOCK_O, UNIFORM=plan.uniform, ALIGN=plan.align, WANT_SCORES=want,
             F32=q.dtype == torch.float32, K_FOLD=FOLD_K and one_block,
             V_HALF=HALF_V and plan.half_v and q.dtype == torch.float16,
             K_HALF=HALF_K and one_block and q.dtype == torch.float16,
             PAIR_ASM=_pair_asm_ok(q),
             num_warps=PACKED_WARPS if plan.packed else NUM_WARPS,
             num_stages=PACKED_STAGES if plan.packed else NUM_STAGES))


def merge_splits(out_p: torch.Tensor, lse_p: torch.Tensor, stride_h: int, stride_s: int, n_heads: int,
                 n_splits: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Merge partials laid out with the given strides (in units of one ``[M, D]`` slab) -> ``[H, M, D], [H, M]``."""
    M, D = out_p.shape[-2], out_p.shape[-1]
    out = new_empty((n_heads, M, D), torch.float32, out_p.device)
    lse = new_empty((n_heads, M), torch.float32, out_p.device)
    # one-warp programs, one per output row, up to 4096 partial elements per step (32 splits of d = 128): on the H100
    # (64 heads x 24 splits x 4 rows, CUDA graph) 2.0 us over an empty graph, against 4.4 us for session 3's programs
    # of 32 outputs that weighed each element by its own lse load, 8 splits per step (three rounds of loads)
    block_d = triton.next_power_of_2(D)
    block_s = min(triton.next_power_of_2(max(n_splits, 1)), max(1, 4096 // block_d))
    fast_launch.launch(_merge_kernel, (n_heads, M), (out_p, lse_p, out, lse, M, n_splits, stride_h, stride_s),
                       dict(D=D, BLOCK_D=block_d, BLOCK_S=block_s, num_warps=1))
    return out, lse


def attend_pairs(q: torch.Tensor, plans: list[PairPlan], scale: float, scores: torch.Tensor | None = None,
                 lq: int = 1) -> tuple[torch.Tensor, torch.Tensor]:
    """Attention of ``q [H, M, d]`` over several part-pairs, merged in one launch.

    ``M`` rows are ``g`` query heads x ``lq`` query tokens (token fastest). When ``scores`` (float32
    ``[H, M, N]``, pre-filled with ``-inf``) is given, each pair writes its raw scaled scores (natural units) at
    columns ``col_base + col[h] + j``. Returns ``out [H, M, d]`` float32 (normalised) and ``lse [H, M]`` (natural log;
    -inf where no row).
    """
    q = q.contiguous()
    if q.dtype == torch.bfloat16 and os.environ.get("TRITON_INTERPRET") == "1":
        q = q.float()  # the interpreter mis-handles bf16 dots (numpy has no bf16); on GPUs bf16 runs as bf16
    H, M, D = q.shape
    s_total = sum(p.nsplit for p in plans)
    out_p = new_empty((H, s_total, M, D), torch.float32, q.device)
    lse_p = new_empty((H, s_total, M), torch.float32, q.device)
    # what the Gluon launches read that is computed on the device (value exponents), before the first launch
    ves = [None] * len(plans)
    if _gluon is not None:
        try:
            ves = _gluon.prepare(plans, q)
        except Exception as exc:  # as for a launch: the Triton kernel serves the pairs from now on
            _gluon.disable(exc)
    chain = _gluon is not None and _gluon.chained(plans, q)  # one stream, each launch starting in the last's tail
    fork = not chain and STREAMS and q.is_cuda and len(plans) > 1 and torch.cuda.is_current_stream_capturing()
    side = _side_streams(q.device, len(plans) - 1) if fork else []
    main = torch.cuda.current_stream(q.device) if side else None
    for st in side:  # everything the launches read was written on the caller's stream
        st.wait_stream(main)
    off = 0
    for i, p in enumerate(plans):
        with torch.cuda.stream(side[i - 1]) if i and side else contextlib.nullcontext():
            _launch_split(q, p, out_p, lse_p, scores, off, s_total, scale, lq, (2 if i else 1) if chain else 0,
                          ves[i])
        off += p.nsplit
    for st in side:  # the merge (and whoever frees out_p / lse_p) comes after every launch
        main.wait_stream(st)
    return merge_splits(out_p, lse_p, s_total, 1, H, s_total)


_SIDE: dict = {}


def _side_streams(device: torch.device, n: int) -> list:
    """``n`` side streams of ``device`` (from torch's pool, created once per device and reused: no stream is created
    while a CUDA graph is being captured after the first call)."""
    pool = _SIDE.setdefault(device.index if device.index is not None else torch.cuda.current_device(), [])
    while len(pool) < n:
        pool.append(torch.cuda.Stream(device=device))
    return pool[:n]


def merge(outs: list[torch.Tensor], lses: list[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    """Flash-decoding merge of partials ``[H, M, d]`` / ``[H, M]`` (float32 result), one Triton launch."""
    out_p = torch.stack([o.float() for o in outs])  # [P, H, M, D]
    lse_p = torch.stack([x.float() for x in lses])
    return merge_splits(out_p, lse_p, 1, out_p.shape[1], out_p.shape[1], len(outs))
