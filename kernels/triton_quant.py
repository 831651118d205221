"""Triton quantize+pack and unpack/dequantize kernels (KIVI min/max rule), bit-identical to :mod:`kernels.reference`.

* :func:`quantize_tokens`: per-token groups of channels -> TokenQuant tensors ``words [n, W]``, ``scale, zero``.
* :func:`quantize_channels`: per-channel groups of ``G`` tokens -> ChannelQuant ``words [nb, d, ceil(G/per)]``.
* :func:`unpack`: int32 words -> int32 codes along the last axis (any leading shape).
* :func:`dequant_tokens` / :func:`dequant_channels`: float32 rows, outliers applied (same tile loader as attention).

Exactness: the reference computes ``(x - min) / scale`` with IEEE float32 division and rounds half to even; the
kernels use ``div_rn`` (Triton's ``/`` is approximate on NVIDIA GPUs) and an exact round-half-even.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from kernels import fast_launch
from kernels.triton_tiles import PartSpec, _pow2, bit_or, load_tile, new_empty, rint


@triton.jit
def _quant_tokens_kernel(x_ptr, words_ptr, scale_ptr, zero_ptr, n,
                         BITS: tl.constexpr, GROUP: tl.constexpr, PER: tl.constexpr, WPR: tl.constexpr,
                         D: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_R: tl.constexpr, FAST: tl.constexpr):
    rows = tl.program_id(0) * BLOCK_R + tl.arange(0, BLOCK_R)
    rmask = rows < n
    offs_d = tl.arange(0, BLOCK_D)
    dmask = offs_d < D
    m2 = rmask[:, None] & dmask[None, :]
    x = tl.load(x_ptr + rows[:, None].to(tl.int64) * D + offs_d[None, :], mask=m2, other=0.0).to(tl.float32)
    NG: tl.constexpr = D // GROUP
    MAXQ: tl.constexpr = (1 << BITS) - 1
    mn = tl.zeros([BLOCK_R, BLOCK_D], tl.float32)
    sc = tl.zeros([BLOCK_R, BLOCK_D], tl.float32)
    gid = offs_d // GROUP
    for g in tl.static_range(NG):
        gm = (gid == g)[None, :] & m2
        mn_g = tl.min(tl.where(gm, x, float("inf")), 1)
        mx_g = tl.max(tl.where(gm, x, float("-inf")), 1)
        sc_g = tl.math.div_rn(mx_g - mn_g, tl.full([BLOCK_R], MAXQ, tl.float32))
        tl.store(scale_ptr + rows.to(tl.int64) * NG + g, sc_g.to(scale_ptr.dtype.element_ty), mask=rmask)
        tl.store(zero_ptr + rows.to(tl.int64) * NG + g, mn_g.to(zero_ptr.dtype.element_ty), mask=rmask)
        mn = tl.where(gm, mn_g[:, None], mn)
        sc = tl.where(gm, sc_g[:, None], sc)
    safe = tl.where(sc > 0, sc, 1.0)
    v = tl.math.div_rn(x - mn, safe)
    v = tl.minimum(tl.maximum(v, 0.0), MAXQ * 1.0)
    code = tl.where((sc > 0) & m2, rint(v), 0.0).to(tl.int32)
    shifted = code << ((offs_d % PER) * BITS)[None, :]
    if FAST:
        w = tl.reduce(tl.reshape(shifted, (BLOCK_R, WPR, PER)), 2, bit_or)
        tl.store(words_ptr + rows[:, None].to(tl.int64) * WPR + tl.arange(0, WPR)[None, :], w, mask=rmask[:, None])
    else:
        for wi in tl.static_range(WPR):
            sel = ((offs_d // PER) == wi)[None, :]
            w = tl.reduce(tl.where(sel, shifted, 0), 1, bit_or)
            tl.store(words_ptr + rows.to(tl.int64) * WPR + wi, w, mask=rmask)


@triton.jit
def _quant_channels_kernel(x_ptr, words_ptr, scale_ptr, zero_ptr,
                           BITS: tl.constexpr, GROUP: tl.constexpr, PER: tl.constexpr, WPR: tl.constexpr,
                           D: tl.constexpr, BLOCK_G: tl.constexpr, BLOCK_D: tl.constexpr, FAST: tl.constexpr):
    blk = tl.program_id(0).to(tl.int64)
    offs_d = tl.program_id(1) * BLOCK_D + tl.arange(0, BLOCK_D)
    offs_t = tl.arange(0, BLOCK_G)
    dmask = offs_d < D
    tmask = offs_t < GROUP
    m2 = tmask[:, None] & dmask[None, :]
    x = tl.load(x_ptr + (blk * GROUP + offs_t[:, None]) * D + offs_d[None, :], mask=m2, other=0.0).to(tl.float32)
    MAXQ: tl.constexpr = (1 << BITS) - 1
    mn = tl.min(tl.where(m2, x, float("inf")), 0)
    mx = tl.max(tl.where(m2, x, float("-inf")), 0)
    sc = tl.math.div_rn(mx - mn, tl.full([BLOCK_D], MAXQ, tl.float32))
    tl.store(scale_ptr + blk * D + offs_d, sc.to(scale_ptr.dtype.element_ty), mask=dmask)
    tl.store(zero_ptr + blk * D + offs_d, mn.to(zero_ptr.dtype.element_ty), mask=dmask)
    safe = tl.where(sc > 0, sc, 1.0)
    v = tl.math.div_rn(x - mn[None, :], tl.broadcast_to(safe[None, :], (BLOCK_G, BLOCK_D)))
    v = tl.minimum(tl.maximum(v, 0.0), MAXQ * 1.0)
    code = tl.where((sc > 0)[None, :] & m2, rint(v), 0.0).to(tl.int32)
    shifted = code << ((offs_t % PER) * BITS)[:, None]
    if FAST:
        w = tl.reduce(tl.reshape(shifted, (WPR, PER, BLOCK_D)), 1, bit_or)  # [WPR, BLOCK_D]
        ptr = words_ptr + (blk * D + offs_d[None, :]) * WPR + tl.arange(0, WPR)[:, None]
        tl.store(ptr, w, mask=dmask[None, :])
    else:
        for wi in tl.static_range(WPR):
            sel = ((offs_t // PER) == wi)[:, None]
            w = tl.reduce(tl.where(sel, shifted, 0), 0, bit_or)
            tl.store(words_ptr + (blk * D + offs_d) * WPR + wi, w, mask=dmask)


@triton.jit
def _unpack_kernel(words_ptr, codes_ptr, rows, n,
                   BITS: tl.constexpr, PER: tl.constexpr, WPR: tl.constexpr, BLOCK_R: tl.constexpr,
                   BLOCK_C: tl.constexpr):
    r = tl.program_id(0) * BLOCK_R + tl.arange(0, BLOCK_R)
    c = tl.program_id(1) * BLOCK_C + tl.arange(0, BLOCK_C)
    m2 = (r < rows)[:, None] & (c < n)[None, :]
    w = tl.load(words_ptr + r[:, None].to(tl.int64) * WPR + (c // PER)[None, :], mask=m2, other=0)
    code = (w >> ((c % PER) * BITS)[None, :]) & ((1 << BITS) - 1)
    tl.store(codes_ptr + r[:, None].to(tl.int64) * n + c[None, :], code, mask=m2)


@triton.jit
def _dequant_kernel(out_ptr, data, scale, zero, optr, oidx, oval, nrows,
                    FMT: tl.constexpr, BITS: tl.constexpr, GROUP: tl.constexpr, PER: tl.constexpr,
                    WPR: tl.constexpr, FAST: tl.constexpr, HAS_OUT: tl.constexpr, IEEE: tl.constexpr,
                    D: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_O: tl.constexpr):
    t0 = tl.program_id(0).to(tl.int64) * BLOCK_N
    rows = t0 + tl.arange(0, BLOCK_N)
    rmask = rows < nrows
    offs_d = tl.arange(0, BLOCK_D)
    dmask = offs_d < D
    x = load_tile(data, scale, zero, optr, oidx, oval, t0, nrows, rmask, offs_d, dmask,
                  FMT, BITS, GROUP, PER, WPR, FAST, HAS_OUT, IEEE, D, BLOCK_N, BLOCK_D, BLOCK_O)
    tl.store(out_ptr + rows[:, None] * D + offs_d[None, :], x, mask=rmask[:, None] & dmask[None, :])


def _check_bits(bits: int) -> int:
    if bits not in (1, 2, 3, 4, 8):
        raise ValueError(f"unsupported bit width {bits}")
    return 32 // bits


def quantize_tokens(x: torch.Tensor, bits: int, group: int, dtype: torch.dtype | None = None
                    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Per-token min/max quantization of ``x [n, d]`` in groups of ``group`` channels, packed along channels.

    Returns ``words [n, ceil(d/per)] int32``, ``scale, zero [n, d // group]`` in ``dtype`` (default ``x.dtype``);
    equal to ``reference.pack(minmax_quantize(x, bits, group))`` with scale/zero cast to ``dtype``.
    """
    n, d = x.shape
    if d % group:
        raise ValueError(f"head dim {d} is not divisible by the group size {group}")
    per = _check_bits(bits)
    wpr = -(-d // per)
    dtype = dtype or x.dtype
    x = x.contiguous()
    words = new_empty((n, wpr), torch.int32, x.device)
    scale = new_empty((n, d // group), dtype, x.device)
    zero = new_empty((n, d // group), dtype, x.device)
    if n:
        block_d = triton.next_power_of_2(d)
        fast = _pow2(per) and d == block_d and d % per == 0
        block_r = max(1, min(32, 4096 // block_d))
        fast_launch.launch(_quant_tokens_kernel, (triton.cdiv(n, block_r),), (x, words, scale, zero, n),
                           dict(BITS=bits, GROUP=group, PER=per, WPR=wpr, D=d, BLOCK_D=block_d, BLOCK_R=block_r,
                                FAST=fast))
    return words, scale, zero


def quantize_channels(x: torch.Tensor, bits: int, group: int, dtype: torch.dtype | None = None
                      ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Per-channel min/max quantization of ``x [n, d]`` in blocks of ``group`` tokens (KIVI keys).

    Returns ``words [n // group, d, ceil(group/per)] int32``, ``scale, zero [n // group, d]`` in ``dtype``.
    """
    n, d = x.shape
    if n % group:
        raise ValueError(f"{n} rows are not a multiple of the group size {group}")
    per = _check_bits(bits)
    wpr = -(-group // per)
    nb = n // group
    dtype = dtype or x.dtype
    x = x.contiguous()
    words = new_empty((nb, d, wpr), torch.int32, x.device)
    scale = new_empty((nb, d), dtype, x.device)
    zero = new_empty((nb, d), dtype, x.device)
    if nb:
        block_g = triton.next_power_of_2(group)
        fast = _pow2(per) and group == block_g and group % per == 0
        block_d = max(1, min(triton.next_power_of_2(d), 4096 // block_g))
        fast_launch.launch(_quant_channels_kernel, (nb, triton.cdiv(d, block_d)), (x, words, scale, zero),
                           dict(BITS=bits, GROUP=group, PER=per, WPR=wpr, D=d, BLOCK_G=block_g, BLOCK_D=block_d,
                                FAST=fast))
    return words, scale, zero


def unpack(words: torch.Tensor, bits: int, n: int) -> torch.Tensor:
    """Inverse of ``reference.pack`` along the last axis: int32 codes ``[..., n]``."""
    *lead, wpr = words.shape
    per = _check_bits(bits)
    rows = words.numel() // max(wpr, 1)
    codes = new_empty((*lead, n), torch.int32, words.device)
    if rows and n:
        block_c = min(128, triton.next_power_of_2(n))
        fast_launch.launch(_unpack_kernel, (triton.cdiv(rows, 16), triton.cdiv(n, block_c)),
                           (words.contiguous(), codes, rows, n),
                           dict(BITS=bits, PER=per, WPR=wpr, BLOCK_R=16, BLOCK_C=block_c))
    return codes


def dequant_part(part, csr=None, block_n: int = 32) -> torch.Tensor:
    """Float32 rows ``[n, d]`` of a TokenQuant / ChannelQuant / Dense part (``csr``: see ``dispatch.outlier_csr``)."""
    spec = PartSpec(part, csr)
    out = new_empty((spec.nrows, spec.d), torch.float32, spec.data.device)
    if spec.nrows:
        fast = spec.fast and (spec.fmt != 2 or block_n % spec.per == 0)
        fast_launch.launch(_dequant_kernel, (triton.cdiv(spec.nrows, block_n),), (out, *spec.args(), spec.nrows),
                           dict(**spec.consts("", fast), D=spec.d, BLOCK_N=block_n,
                                BLOCK_D=triton.next_power_of_2(spec.d), BLOCK_O=16))
    return out
