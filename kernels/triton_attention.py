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

import math
import os

import torch
import triton
import triton.language as tl

from kernels.triton_tiles import CHANNEL, PartSpec, load_tile, new_empty

LOG2E = 1.4426950408889634
LN2 = 0.6931471805599453
# launch parameters (module-level so benchmarks can sweep them; env overrides for experiments)
# defaults: best of the H100 sweep in kernels/NOTES.md
BLOCK_N = int(os.environ.get("KV_BLOCK_N", 32))
BLOCK_O = int(os.environ.get("KV_BLOCK_O", 16))
NUM_WARPS = int(os.environ.get("KV_WARPS", 2))
NUM_STAGES = int(os.environ.get("KV_STAGES", 2))
PROGRAMS_PER_SM = int(os.environ.get("KV_PROGRAMS_PER_SM", 32))


@triton.jit
def _attn_split_kernel(
    q_ptr, out_ptr, lse_ptr, s_ptr,
    k_data, k_scale, k_zero, k_optr, k_oidx, k_oval,
    v_data, v_scale, v_zero, v_optr, v_oidx, v_oval,
    kbeg_ptr, vbeg_ptr, cnt_ptr, k_nrows, v_nrows, M, NMAX, SPLIT_OFF, S_TOTAL, sm_scale,
    K_FMT: tl.constexpr, K_BITS: tl.constexpr, K_GROUP: tl.constexpr, K_PER: tl.constexpr, K_WPR: tl.constexpr,
    K_FAST: tl.constexpr, K_HAS_OUT: tl.constexpr, K_IEEE: tl.constexpr,
    V_FMT: tl.constexpr, V_BITS: tl.constexpr, V_GROUP: tl.constexpr, V_PER: tl.constexpr, V_WPR: tl.constexpr,
    V_FAST: tl.constexpr, V_HAS_OUT: tl.constexpr, V_IEEE: tl.constexpr,
    D: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_O: tl.constexpr,
    NSPLIT: tl.constexpr, ALIGN: tl.constexpr, WANT_SCORES: tl.constexpr, F32: tl.constexpr,
):
    h = tl.program_id(0)
    sp = tl.program_id(1)
    kbeg = tl.load(kbeg_ptr + h).to(tl.int64)
    vbeg = tl.load(vbeg_ptr + h).to(tl.int64)
    cnt = tl.load(cnt_ptr + h).to(tl.int64)
    abeg = kbeg - kbeg % ALIGN
    ntiles = tl.where(cnt > 0, tl.cdiv(kbeg + cnt - abeg, BLOCK_N), 0)
    tps = tl.cdiv(ntiles, NSPLIT)
    t_lo = sp * tps
    t_hi = tl.minimum(t_lo + tps, ntiles)

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
    for t in range(t_lo, t_hi):
        t0 = abeg + t * BLOCK_N
        krows = t0 + tl.arange(0, BLOCK_N)
        rmask = (krows >= kbeg) & (krows < kbeg + cnt)
        k = load_tile(k_data, k_scale, k_zero, k_optr, k_oidx, k_oval, t0, k_nrows, rmask, offs_d, dmask,
                      K_FMT, K_BITS, K_GROUP, K_PER, K_WPR, K_FAST, K_HAS_OUT, K_IEEE, D, BLOCK_N, BLOCK_D, BLOCK_O)
        if F32:
            s = tl.dot(q, tl.trans(k), input_precision="ieee")
        else:
            s = tl.dot(q, tl.trans(k.to(q.dtype)))
        s = tl.where(rmask[None, :], s * qk_scale, float("-inf"))
        if WANT_SCORES:
            j = krows - kbeg
            tl.store(s_ptr + (h * M + offs_m[:, None]).to(tl.int64) * NMAX + j[None, :], s * 0.6931471805599453,
                     mask=mmask[:, None] & rmask[None, :])
        v0 = t0 - kbeg + vbeg
        v = load_tile(v_data, v_scale, v_zero, v_optr, v_oidx, v_oval, v0, v_nrows, rmask, offs_d, dmask,
                      V_FMT, V_BITS, V_GROUP, V_PER, V_WPR, V_FAST, V_HAS_OUT, V_IEEE, D, BLOCK_N, BLOCK_D, BLOCK_O)
        m_new = tl.maximum(m_i, tl.max(s, 1))
        alpha = tl.exp2(m_i - m_new)
        p = tl.exp2(s - m_new[:, None])
        l_i = l_i * alpha + tl.sum(p, 1)
        if F32:
            acc = acc * alpha[:, None] + tl.dot(p, v, input_precision="ieee")
        else:
            acc = acc * alpha[:, None] + tl.dot(p.to(q.dtype), v.to(q.dtype))
        m_i = m_new
    has = l_i > 0
    out = acc / tl.where(has, l_i, 1.0)[:, None]
    lse = tl.where(has, (m_i + tl.log2(tl.where(has, l_i, 1.0))) * 0.6931471805599453, float("-inf"))
    row = (h * S_TOTAL + SPLIT_OFF + sp) * M + offs_m
    tl.store(out_ptr + row[:, None] * D + offs_d[None, :], out, mask=mmask[:, None] & dmask[None, :])
    tl.store(lse_ptr + row, lse, mask=mmask)


@triton.jit
def _merge_kernel(out_p, lse_p, out_ptr, lse_ptr, M, S, stride_h, stride_s,
                  D: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_M: tl.constexpr):
    """Combine ``S`` normalised partials ``[.., S, M, D]`` (strides in units of ``M*D`` / ``M``) by their lse."""
    h = tl.program_id(0)
    offs_m = tl.program_id(1) * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    mmask = offs_m < M
    m2 = mmask[:, None] & (offs_d < D)[None, :]
    m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK_M], tl.float32)
    acc = tl.zeros([BLOCK_M, BLOCK_D], tl.float32)
    for s in range(0, S):
        base = h * stride_h + s * stride_s
        lse = tl.load(lse_p + base * M + offs_m, mask=mmask, other=float("-inf")) * 1.4426950408889634
        o = tl.load(out_p + (base * M + offs_m[:, None]) * D + offs_d[None, :], mask=m2, other=0.0)
        m_new = tl.maximum(m_i, lse)
        safe = tl.where(m_new == float("-inf"), 0.0, m_new)
        alpha = tl.exp2(m_i - safe)
        w = tl.exp2(lse - safe)
        l_i = l_i * alpha + w
        acc = acc * alpha[:, None] + w[:, None] * o
        m_i = m_new
    has = l_i > 0
    out = acc / tl.where(has, l_i, 1.0)[:, None]
    lse_out = tl.where(has, (m_i + tl.log2(tl.where(has, l_i, 1.0))) * 0.6931471805599453, float("-inf"))
    tl.store(out_ptr + (h * M + offs_m[:, None]) * D + offs_d[None, :], out, mask=m2)
    tl.store(lse_ptr + h * M + offs_m, lse_out, mask=mmask)


def _num_sms(device: torch.device) -> int:
    if device.type == "cuda":
        return torch.cuda.get_device_properties(device).multi_processor_count
    return 4


def choose_splits(n_heads: int, max_rows: int, device: torch.device, min_tiles: int = 4) -> int:
    """Splits per head: about ``PROGRAMS_PER_SM`` programs per SM, each with at least ``min_tiles`` row tiles."""
    if max_rows <= 0:
        return 1
    want = max(1, math.ceil(PROGRAMS_PER_SM * _num_sms(device) / max(n_heads, 1)))
    most = max(1, math.ceil(max_rows / (BLOCK_N * min_tiles)))
    return min(want, most, 256)


class PairPlan:
    """One K part + one V part over the same rows, with per-head row ranges (device int64 tensors)."""

    def __init__(self, kspec: PartSpec, vspec: PartSpec, kbeg: torch.Tensor, vbeg: torch.Tensor, cnt: torch.Tensor,
                 max_cnt: int, nsplit: int | None = None):
        self.k, self.v, self.kbeg, self.vbeg, self.cnt, self.max_cnt = kspec, vspec, kbeg, vbeg, cnt, max_cnt
        self.nsplit = nsplit if nsplit is not None else choose_splits(len(cnt), max_cnt, cnt.device)


def _launch_split(q: torch.Tensor, plan: PairPlan, out_p, lse_p, scores, split_off: int, s_total: int, scale: float):
    H, M, D = q.shape
    block_d = triton.next_power_of_2(D)
    block_m = max(16, triton.next_power_of_2(M))
    k_fast = plan.k.fast and (plan.k.fmt != CHANNEL or BLOCK_N % plan.k.per == 0)
    align = BLOCK_N if plan.k.fmt == CHANNEL and k_fast else 1
    v_fast = plan.v.fast and plan.v.fmt != CHANNEL
    want = scores is not None
    _attn_split_kernel[(H, plan.nsplit)](
        q, out_p, lse_p, scores if want else lse_p,
        *plan.k.args(), *plan.v.args(),
        plan.kbeg, plan.vbeg, plan.cnt, plan.k.nrows, plan.v.nrows, M, plan.max_cnt if want else 0,
        split_off, s_total, float(scale),
        **plan.k.consts("K_", k_fast), **plan.v.consts("V_", v_fast),
        D=D, BLOCK_D=block_d, BLOCK_M=block_m, BLOCK_N=BLOCK_N, BLOCK_O=BLOCK_O, NSPLIT=plan.nsplit, ALIGN=align,
        WANT_SCORES=want, F32=q.dtype == torch.float32, num_warps=NUM_WARPS, num_stages=NUM_STAGES,
    )


def merge_splits(out_p: torch.Tensor, lse_p: torch.Tensor, stride_h: int, stride_s: int, n_heads: int,
                 n_splits: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Merge partials laid out with the given strides (in units of one ``[M, D]`` slab) -> ``[H, M, D], [H, M]``."""
    M, D = out_p.shape[-2], out_p.shape[-1]
    out = new_empty((n_heads, M, D), torch.float32, out_p.device)
    lse = new_empty((n_heads, M), torch.float32, out_p.device)
    block_m = min(16, triton.next_power_of_2(M))
    _merge_kernel[(n_heads, triton.cdiv(M, block_m))](out_p, lse_p, out, lse, M, n_splits, stride_h, stride_s,
                                                      D=D, BLOCK_D=triton.next_power_of_2(D), BLOCK_M=block_m)
    return out, lse


def attend_pairs(q: torch.Tensor, plans: list[PairPlan], scale: float, want_scores: bool = False
                 ) -> tuple[torch.Tensor, torch.Tensor, list[torch.Tensor | None]]:
    """Attention of ``q [H, M, d]`` over several part-pairs, merged in one launch.

    Returns ``out [H, M, d]`` float32 (normalised), ``lse [H, M]`` (natural log; -inf where no row) and, per plan,
    the scores ``[H, M, max_cnt]`` (float32, ``-inf`` padding) when ``want_scores``, else None.
    """
    q = q.contiguous()
    if q.dtype == torch.bfloat16 and os.environ.get("TRITON_INTERPRET") == "1":
        q = q.float()  # the interpreter mis-handles bf16 dots (numpy has no bf16); on GPUs bf16 runs as bf16
    H, M, D = q.shape
    s_total = sum(p.nsplit for p in plans)
    out_p = new_empty((H, s_total, M, D), torch.float32, q.device)
    lse_p = new_empty((H, s_total, M), torch.float32, q.device)
    scores, off = [], 0
    for p in plans:
        sc = None
        if want_scores:
            sc = torch.full((H, M, p.max_cnt), float("-inf"), device=q.device, dtype=torch.float32)
        _launch_split(q, p, out_p, lse_p, sc, off, s_total, scale)
        off += p.nsplit
        scores.append(sc)
    out, lse = merge_splits(out_p, lse_p, s_total, 1, H, s_total)
    return out, lse, scores


def merge(outs: list[torch.Tensor], lses: list[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    """Flash-decoding merge of partials ``[H, M, d]`` / ``[H, M]`` (float32 result), one Triton launch."""
    out_p = torch.stack([o.float() for o in outs])  # [P, H, M, D]
    lse_p = torch.stack([x.float() for x in lses])
    return merge_splits(out_p, lse_p, 1, out_p.shape[1], out_p.shape[1], len(outs))
