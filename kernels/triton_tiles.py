"""Triton tile loaders shared by the dequantize and attention kernels.

One ``@triton.jit`` helper, :func:`load_tile`, turns ``BLOCK_N`` consecutive rows of a part (Dense, TokenQuant or
ChannelQuant, chosen by the constexpr ``FMT``) into a float32 ``[BLOCK_N, BLOCK_D]`` tile in registers, reading the
packed codes, the scales/zeros and the sparse outliers directly. Rows outside ``rmask`` load as zeros (so a masked
value row never contributes NaN). Two code paths per quantized format:

* ``FAST``: codes per word and the group size are powers of two and the head dim is a power of two; words are loaded
  once per tile (vectorised) and expanded with a broadcast shift and a reshape.
* general: one gathered word per element (3-bit codes, odd head dims, odd groups); correct everywhere, slower.

Outliers (TokenQuant) are stored sorted by flat index with a per-row pointer (CSR, built once by
:func:`kernels.dispatch.outlier_csr`); the outliers of a tile are scattered into it with two one-hot matrix products
(exact: one-hot times a half-precision value is exact in tf32, ``ieee`` is used for float32 caches).
"""

from __future__ import annotations

import os

import torch
import triton
import triton.language as tl

DENSE = 0
TOKEN = 1
CHANNEL = 2
FAST_PATHS = True  # False forces the general (gathered-word) loaders everywhere; for benchmarks and tests
JOIN_LOADERS = True  # fast loaders expand words with nested tl.join (codes of a word stay in one thread)
# general TokenQuant path (e.g. 3-bit, 10 codes per word): load a row's words once and pick each channel's word with
# tl.gather, instead of one global load per element (read at import; KV_GATHER=0 for A/B runs)
GATHER_WORDS: tl.constexpr = tl.constexpr(os.environ.get("KV_GATHER", "1") == "1")
POISON = False  # tests set this: outputs start as NaN (floats) or 0x5A5A5A5A (ints), so unwritten elements show


@triton.jit
def rint(v):
    """Round half to even (``torch.round``), exact for the non-negative values the quantizer produces."""
    r = tl.floor(v)
    f = v - r
    odd = (r - 2.0 * tl.floor(r * 0.5)) == 1.0
    up = (f > 0.5) | ((f == 0.5) & odd)
    return tl.where(up, r + 1.0, r)


@triton.jit
def bit_or(a, b):
    return a | b


@triton.jit
def _outlier_range(optr, t0, nrows, BLOCK_N: tl.constexpr):
    """First and one-past-last outlier (CSR positions) of rows ``t0 .. t0+BLOCK_N`` clipped to ``[0, nrows)``."""
    first = tl.maximum(t0, 0)
    last = tl.minimum(tl.maximum(t0 + BLOCK_N, 0), nrows)
    return tl.load(optr + first).to(tl.int64), tl.load(optr + tl.maximum(last, first)).to(tl.int64)


@triton.jit
def _dot32(a, b, IEEE: tl.constexpr):
    """float32 dot: exact (``ieee``) for float32 caches, ``tf32`` otherwise (exact on one-hot x fp16 values)."""
    if IEEE:
        return tl.dot(a, b, input_precision="ieee")
    else:
        return tl.dot(a, b, input_precision="tf32")


@triton.jit
def _scatter_outliers(x, optr, oidx, oval, t0, nrows, offs_d, D: tl.constexpr, BLOCK_N: tl.constexpr,
                      BLOCK_O: tl.constexpr, IEEE: tl.constexpr):
    """Replace the elements of tile ``x`` (rows ``t0 .. t0+BLOCK_N``) that have an exact outlier value."""
    o_lo, o_hi = _outlier_range(optr, t0, nrows, BLOCK_N)
    cols_n = tl.arange(0, BLOCK_N)
    for o in range(o_lo, o_hi, BLOCK_O):
        j = o + tl.arange(0, BLOCK_O)
        jm = j < o_hi
        idx = tl.load(oidx + j, mask=jm, other=0).to(tl.int64)
        val = tl.load(oval + j, mask=jm, other=0.0).to(tl.float32)
        r = idx // D - t0
        c = idx % D
        sel = ((r[:, None] == cols_n[None, :]) & jm[:, None]).to(tl.float32)  # [BO, BN]
        hit = c[:, None] == offs_d[None, :]  # [BO, BD]
        cv = tl.where(hit, val[:, None], 0.0)
        cm = hit.to(tl.float32)
        selt = tl.trans(sel)
        dv = _dot32(selt, cv, IEEE)
        dm = tl.dot(selt, cm, input_precision="tf32")
        x = tl.where(dm > 0.5, dv.to(x.dtype), x)  # outlier values are cache-dtype numbers: exact
    return x


@triton.jit
def outlier_corrections(x, a, optr, oidx, odel, t0, nrows, ROWS_AXIS: tl.constexpr, D: tl.constexpr,
                        BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_O: tl.constexpr, IEEE: tl.constexpr):
    """Add the sparse outliers of rows ``t0 .. t0+BLOCK_N`` of a part to a product with its (un-patched) tile.

    ``ROWS_AXIS == 1`` (keys): ``x`` = scores ``[BM, BLOCK_N]``, ``a`` = pointers ``[BM, 1]`` to each query row;
    adds ``q[:, c] * delta`` at column ``r``.
    ``ROWS_AXIS == 0`` (values): ``x`` = output accumulator ``[BM, BLOCK_D]``, ``a`` = probabilities ``[BM, BLOCK_N]``;
    adds ``p[:, r] * delta`` at column ``c``. ``delta`` = outlier value - dequantized code (``odel``). Two or one
    small dots per ``BLOCK_O`` outliers instead of patching the ``[BLOCK_N, d]`` tile."""
    o_lo, o_hi = _outlier_range(optr, t0, nrows, BLOCK_N)
    cols_n = tl.arange(0, BLOCK_N)
    for o in range(o_lo, o_hi, BLOCK_O):
        j = o + tl.arange(0, BLOCK_O)
        jm = j < o_hi
        idx = tl.load(oidx + j, mask=jm, other=0).to(tl.int64)
        dl = tl.load(odel + j, mask=jm, other=0.0)
        r = idx // D - t0
        c = idx % D
        if ROWS_AXIS == 1:
            qg = tl.load(a + c[None, :], mask=jm[None, :], other=0.0).to(tl.float32)  # [BM, BO]
            rr = tl.where((r[:, None] == cols_n[None, :]) & jm[:, None], dl[:, None], 0.0)  # [BO, BN]
            x += _dot32(qg, rr, IEEE)
        else:
            sel = ((r[None, :] == cols_n[:, None]) & jm[None, :]).to(tl.float32)  # [BN, BO]
            cc = tl.where((c[:, None] == tl.arange(0, BLOCK_D)[None, :]) & jm[:, None], dl[:, None], 0.0)  # [BO, BD]
            pg = _dot32(a, sel, IEEE)  # p at each outlier's row: [BM, BO]
            x += _dot32(pg, cc, IEEE)
    return x


@triton.jit
def _plane(w, i: tl.constexpr, BITS: tl.constexpr):
    return (w >> (i * BITS)) & ((1 << BITS) - 1)


@triton.jit
def _j2(w, s0: tl.constexpr, st: tl.constexpr, BITS: tl.constexpr):
    return tl.join(_plane(w, s0, BITS), _plane(w, s0 + st, BITS))


@triton.jit
def _j4(w, s0: tl.constexpr, st: tl.constexpr, BITS: tl.constexpr):
    return tl.join(_j2(w, s0, 2 * st, BITS), _j2(w, s0 + st, 2 * st, BITS))


@triton.jit
def _j8(w, s0: tl.constexpr, st: tl.constexpr, BITS: tl.constexpr):
    return tl.join(_j4(w, s0, 2 * st, BITS), _j4(w, s0 + st, 2 * st, BITS))


@triton.jit
def _j16(w, s0: tl.constexpr, st: tl.constexpr, BITS: tl.constexpr):
    return tl.join(_j8(w, s0, 2 * st, BITS), _j8(w, s0 + st, 2 * st, BITS))


@triton.jit
def _j32(w, s0: tl.constexpr, st: tl.constexpr, BITS: tl.constexpr):
    return tl.join(_j16(w, s0, 2 * st, BITS), _j16(w, s0 + st, 2 * st, BITS))


@triton.jit
def expand_codes(w, BITS: tl.constexpr, PER: tl.constexpr):
    """int32 words ``[R, W]`` -> codes ``[R, W*PER]``, code ``i`` of word ``j`` at column ``j*PER + i``.

    Built by nested ``tl.join`` (``join(even planes, odd planes)`` recursively gives the natural order), so the codes
    of one word stay in one thread and the final reshape moves no data.
    """
    if PER == 4:
        c = _j4(w, 0, 1, BITS)
    elif PER == 8:
        c = _j8(w, 0, 1, BITS)
    elif PER == 16:
        c = _j16(w, 0, 1, BITS)
    else:
        c = _j32(w, 0, 1, BITS)
    return tl.reshape(c, (w.shape[0], w.shape[1] * PER))


def _pair_asm(bits: int) -> str:
    """PTX for :func:`pair_dequant`: operands ``$0 .. $PER-1`` out (fp16, code order), ``$PER`` the int32 word,
    ``$PER+1`` / ``$PER+2`` its fp16 scale and zero.

    Codes ``i`` and ``i + PER/2`` sit 16 bits apart, so one ``lop3`` ((w >> i*bits) & mask) | 0x6400 in both halves)
    turns them into the fp16 pair (1024 + code_i, 1024 + code_{i+PER/2}) (0x6400 = 1024.0, whose mantissa ulp is 1), one
    ``sub.f16x2`` removes the 1024 exactly and one ``fma.rn.f16x2`` applies scale and zero: 2 instructions per 2 codes
    plus a shift, and no int-to-float conversion (a quarter-rate instruction on Hopper)."""
    per, half, mask = 32 // bits, 16 // bits, (1 << bits) - 1
    asm = ["{", ".reg .b32 t, s2, z2, k, m;", f"mov.b32 s2, {{${per + 1}, ${per + 1}}};",
           f"mov.b32 z2, {{${per + 2}, ${per + 2}}};", "mov.b32 k, 0x64006400;", f"mov.b32 m, {mask | mask << 16};"]
    for i in range(half):
        src = f"${per}"
        if i:
            asm.append(f"shr.u32 t, ${per}, {bits * i};")
            src = "t"
        asm += [f"lop3.b32 t, {src}, m, k, 0xEA;", "sub.f16x2 t, t, k;", "fma.rn.f16x2 t, t, s2, z2;",
                f"mov.b32 {{${i}, ${i + half}}}, t;"]
    return "\n".join(asm + ["}"])


def _pair_constraints(bits: int) -> str:
    return ",".join(["=h"] * (32 // bits) + ["r", "h", "h"])


PAIR_ASM_1: tl.constexpr = tl.constexpr(_pair_asm(1))
PAIR_ASM_2: tl.constexpr = tl.constexpr(_pair_asm(2))
PAIR_ASM_4: tl.constexpr = tl.constexpr(_pair_asm(4))
PAIR_ASM_8: tl.constexpr = tl.constexpr(_pair_asm(8))
PAIR_CON_1: tl.constexpr = tl.constexpr(_pair_constraints(1))
PAIR_CON_2: tl.constexpr = tl.constexpr(_pair_constraints(2))
PAIR_CON_4: tl.constexpr = tl.constexpr(_pair_constraints(4))
PAIR_CON_8: tl.constexpr = tl.constexpr(_pair_constraints(8))


# _nK: the K tensors r[o], r[o+st], r[o+2st], ... joined along a new last axis in that order (join(evens, odds) at
# every level keeps the natural order); one function per level, as @triton.jit functions do not recurse
@triton.jit
def _n2(r, o: tl.constexpr, st: tl.constexpr):
    return tl.join(r[o], r[o + st])


@triton.jit
def _n4(r, o: tl.constexpr, st: tl.constexpr):
    return tl.join(_n2(r, o, 2 * st), _n2(r, o + st, 2 * st))


@triton.jit
def _n8(r, o: tl.constexpr, st: tl.constexpr):
    return tl.join(_n4(r, o, 2 * st), _n4(r, o + st, 2 * st))


@triton.jit
def _n16(r, o: tl.constexpr, st: tl.constexpr):
    return tl.join(_n8(r, o, 2 * st), _n8(r, o + st, 2 * st))


@triton.jit
def _n32(r, o: tl.constexpr, st: tl.constexpr):
    return tl.join(_n16(r, o, 2 * st), _n16(r, o + st, 2 * st))


@triton.jit
def pair_dequant(w, sc, zr, BITS: tl.constexpr):
    """int32 words and their fp16 scale and zero (all three the same shape) -> fp16 ``[*w.shape, 32 // BITS]``,
    ``code * scale + zero`` in code order, by the inline PTX of :func:`_pair_asm` (NVIDIA GPUs only; the callers use
    plain Triton under the interpreter)."""
    if BITS == 1:
        r = tl.inline_asm_elementwise(PAIR_ASM_1, PAIR_CON_1, [w, sc, zr], dtype=(tl.float16,) * 32, is_pure=True,
                                      pack=1)
        x = _n32(r, 0, 1)
    elif BITS == 2:
        r = tl.inline_asm_elementwise(PAIR_ASM_2, PAIR_CON_2, [w, sc, zr], dtype=(tl.float16,) * 16, is_pure=True,
                                      pack=1)
        x = _n16(r, 0, 1)
    elif BITS == 4:
        r = tl.inline_asm_elementwise(PAIR_ASM_4, PAIR_CON_4, [w, sc, zr], dtype=(tl.float16,) * 8, is_pure=True,
                                      pack=1)
        x = _n8(r, 0, 1)
    else:
        r = tl.inline_asm_elementwise(PAIR_ASM_8, PAIR_CON_8, [w, sc, zr], dtype=(tl.float16,) * 4, is_pure=True,
                                      pack=1)
        x = _n4(r, 0, 1)
    return x


@triton.jit
def channel_half_t(data, scale, zero, t0, nrows, offs_d, dmask, BITS: tl.constexpr, GROUP: tl.constexpr,
                   PER: tl.constexpr, WPR: tl.constexpr, D: tl.constexpr, BLOCK_N: tl.constexpr, ASM: tl.constexpr):
    """fp16 ``K^T`` tile ``[BLOCK_D, BLOCK_N]`` of ChannelQuant rows ``t0 + arange(BLOCK_N)`` inside one quantization
    block (``t0`` a multiple of ``BLOCK_N``, ``GROUP`` a multiple of ``BLOCK_N``), dequantized in fp16: by
    :func:`pair_dequant` when ``ASM``, else :func:`expand_codes` times scale plus zero."""
    NW: tl.constexpr = BLOCK_N // PER
    blk = t0 // GROUP
    sc = tl.load(scale + blk * D + offs_d, mask=dmask, other=0.0).to(tl.float16)
    zr = tl.load(zero + blk * D + offs_d, mask=dmask, other=0.0).to(tl.float16)
    w = _channel_words_t(data, t0, nrows, offs_d, dmask, GROUP, PER, WPR, D, BLOCK_N, True)
    if ASM:
        x = pair_dequant(w, tl.broadcast_to(sc[:, None], (offs_d.shape[0], NW)),
                         tl.broadcast_to(zr[:, None], (offs_d.shape[0], NW)), BITS)
        x = tl.reshape(x, (offs_d.shape[0], BLOCK_N))
    else:
        x = expand_codes(w, BITS, PER).to(tl.float16) * sc[:, None] + zr[:, None]
    return x


@triton.jit
def channel_codes_t(data, t0, nrows, offs_d, dmask, BITS: tl.constexpr, GROUP: tl.constexpr, PER: tl.constexpr,
                    WPR: tl.constexpr, D: tl.constexpr, BLOCK_N: tl.constexpr):
    """Raw int32 codes of ChannelQuant rows ``t0 + arange(BLOCK_N)``, transposed: ``[BLOCK_D, BLOCK_N]`` (the ``K^T``
    operand of ``q K^T``), expanded with :func:`expand_codes` (``t0`` a multiple of ``PER``)."""
    return expand_codes(_channel_words_t(data, t0, nrows, offs_d, dmask, GROUP, PER, WPR, D, BLOCK_N), BITS, PER)


@triton.jit
def _channel_words_t(data, t0, nrows, offs_d, dmask, GROUP: tl.constexpr, PER: tl.constexpr, WPR: tl.constexpr,
                     D: tl.constexpr, BLOCK_N: tl.constexpr, ONE_BLOCK: tl.constexpr = False):
    """int32 words ``[BLOCK_D, BLOCK_N // PER]`` holding ChannelQuant rows ``t0 + arange(BLOCK_N)`` (``t0`` a multiple
    of ``PER``); words of rows outside ``[0, nrows)`` read as 0. ``ONE_BLOCK``: the rows lie in one quantization
    block, so the block index is a scalar and each channel's words are one contiguous (vectorised) load."""
    NW: tl.constexpr = BLOCK_N // PER
    wrow = t0 + tl.arange(0, NW) * PER
    tw = (wrow % GROUP) // PER
    wm = (wrow >= 0) & (wrow < nrows)
    if ONE_BLOCK:
        ptr = data + ((t0 // GROUP) * D + offs_d[:, None]) * WPR + tw[None, :]
    else:
        ptr = data + ((wrow // GROUP)[None, :] * D + offs_d[:, None]) * WPR + tw[None, :]
    return tl.load(ptr, mask=dmask[:, None] & wm[None, :], other=0)


@triton.jit
def channel_codes(data, t0, nrows, offs_d, dmask, BITS: tl.constexpr, GROUP: tl.constexpr, PER: tl.constexpr,
                  WPR: tl.constexpr, D: tl.constexpr, BLOCK_N: tl.constexpr):
    """Raw int32 codes ``[BLOCK_N, BLOCK_D]`` of ChannelQuant rows ``t0 + arange(BLOCK_N)`` (``t0`` a multiple of
    ``PER``; fast layout). Rows outside ``[0, nrows)`` read as 0."""
    NW: tl.constexpr = BLOCK_N // PER
    MASK: tl.constexpr = (1 << BITS) - 1
    wrow = t0 + tl.arange(0, NW) * PER
    wblk = wrow // GROUP
    tw = (wrow % GROUP) // PER
    wm = (wrow >= 0) & (wrow < nrows)
    w = tl.load(data + (wblk[:, None] * D + offs_d[None, :]) * WPR + tw[:, None], mask=wm[:, None] & dmask[None, :],
                other=0)
    sh = tl.arange(0, PER) * BITS
    c = (w[:, None, :] >> sh[None, :, None]) & MASK
    return tl.reshape(c, (BLOCK_N, offs_d.shape[0]))


@triton.jit
def _gather_codes(data, rows, rmask, offs_d, BITS: tl.constexpr, PER: tl.constexpr, WPR: tl.constexpr,
                  W2: tl.constexpr):
    """Codes ``[BLOCK_N, BLOCK_D]`` of TokenQuant rows whose ``WPR <= W2`` words are loaded once per row (vector load)
    and picked per channel with ``tl.gather`` (any codes-per-word count)."""
    j = tl.arange(0, W2)
    w = tl.load(data + rows[:, None] * WPR + j[None, :], mask=rmask[:, None] & (j < WPR)[None, :], other=0)
    idx = tl.broadcast_to(tl.minimum(offs_d // PER, W2 - 1)[None, :], (rows.shape[0], offs_d.shape[0]))
    return (tl.gather(w, idx, 1) >> ((offs_d % PER) * BITS)[None, :]) & ((1 << BITS) - 1)


@triton.jit
def load_tile(data, scale, zero, optr, oidx, oval, t0, nrows, rmask, offs_d, dmask,
              FMT: tl.constexpr, BITS: tl.constexpr, GROUP: tl.constexpr, PER: tl.constexpr, WPR: tl.constexpr,
              FAST: tl.constexpr, HAS_OUT: tl.constexpr, IEEE: tl.constexpr, D: tl.constexpr,
              BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_O: tl.constexpr, HALF: tl.constexpr = False,
              PAIR: tl.constexpr = False):
    """Float32 tile of rows ``t0 + arange(BLOCK_N)`` (int64 ``t0``) of one part; see the module docstring.

    ``HALF`` (TokenQuant fast path without outliers): dequantize in float16 instead; ``PAIR`` (also needs ``GROUP``
    a multiple of ``PER`` and a GPU): the same with :func:`pair_dequant`.

    ``WPR``: int32 words per row (TokenQuant) or per channel of a block (ChannelQuant); ``PER``: codes per word.
    ``FAST`` for ChannelQuant also needs ``t0`` to be a multiple of ``PER``.
    """
    rows = t0 + tl.arange(0, BLOCK_N)
    m2 = rmask[:, None] & dmask[None, :]
    MASK: tl.constexpr = (1 << BITS) - 1
    if FMT == 0:
        x = tl.load(data + rows[:, None] * D + offs_d[None, :], mask=m2, other=0.0).to(tl.float32)
    elif FMT == 1:
        NG: tl.constexpr = D // GROUP
        if BITS == 0:
            x = tl.load(zero + rows[:, None] * NG + (offs_d // GROUP)[None, :], mask=m2, other=0.0).to(tl.float32)
        elif FAST:
            w = tl.load(data + rows[:, None] * WPR + tl.arange(0, WPR)[None, :], mask=rmask[:, None], other=0)
            if FAST == 2:
                c = expand_codes(w, BITS, PER)
            else:
                sh = tl.arange(0, PER) * BITS
                c = tl.reshape((w[:, :, None] >> sh[None, None, :]) & MASK, (BLOCK_N, BLOCK_D))
            c3 = tl.reshape(c, (BLOCK_N, NG, GROUP))
            g = tl.arange(0, NG)
            sc = tl.load(scale + rows[:, None] * NG + g[None, :], mask=rmask[:, None], other=0.0)
            zr = tl.load(zero + rows[:, None] * NG + g[None, :], mask=rmask[:, None], other=0.0)
            if PAIR:  # fp16 by inline PTX (see pair_dequant); needs GROUP a multiple of PER
                WPG: tl.constexpr = WPR // NG
                shp: tl.constexpr = (BLOCK_N, NG, WPG)
                x3 = pair_dequant(tl.reshape(w, shp), tl.broadcast_to(sc.to(tl.float16)[:, :, None], shp),
                                  tl.broadcast_to(zr.to(tl.float16)[:, :, None], shp), BITS)
            elif HALF:
                x3 = c3.to(tl.float16) * sc.to(tl.float16)[:, :, None] + zr.to(tl.float16)[:, :, None]
            else:
                x3 = c3.to(tl.float32) * sc.to(tl.float32)[:, :, None] + zr.to(tl.float32)[:, :, None]
            x = tl.reshape(x3, (BLOCK_N, BLOCK_D))
        else:
            if GATHER_WORDS and WPR <= 16:
                c = _gather_codes(data, rows, rmask, offs_d, BITS, PER, WPR, 16)
            elif GATHER_WORDS and WPR <= 32:
                c = _gather_codes(data, rows, rmask, offs_d, BITS, PER, WPR, 32)
            else:
                w = tl.load(data + rows[:, None] * WPR + (offs_d // PER)[None, :], mask=m2, other=0)
                c = (w >> ((offs_d % PER) * BITS)[None, :]) & MASK
            sc = tl.load(scale + rows[:, None] * NG + (offs_d // GROUP)[None, :], mask=m2, other=0.0)
            zr = tl.load(zero + rows[:, None] * NG + (offs_d // GROUP)[None, :], mask=m2, other=0.0)
            x = c.to(tl.float32) * sc.to(tl.float32) + zr.to(tl.float32)
        if HAS_OUT:
            x = _scatter_outliers(x, optr, oidx, oval, t0, nrows, offs_d, D, BLOCK_N, BLOCK_O, IEEE)
    else:
        if FAST:
            c = channel_codes(data, t0, nrows, offs_d, dmask, BITS, GROUP, PER, WPR, D, BLOCK_N).to(tl.float32)
            SB: tl.constexpr = BLOCK_N // GROUP if BLOCK_N > GROUP else 1
            RPB: tl.constexpr = BLOCK_N // SB
            srow = t0 + tl.arange(0, SB) * RPB
            sm = ((srow >= 0) & (srow < nrows))[:, None] & dmask[None, :]
            sp = (srow // GROUP)[:, None] * D + offs_d[None, :]
            sc = tl.load(scale + sp, mask=sm, other=0.0).to(tl.float32)
            zr = tl.load(zero + sp, mask=sm, other=0.0).to(tl.float32)
            sc = tl.reshape(tl.broadcast_to(sc[:, None, :], (SB, RPB, BLOCK_D)), (BLOCK_N, BLOCK_D))
            zr = tl.reshape(tl.broadcast_to(zr[:, None, :], (SB, RPB, BLOCK_D)), (BLOCK_N, BLOCK_D))
            x = tl.where(rmask[:, None], c * sc + zr, 0.0)
        else:
            blk = rows // GROUP
            t = rows % GROUP
            w = tl.load(data + (blk[:, None] * D + offs_d[None, :]) * WPR + (t // PER)[:, None], mask=m2, other=0)
            c = (w >> ((t % PER) * BITS)[:, None]) & MASK
            sp = blk[:, None] * D + offs_d[None, :]
            sc = tl.load(scale + sp, mask=m2, other=0.0).to(tl.float32)
            zr = tl.load(zero + sp, mask=m2, other=0.0).to(tl.float32)
            x = c.to(tl.float32) * sc + zr
    return x


# ---------------------------------------------------------------------------------------------------------------
# Host side: a part described for the kernels (tensors + compile-time facts).


def new_empty(shape, dtype, device) -> torch.Tensor:
    """``torch.empty``, or a poisoned tensor when :data:`POISON` is set."""
    if not POISON:
        return torch.empty(shape, dtype=dtype, device=device)
    fill = float("nan") if dtype.is_floating_point else 0x5A5A5A5A
    return torch.full(shape, fill, dtype=dtype, device=device)


def _fast_kind(fast: bool) -> int:
    """The loaders' ``FAST`` constexpr: 0 general, 1 broadcast-shift + reshape, 2 nested joins."""
    return (2 if JOIN_LOADERS else 1) if fast else 0


def _pow2(x: int) -> bool:
    return x > 0 and (x & (x - 1)) == 0


class PartSpec:
    """One part prepared for :func:`load_tile`: pointers and constexprs (duck-typed on the part's attributes).

    Parameters
    ----------
    part : Dense | TokenQuant | ChannelQuant (or any object with the same attributes)
    csr : (idx_sorted int32 [m], val_sorted [m], row_ptr int32 [n+1]) or None, for TokenQuant outliers.
    """

    def __init__(self, part, csr=None):
        self.part = part
        dummy = None
        if hasattr(part, "x"):
            self.fmt, self.bits, self.group, self.per, self.wpr = DENSE, 16, 1, 1, 1
            self.data = part.x
            self.d = part.x.shape[1]
            self.nrows = part.x.shape[0]
            dummy = part.x
            self.scale = self.zero = dummy
        else:
            self.bits = int(part.nbits)
            self.group = int(part.group)
            self.per = 32 // self.bits if self.bits else 1
            self.scale, self.zero = part.scale, part.zero
            dummy = part.zero
            if part.words.dim() == 3:
                self.fmt = CHANNEL
                nb, self.d, self.wpr = part.words.shape
                self.nrows = nb * self.group
            else:
                self.fmt = TOKEN
                self.d = int(part.d)
                self.nrows = part.words.shape[0]
                self.wpr = max(part.words.shape[1], 1)
            self.data = part.words if part.words.numel() else dummy
            if self.bits == 0:
                self.scale = dummy
        self.has_out = csr is not None and csr[0].numel() > 0
        if self.has_out:
            self.oidx, self.oval, self.optr = csr[:3]
            self.odelta = csr[3] if len(csr) > 3 else None
        else:
            self.oidx = self.oval = self.optr = dummy
            self.odelta = None
        self.ieee = dummy.dtype.itemsize >= 4 if self.fmt == DENSE else self.zero.dtype.itemsize >= 4
        d_pow2 = _pow2(self.d)
        if self.fmt == TOKEN:
            self.fast = self.bits > 0 and d_pow2 and _pow2(self.per) and _pow2(self.group) and self.d % self.per == 0
        elif self.fmt == CHANNEL:
            self.fast = d_pow2 and _pow2(self.per) and _pow2(self.group) and self.group % self.per == 0
        else:
            self.fast = True
        self.fast = self.fast and (FAST_PATHS or self.fmt == DENSE)

    def args(self, deltas: bool = False) -> tuple:
        """Runtime pointer arguments in :func:`load_tile` order (``deltas``: the outliers' differences to the
        dequantized codes in place of their values, for :func:`outlier_corrections`)."""
        return self.data, self.scale, self.zero, self.optr, self.oidx, self.odelta if deltas else self.oval

    def consts(self, prefix: str = "", fast: bool | None = None) -> dict:
        """Compile-time arguments (without the ``D``/``BLOCK_*`` ones), names prefixed with ``prefix``."""
        c = dict(FMT=self.fmt, BITS=self.bits if self.fmt else 0, GROUP=self.group, PER=self.per, WPR=self.wpr,
                 FAST=_fast_kind(self.fast if fast is None else fast), HAS_OUT=self.has_out, IEEE=self.ieee)
        return {prefix + k: v for k, v in c.items()}
