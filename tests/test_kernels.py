"""Triton kernels vs the plain-torch / float64 reference, on fresh random inputs.

On a machine without CUDA the kernels run in Triton's interpreter (``TRITON_INTERPRET=1`` is set here, before triton
is imported), on small shapes. With CUDA the same tests compile for the GPU, plus larger GPU-only cases.
"""

from __future__ import annotations

import dataclasses
import math
import os
import zlib

import numpy as np
import pytest
import torch

CUDA = torch.cuda.is_available()
if not CUDA:
    os.environ.setdefault("TRITON_INTERPRET", "1")

triton = pytest.importorskip("triton", reason="triton is not installed")

from kernels import dispatch, triton_tiles  # noqa: E402
from kernels import reference as ref  # noqa: E402
from kernels import triton_quant as tq  # noqa: E402
from methods.formats import ChannelQuant, Dense, TokenQuant  # noqa: E402

DEV = torch.device("cuda" if CUDA else "cpu")
gpu_only = pytest.mark.skipif(not CUDA, reason="needs CUDA (larger shapes)")
TOL = {torch.float32: 1e-4, torch.float16: 1e-2, torch.bfloat16: 1e-2}
F16, BF16 = torch.float16, torch.bfloat16


@pytest.fixture(autouse=True)
def _poison():
    triton_tiles.POISON = True
    yield
    triton_tiles.POISON = False


def _gen(seed: int) -> torch.Generator:
    return torch.Generator(device="cpu").manual_seed(seed)


def _randn(*shape, g, dtype=torch.float32, scale=1.0):
    return (torch.randn(*shape, generator=g) * scale).to(dtype).to(DEV)


def relerr(a: torch.Tensor, b: torch.Tensor) -> float:
    assert not torch.isnan(a).any(), "NaN in the kernel output (unwritten or poisoned element)"
    return float((a.double() - b.double()).norm() / b.double().norm().clamp_min(1e-30))


# ---------------------------------------------------------------------------------------------------------------
# quantize + pack, unpack, dequantize


@pytest.mark.parametrize("bits", [1, 2, 3, 4, 8])
@pytest.mark.parametrize("dtype,d,group,n", [(torch.float16, 64, 32, 37), (torch.float32, 48, 16, 5),
                                             (torch.bfloat16, 128, 128, 1)])
def test_quantize_tokens_bit_identical(bits, dtype, d, group, n):
    g = _gen(bits * 100 + d + n)
    x = _randn(n, d, g=g, dtype=dtype, scale=3.0)
    x[0, :group] = 0.5  # a constant group: the zero-range guard
    words, scale, zero = tq.quantize_tokens(x, bits, group)
    codes, s_ref, z_ref = (t.to(DEV) for t in ref.minmax_quantize(x.cpu(), bits, group))  # IEEE: see NOTES.md
    assert torch.equal(words, ref.pack(codes, bits))
    assert torch.equal(scale, s_ref.to(dtype)) and torch.equal(zero, z_ref.to(dtype))
    assert torch.equal(tq.unpack(words, bits, d).long(), codes)


@pytest.mark.parametrize("bits", [1, 2, 3, 4, 8])
@pytest.mark.parametrize("dtype,d,group,nb", [(torch.float16, 64, 32, 3), (torch.float32, 40, 16, 2)])
def test_quantize_channels_bit_identical(bits, dtype, d, group, nb):
    g = _gen(bits * 7 + d)
    x = _randn(nb * group, d, g=g, dtype=dtype, scale=2.0)
    x[:group, 0] = -1.25
    words, scale, zero = tq.quantize_channels(x, bits, group)
    blocks = x.cpu().reshape(nb, group, d).transpose(1, 2)
    codes, s_ref, z_ref = (t.to(DEV) for t in ref.minmax_quantize(blocks, bits, group))
    assert torch.equal(words, ref.pack(codes, bits))
    assert torch.equal(scale, s_ref[..., 0].to(dtype)) and torch.equal(zero, z_ref[..., 0].to(dtype))
    assert torch.equal(tq.unpack(words, bits, group).long(), codes)


@pytest.mark.parametrize("bits", [2, 3, 4, 8])
def test_methods_quantize_with_the_kernels(bits, monkeypatch):
    """The methods' quantizers (:func:`methods.formats.quantize_tokens` / ``quantize_channels``, what KIVI and MiKV
    store) take the Triton quantize kernels where the attention kernels run (CUDA; here ``--kernels triton`` in the
    interpreter) and store exactly what the reference quantizer computes on CPU; ``--kernels reference`` keeps the
    reference."""
    from kernels import triton_quant
    from methods import formats

    calls = []
    for name in ("quantize_tokens", "quantize_channels"):
        fn = getattr(triton_quant, name)
        monkeypatch.setattr(triton_quant, name, lambda *a, _fn=fn, **k: (calls.append(1), _fn(*a, **k))[1])
    g = _gen(40 + bits)
    x = _randn(64, 64, g=g, dtype=torch.float16, scale=2.0)
    counts = (32, 32)
    monkeypatch.setattr(dispatch, "BACKEND", "reference")
    tok_ref = formats.quantize_tokens(x.cpu(), counts, bits, 32, torch.float16)
    ch_ref = formats.quantize_channels(x.cpu(), counts, bits, 32, torch.float16)
    assert not calls
    monkeypatch.setattr(dispatch, "BACKEND", "triton")
    tok = formats.quantize_tokens(x, counts, bits, 32, torch.float16)
    ch = formats.quantize_channels(x, counts, bits, 32, torch.float16)
    assert len(calls) == 2
    for a, b in ((tok, tok_ref), (ch, ch_ref)):
        assert type(a) is type(b) and a.counts == b.counts and a.nbits == b.nbits
        for f in ("words", "scale", "zero"):
            assert torch.equal(getattr(a, f).cpu(), getattr(b, f)), f


def _token_part(n_rows, d, bits, group, dtype, g, counts=None, outliers=0):
    x = _randn(n_rows, d, g=g, dtype=dtype, scale=2.0)
    counts = counts or (n_rows,)
    if bits == 0:
        _, _, zero = ref.minmax_quantize(x, 1, group)
        part = TokenQuant(torch.zeros(n_rows, 0, dtype=torch.int32, device=DEV), x.new_zeros(n_rows, 0),
                          zero.to(dtype), 0, group, d, counts)
    else:
        codes, scale, zero = ref.minmax_quantize(x, bits, group)
        part = TokenQuant(ref.pack(codes, bits), scale.to(dtype), zero.to(dtype), bits, group, d, counts)
    if outliers:
        m = min(outliers, n_rows * d)
        part.out_idx = torch.randperm(n_rows * d, generator=g)[:m].to(torch.int32).to(DEV)
        part.out_val = _randn(m, g=g, dtype=dtype, scale=8.0)
    return part


def _channel_part(counts, d, bits, group, dtype, g):
    n = sum(counts)
    x = _randn(n, d, g=g, dtype=dtype, scale=2.0)
    blocks = x.reshape(n // group, group, d).transpose(1, 2)
    codes, scale, zero = ref.minmax_quantize(blocks, bits, group)
    return ChannelQuant(ref.pack(codes, bits), scale[..., 0].to(dtype), zero[..., 0].to(dtype), bits, group, counts)


@pytest.mark.parametrize("bits,outliers,d", [(0, 0, 64), (2, 30, 64), (3, 11, 48), (4, 0, 64), (8, 5, 32)])
def test_dequant_tokens(bits, outliers, d):
    g = _gen(bits + 31 * outliers)
    part = _token_part(45, d, bits, 16, torch.float16, g, outliers=outliers)
    got = tq.dequant_part(part, dispatch.outlier_csr(part))
    assert torch.equal(got, dispatch.dequant_reference(part))


@pytest.mark.parametrize("bits,d", [(0, 64), (1, 64), (2, 64), (3, 48), (4, 64), (8, 32)])
def test_outlier_deltas(bits, d):
    """The CSR's per-outlier deltas (what attention adds instead of patching tiles) equal the outlier value minus the
    reference dequantization of the code at that position, in sorted-index order."""
    g = _gen(50 + bits)
    part = _token_part(37, d, bits, 16, torch.float16, g, outliers=40)
    sidx, sval, ptr, delta = dispatch.outlier_csr(part)
    plain = dispatch.dequant_reference(TokenQuant(part.words, part.scale, part.zero, part.nbits, part.group, d,
                                                  part.counts)).reshape(-1)
    assert torch.equal(sidx.long(), part.out_idx.long().sort().values)
    assert torch.allclose(delta, sval.float() - plain[sidx.long()], rtol=0, atol=1e-5)


@pytest.mark.parametrize("bits,group", [(1, 32), (2, 32), (3, 32), (4, 16), (8, 64)])
def test_dequant_channels(bits, group):
    g = _gen(bits * group)
    part = _channel_part((group * 2, group), 64, bits, group, torch.float16, g)
    assert torch.equal(tq.dequant_part(part), dispatch.dequant_reference(part))


# ---------------------------------------------------------------------------------------------------------------
# fused attention


def _ref64(q, k_part, v_part, scale, starts, counts):
    """Float64 reference over exactly-dequantized rows."""
    kf, vf = dispatch.dequant_reference(k_part).double(), dispatch.dequant_reference(v_part).double()
    ko, vo = dispatch._offsets(k_part.counts), dispatch._offsets(v_part.counts)
    H, M, d = q.shape
    nmax = max(counts)
    kp = torch.zeros(H, nmax, d, dtype=torch.float64, device=q.device)
    vp = torch.zeros_like(kp)
    valid = torch.zeros(H, 1, nmax, dtype=torch.bool, device=q.device)
    for h in range(H):
        c = counts[h]
        kp[h, :c] = kf[ko[h] + starts[h]:ko[h] + starts[h] + c]
        vp[h, :c] = vf[vo[h] + starts[h]:vo[h] + starts[h] + c]
        valid[h, 0, :c] = True
    s = torch.matmul(q.double(), kp.transpose(-1, -2)) * scale
    s = s.masked_fill(~valid, float("-inf"))
    lse = torch.logsumexp(s, -1)
    p = torch.exp(s - torch.where(torch.isfinite(lse), lse, 0).unsqueeze(-1))
    return torch.matmul(p, vp), lse, s


def _ref64_causal(q, k_part, v_part, scale, starts, cnts, newr, lq):
    """:func:`_ref64` with the last ``newr`` rows of each head seen by query token ``i`` (``m % lq``) only up to row
    ``i`` (decode of several tokens at once)."""
    o64, l64, s64 = _ref64(q, k_part, v_part, scale, starts, cnts)
    if not newr:
        return o64, l64, s64
    H, M, d = q.shape
    nmax = max(cnts)
    col = torch.arange(nmax, device=q.device)
    seen = torch.stack([(col - (c - newr))[None, :] <= (torch.arange(M, device=q.device) % lq)[:, None]
                        for c in cnts])
    s64 = s64.masked_fill(~seen, float("-inf"))
    l64 = torch.logsumexp(s64, -1)
    vf = dispatch.dequant_reference(v_part).double()
    vo = dispatch._offsets(v_part.counts)
    vp = torch.zeros(H, nmax, d, dtype=torch.float64, device=q.device)
    for h in range(H):
        vp[h, :cnts[h]] = vf[vo[h] + starts[h]:vo[h] + starts[h] + cnts[h]]
    return torch.matmul(torch.exp(s64 - torch.where(torch.isfinite(l64), l64, 0).unsqueeze(-1)), vp), l64, s64


def _make(fmt, counts, d, bits, group, dtype, g, outliers):
    n = sum(counts)
    if fmt == "D":
        return Dense(_randn(n, d, g=g, dtype=dtype), counts)
    if fmt == "T":
        return _token_part(n, d, bits, group, dtype, g, counts, outliers)
    return _channel_part(counts, d, bits, group, dtype, g)


# (K fmt, V fmt, K bits, V bits, dtype, H_kv, M, d, counts, ranges ("all" | list of (start, count)), outliers)
CASES = [
    ("D", "D", 0, 0, torch.float32, 2, 4, 64, (70, 33), "all", 0),
    ("D", "D", 0, 0, torch.float16, 1, 1, 64, (1,), "all", 0),  # one token
    ("C", "T", 2, 2, torch.float16, 2, 8, 64, (96, 64), [(5, 80), (0, 50)], 0),  # KIVI, mid-block ranges
    ("C", "T", 4, 4, torch.float32, 2, 4, 64, (64, 128), [(33, 31), (64, 64)], 0),
    ("C", "T", 1, 8, torch.bfloat16, 1, 16, 64, (128,), [(17, 101)], 0),
    ("C", "D", 3, 0, torch.float32, 2, 2, 64, (64, 32), [(1, 62), (0, 1)], 0),  # 3-bit: general path
    ("C", "C", 2, 4, torch.float16, 2, 4, 64, (64, 64), [(3, 40), (32, 32)], 0),
    ("T", "T", 2, 2, torch.float32, 2, 8, 64, (50, 77), "all", 40),  # QAQ: outliers in K and V
    ("T", "T", 3, 4, torch.float16, 3, 4, 48, (19, 1, 40), "all", 25),  # odd head dim, 3-bit
    ("T", "T", 8, 1, torch.bfloat16, 2, 1, 64, (65, 63), "all", 0),
    ("T", "T", 0, 2, torch.float32, 2, 4, 64, (30, 20), "all", 10),  # 0-bit keys
    ("T", "D", 4, 0, torch.float16, 2, 8, 128, (100, 3), [(10, 80), (0, 3)], 7),
    ("D", "T", 0, 4, torch.float32, 2, 4, 64, (40, 41), [(0, 40), (0, 0)], 9),  # one empty head
]


@pytest.mark.parametrize("case", CASES, ids=lambda c: f"{c[0]}{c[2]}-{c[1]}{c[3]}-{str(c[4])[6:]}-M{c[6]}")
def test_attention_vs_float64(case):
    kf, vf, kb, vb, dtype, H, M, d, counts, ranges, outl = case
    g = _gen(zlib.crc32(str(case).encode()))
    k_part = _make(kf, counts, d, kb, 32 if kf == "C" else 16, dtype, g, outl)
    v_part = _make(vf, counts, d, vb, 32 if vf == "C" else 16, dtype, g, outl)
    if ranges == "all":
        starts, cnts = [0] * H, list(counts)
    else:
        starts, cnts = [r[0] for r in ranges], [r[1] for r in ranges]
    q = _randn(H, M, d, g=g, dtype=dtype)
    scale = d ** -0.5
    o64, l64, s64 = _ref64(q, k_part, v_part, scale, starts, cnts)
    for backend in ("triton", "reference"):
        out, lse, s = dispatch.partial_attention_parts(q, k_part, v_part, scale, starts, cnts, True, backend)
        assert out.shape == (H, M, d) and lse.shape == (H, M) and s.shape == s64.shape
        assert relerr(out, o64) < TOL[dtype], backend
        assert torch.equal(torch.isinf(lse), torch.isinf(l64))
        fin = torch.isfinite(l64)
        assert float(torch.nn.functional.pad((lse[fin].double() - l64[fin]).abs(), (0, 1)).max()) < 10 * TOL[dtype]
        sfin = torch.isfinite(s64)
        assert torch.equal(torch.isinf(s), ~sfin)
        assert relerr(s[sfin], s64[sfin]) < TOL[dtype]
    out2, lse2, s2 = dispatch.partial_attention_parts(q, k_part, v_part, scale, starts, cnts, False, "triton")
    assert s2 is None and relerr(out2, o64) < TOL[dtype]


def test_merge_and_stats():
    g = _gen(5)
    H, M, d = 2, 8, 64
    counts_a, counts_b = (40, 70), (33, 5)
    a = (Dense(_randn(sum(counts_a), d, g=g), counts_a), _token_part(sum(counts_a), d, 4, 32, torch.float32, g,
                                                                        counts_a, 10))
    b = (_token_part(sum(counts_b), d, 2, 32, torch.float32, g, counts_b),
         _token_part(sum(counts_b), d, 2, 32, torch.float32, g, counts_b))
    q = _randn(H, M, d, g=g)
    parts = [dispatch.partial_attention_parts(q, k, v, 0.1, [0, 0], list(c), True, "triton")
             for (k, v), c in ((a, counts_a), (b, counts_b))]
    out, lse = dispatch.merge([p[0] for p in parts], [p[1] for p in parts], "triton")
    rout, rlse = ref.merge_partials([p[0] for p in parts], [p[1] for p in parts])
    assert relerr(out, rout) < 1e-5 and relerr(lse, rlse) < 1e-5
    # final-probability statistics from the raw scores: the sums over all parts are 1 per query
    tot = sum(dispatch.reduce_scores(p[2], lse, 4, 2)[0].sum(-1) for p in parts)
    assert torch.allclose(tot, torch.full_like(tot, M), atol=1e-4)


@pytest.mark.parametrize("n_parts,M,d", [(45, 3, 40), (33, 1, 128), (1, 5, 8)])
def test_merge_many_partials(n_parts, M, d):
    """The split merge reads its partials in blocks of up to 8: more partials than one block, odd ``M * d``, and
    empty partials (lse = -inf, as a split with no rows writes) combine exactly like the float64 reference."""
    from kernels import triton_attention as ta

    g = _gen(11)
    H = 3
    outs = [_randn(H, M, d, g=g) for _ in range(n_parts)]
    lses = [_randn(H, M, g=g) * 4 for _ in range(n_parts)]
    lses[0][1] = float("-inf")  # head 1 empty in partial 0
    if n_parts > 2:
        lses[2][:, 0] = float("-inf")
    out, lse = ta.merge(outs, lses)
    rout, rlse = ref.merge_partials([o.double() for o in outs], [x.double() for x in lses])
    fin = torch.isfinite(rlse)
    assert torch.equal(torch.isfinite(lse), fin) and relerr(lse[fin], rlse[fin]) < 1e-5
    assert relerr(out, rout) < 1e-5
    none, none_lse = ta.merge([outs[0][:1]], [torch.full((1, M), float("-inf"), device=DEV)])
    assert torch.isneginf(none_lse).all() and (none == 0).all()


def test_backend_switch():
    with pytest.raises(ValueError):
        dispatch.set_backend("fast")
    dispatch.set_backend("reference")
    try:
        assert not dispatch.use_triton(torch.device("cuda"))
    finally:
        dispatch.set_backend("auto")
    assert dispatch.use_triton(torch.device("cuda")) and not dispatch.use_triton(torch.device("cpu"))


# ---------------------------------------------------------------------------------------------------------------
# GPU-only larger cases: long ranges (many splits), batch-as-heads, ragged


@gpu_only
@pytest.mark.parametrize("kfmt,vfmt,bits", [("C", "T", 2), ("C", "T", 4), ("T", "T", 3), ("D", "D", 0)])
def test_attention_long_gpu(kfmt, vfmt, bits):
    g = _gen(bits)
    H, M, d = 16, 8, 128  # e.g. batch 2 x 8 KV heads
    counts = tuple(int(c) for c in (torch.randint(1, 200, (H,), generator=g) * 32))
    k_part = _make(kfmt, counts, d, bits, 32, torch.float16, g, 0)
    v_part = _make(vfmt, counts, d, bits, 32, torch.float16, g, 500 if vfmt == "T" else 0)
    starts = [int(c) // 3 for c in counts]
    cnts = [c - s for c, s in zip(counts, starts, strict=True)]
    q = _randn(H, M, d, g=g, dtype=torch.float16)
    o64, l64, _ = _ref64(q, k_part, v_part, d ** -0.5, starts, cnts)
    out, lse, _ = dispatch.partial_attention_parts(q, k_part, v_part, d ** -0.5, starts, cnts, False)
    assert relerr(out, o64) < 1e-2
    assert float((lse.double() - l64).abs().max()) < 1e-1


@gpu_only
def test_quantize_large_gpu():
    g = _gen(9)
    x = _randn(8192, 128, g=g, dtype=torch.float16)
    for bits in (2, 4):
        w, s, z = tq.quantize_channels(x, bits, 32)
        codes, sr, zr = ref.minmax_quantize(x.cpu().reshape(-1, 32, 128).transpose(1, 2), bits, 32)
        assert torch.equal(w.cpu(), ref.pack(codes, bits)) and torch.equal(s.cpu(), sr[..., 0].half())
        w, s, z = tq.quantize_tokens(x, bits, 32)
        codes, sr, zr = ref.minmax_quantize(x.cpu(), bits, 32)
        assert torch.equal(w.cpu(), ref.pack(codes, bits)) and torch.equal(z.cpu(), zr.half())


@gpu_only
def test_reference_on_cuda_scale_ulp():
    """Documents why the quantizer tests use the CPU reference: torch on CUDA divides by a Python scalar as a
    multiplication by its reciprocal, so ``minmax_quantize`` run on CUDA can differ from IEEE by 1 ulp in the scale."""
    x = torch.randn(4096, 128, device="cuda")
    _, s_gpu, _ = ref.minmax_quantize(x, 2, 32)
    _, s_cpu, _ = ref.minmax_quantize(x.cpu(), 2, 32)
    _, s_tri, _ = tq.quantize_tokens(x, 2, 32)
    assert torch.equal(s_tri.cpu(), s_cpu)
    print("reference on CUDA vs CPU: scales differing:", int((s_gpu.cpu() != s_cpu).sum()), "of", s_cpu.numel())


@pytest.mark.parametrize("fold,half,join,halfk", [(True, True, True, False), (False, False, True, False),
                                                  (True, False, False, False), (False, True, False, False),
                                                  (True, True, False, False), (True, True, True, True),
                                                  (False, False, True, True)])
def test_folded_keys_and_half_values_match_float64(fold, half, join, halfk, monkeypatch):
    """KIVI-like pair in fp16 (per-channel K, per-token V, no outliers): the folded-scale key path, the fp16 key
    path (``halfk``, the default; inline-PTX pairs on GPUs) and the fp16 value dequantization are taken (checked on
    the plan) and agree with float64 like the plain path, with either word expansion (nested joins or broadcast
    shift + reshape)."""
    from kernels import triton_attention as ta
    from kernels import triton_tiles

    monkeypatch.setattr(ta, "FOLD_K", fold)
    monkeypatch.setattr(ta, "HALF_K", halfk)
    monkeypatch.setattr(ta, "HALF_V", half)
    monkeypatch.setattr(triton_tiles, "JOIN_LOADERS", join)
    g = _gen(11)
    counts, d = (96, 160), 64
    k_part = _make("C", counts, d, 2, 32, torch.float16, g, 0)
    v_part = _make("T", counts, d, 4, 32, torch.float16, g, 0)
    starts, cnts = [7, 32], [80, 128]
    plan = dispatch.make_plan(k_part, v_part, starts, cnts, torch.device("cpu"))
    assert plan.fold_k and plan.half_v and plan.k.group % ta.BLOCK_N == 0
    q = _randn(2, 8, d, g=g, dtype=torch.float16)
    o64, l64, s64 = _ref64(q, k_part, v_part, d ** -0.5, starts, cnts)
    out, lse, s = dispatch.partial_attention_parts(q, k_part, v_part, d ** -0.5, starts, cnts, True, "triton")
    assert relerr(out, o64) < TOL[torch.float16]
    fin = torch.isfinite(s64)
    assert torch.equal(torch.isinf(s), ~fin) and relerr(s[fin], s64[fin]) < TOL[torch.float16]


@pytest.mark.parametrize("kbits,vbits", [(1, 8), (2, 2), (4, 4), (8, 1), (2, 4)])
@pytest.mark.parametrize("pair", [True, False])
def test_half_dequant_every_bit_width(kbits, vbits, pair, monkeypatch):
    """The fp16 key and value paths (on GPUs with and without the inline-PTX pair dequantization) at every bit width
    with a fast layout: ragged heads starting and ending mid-block, d=128, against float64 (on CPU both variants run
    the plain-Triton path: inline PTX needs a GPU)."""
    from kernels import triton_attention as ta
    from kernels.triton_attention import attend_pairs

    monkeypatch.setattr(ta, "PAIR_DEQUANT", pair)
    g = _gen(21 + kbits + 10 * vbits)
    counts, d = (160, 96), 128
    k_part = _make("C", counts, d, kbits, 32, torch.float16, g, 0)
    v_part = _make("T", counts, d, vbits, 32, torch.float16, g, 0)
    starts, cnts = [5, 32], [150, 61]
    plan = dispatch.make_plan(k_part, v_part, starts, cnts, DEV)
    assert plan.fold_k and plan.half_v
    q = _randn(2, 4, d, g=g, dtype=torch.float16)
    o64, l64, _ = _ref64(q, k_part, v_part, d ** -0.5, starts, cnts)
    out, lse = attend_pairs(q, [plan], d ** -0.5)
    assert relerr(out, o64) < TOL[torch.float16]
    assert float((lse.double() - l64.to(lse.device)).abs().max()) < 1e-1


def test_folded_keys_over_many_bias_chunks():
    """One split over 40 tiles (three chunks of per-block q.zero biases), starting and ending mid-block."""
    g = _gen(12)
    counts, d = (1312,), 64
    k_part = _make("C", counts, d, 4, 32, torch.float16, g, 0)
    v_part = _make("T", counts, d, 2, 32, torch.float16, g, 0)
    starts, cnts = [7], [1290]
    plan = dispatch.make_plan(k_part, v_part, starts, cnts, torch.device("cpu"), nsplit=1)
    assert plan.fold_k
    q = _randn(1, 4, d, g=g, dtype=torch.float16)
    o64, l64, _ = _ref64(q, k_part, v_part, d ** -0.5, starts, cnts)
    from kernels.triton_attention import attend_pairs

    out, lse = attend_pairs(q, [plan], d ** -0.5)
    assert relerr(out, o64) < TOL[torch.float16]
    assert float((lse.double() - l64).abs().max()) < 1e-1


def test_launch_config_by_pair_kind():
    """The 1-warp launch is for fast, outlier-free packed pairs (KIVI); outliers, general-path loaders (3-bit) and
    dense pairs keep the default launch (the H100 sweep in leaderboards/kernels-h100.md)."""
    g = _gen(13)
    counts, d = (64, 64), 64
    cpu = torch.device("cpu")

    def plan(kf, kb, vf, vb, outl):
        k = _make(kf, counts, d, kb, 32, torch.float16, g, outl if kf == "T" else 0)
        v = _make(vf, counts, d, vb, 32, torch.float16, g, outl if vf == "T" else 0)
        return dispatch.make_plan(k, v, [0, 0], list(counts), cpu)

    assert plan("C", 2, "T", 2, 0).packed
    assert plan("T", 4, "T", 8, 0).packed
    assert not plan("T", 2, "T", 2, 10).packed  # outliers
    assert not plan("T", 3, "T", 4, 0).packed  # 3-bit: general loader
    assert not plan("D", 0, "D", 0, 0).packed


@gpu_only
@pytest.mark.parametrize("kf,kbits,vbits,kg,vg,M,lq,uniform,want,newr,amp,dtype", [
    ("C", 2, 2, 32, 32, 4, 1, False, True, 0, 1, F16), ("C", 4, 4, 32, 32, 8, 1, True, False, 0, 1, F16),
    ("C", 2, 4, 64, 16, 1, 1, False, False, 0, 1, F16), ("C", 4, 2, 128, 128, 4, 2, True, True, 3, 1, F16),
    ("C", 2, 2, 32, 64, 8, 4, False, True, 5, 1, F16), ("C", 2, 2, 32, 32, 4, 1, True, False, 0, 1e-4, F16),
    ("C", 4, 4, 64, 32, 4, 1, False, False, 0, 4e-4, F16), ("C", 2, 2, 32, 32, 4, 1, False, True, 0, 1, BF16),
    ("C", 4, 4, 64, 32, 8, 1, True, False, 0, 1, BF16), ("C", 4, 2, 128, 128, 4, 2, False, True, 3, 1e-4, BF16),
    # TokenQuant keys (QAQ's format): kg is the keys' channel group
    ("T", 2, 2, 32, 32, 4, 1, False, True, 0, 1, F16), ("T", 4, 4, 128, 128, 8, 1, True, False, 0, 1, F16),
    ("T", 2, 4, 64, 16, 1, 1, False, False, 0, 1, F16), ("T", 4, 2, 32, 128, 4, 2, False, True, 3, 1, F16),
    ("T", 2, 2, 128, 32, 8, 4, True, True, 5, 1e-4, F16), ("T", 4, 4, 32, 32, 4, 1, False, False, 0, 4e-4, F16),
    ("T", 2, 4, 128, 64, 8, 1, False, True, 0, 1, BF16), ("T", 4, 2, 64, 32, 4, 2, True, False, 3, 1e-4, BF16),
    # 3 bits (one scale per row: QAQ's parts, MiKV's low-precision tokens), next to 2/4-bit and ChannelQuant keys
    ("T", 3, 3, 128, 128, 8, 1, False, True, 0, 1, F16), ("T", 3, 2, 128, 32, 4, 2, True, False, 3, 1, F16),
    ("T", 2, 3, 64, 128, 4, 1, False, True, 5, 1, F16), ("T", 4, 3, 128, 128, 8, 4, True, True, 5, 1e-4, F16),
    ("C", 2, 3, 32, 128, 4, 1, False, True, 0, 1, F16), ("C", 4, 3, 64, 128, 8, 1, True, False, 3, 1, BF16),
    ("T", 3, 3, 128, 128, 8, 1, False, True, 0, 1, BF16), ("T", 3, 4, 128, 64, 4, 2, False, False, 0, 1e-4, BF16),
    # 0- and 1-bit values (QAQ's default bounds store nearly all values so)
    ("T", 3, 1, 128, 128, 8, 1, False, True, 0, 1, F16), ("T", 3, 0, 128, 128, 4, 2, True, False, 3, 1, F16),
    ("C", 2, 1, 32, 32, 4, 1, False, True, 0, 1, F16), ("T", 4, 0, 64, 32, 8, 1, False, True, 5, 1, BF16),
    ("T", 2, 1, 128, 16, 8, 4, True, False, 0, 1e-4, BF16), ("T", 3, 0, 128, 128, 4, 1, False, False, 0, 1, BF16),
    # raw codes (one scale per row, fp16): 2/3-bit keys, 2/4-bit values; ragged heads, scores, causal new rows
    ("T", 2, 2, 128, 128, 4, 2, False, True, 3, 1e-4, F16), ("T", 3, 4, 128, 128, 8, 1, False, True, 5, 1, F16),
    ("T", 2, 4, 128, 128, 8, 4, True, True, 5, 4e-4, F16), ("C", 2, 2, 32, 128, 4, 1, False, True, 3, 1, F16),
    # raw ChannelQuant keys (2 bits, at most 4 query rows): blocks of 128 and 64 tokens, 3 rows, causal pairs of rows
    ("C", 2, 2, 128, 32, 3, 1, False, True, 0, 1, F16), ("C", 2, 2, 64, 64, 4, 2, True, True, 3, 1, F16),
    ("C", 2, 2, 32, 32, 2, 2, False, False, 1, 1e-4, F16),
    # staged rows (2/4-bit keys and values with one scale per row, fp16; uniform heads start at odd rows)
    ("T", 4, 2, 128, 128, 4, 1, False, True, 3, 1, F16), ("T", 2, 4, 128, 128, 1, 1, True, False, 0, 1e-4, F16)])
def test_gluon_kivi_matches_float64(kf, kbits, vbits, kg, vg, M, lq, uniform, want, newr, amp, dtype, monkeypatch,
                                    gluon_strict):
    """The Gluon kernel for packed 2/4-bit pairs (taken and not switched off: checked) against float64: ragged heads
    starting and ending mid-block or sharing one range, many splits, scores, causal new rows (``newr`` rows seen by
    query token i only up to row i); ``amp`` scales K and V (and 1 / (2 amp) the queries): 1e-4 for 2 bits and 4e-4
    for 4 bits put the median quantization scale near 2^-12, the smallest for which the prepared scale ``s / 4`` is
    a normal fp16 (session 5's ``s 2^(bits - 10)`` was a subnormal with few bits left there). bf16 caches run the
    same kernel with bf16 operands (exponent range of fp32: 1e-4 is only another scale). Keys are ChannelQuant
    (KIVI, ``kf`` "C") or TokenQuant (QAQ, "T", groups of ``kg`` channels)."""
    from kernels import gluon_attention as ga
    from kernels.triton_attention import PairPlan
    from kernels.triton_tiles import PartSpec

    taken = []
    launch = ga.launch
    monkeypatch.setattr(ga, "launch", lambda *a, **k: (taken.append(1), launch(*a, **k)))
    g = _gen(100 * kbits + 10 * vbits + kg + vg + M + (1000 if kf == "T" else 0))
    H, d = 6, 128
    if uniform:
        counts = (kg * 20,) * H
        starts, cnts = [kg // 2 + 3] * H, [kg * 20 - kg // 2 - 9] * H
    else:
        counts = tuple(int(c) * kg for c in torch.randint(1, 60, (H,), generator=g))
        starts = [int(torch.randint(0, c, (1,), generator=g)) for c in counts]
        cnts = [int(torch.randint(0, c - s + 1, (1,), generator=g)) for c, s in zip(counts, starts, strict=True)]
        cnts[0] = counts[0] - starts[0]
    k_part = _make(kf, counts, d, kbits, kg, dtype, g, 0)
    v_part = _make("T", counts, d, vbits, vg, dtype, g, 0)
    for part in (k_part, v_part):
        part.scale.mul_(amp)
        part.zero.mul_(amp)
    ko, vo = dispatch._offsets(counts), dispatch._offsets(counts)
    plan = PairPlan(PartSpec(k_part), PartSpec(v_part), [ko[h] + starts[h] for h in range(H)],
                    [vo[h] + starts[h] for h in range(H)], cnts, nsplit=7, newr=newr, device=DEV)
    assert plan.uniform == uniform
    q = _randn(H, M, d, g=g, dtype=dtype, scale=1 if amp == 1 else 0.5 / amp)
    _gluon_vs_float64(ga, taken, q, plan, k_part, v_part, starts, cnts, newr, lq, want, dtype)


def _gluon_vs_float64(ga, taken, q, plan, k_part, v_part, starts, cnts, newr, lq, want, dtype):
    """Run ``plan`` (one pair) on the Gluon kernel and check it against float64: it was taken (``taken``, filled by
    the test's patched launch), the launch compiles nothing beyond ``resident_programs`` (without scores), the lse is
    finite where the reference's is, output and scores within the dtype's tolerance. Returns ``(o64, fin)``."""
    from kernels.triton_attention import attend_pairs

    H, M, d = q.shape
    o64, l64, s64 = _ref64_causal(q, k_part, v_part, d ** -0.5, starts, cnts, newr, lq)
    scores = torch.full((H, M, max(cnts)), float("-inf"), device=DEV) if want else None
    ga.resident_programs(plan)
    compiled = _compiled(ga)
    out, lse = attend_pairs(q, [plan], d ** -0.5, scores, lq)
    assert taken, "the Gluon kernel was not used"
    if not want:  # the launch runs the kernel resident_programs compiled (and counted the registers of)
        assert _compiled(ga) == compiled
    fin = torch.isfinite(l64)
    assert torch.equal(torch.isfinite(lse), fin)
    assert relerr(out[fin], o64[fin]) < TOL[dtype]
    assert float((lse[fin].double() - l64[fin]).abs().max()) < 1e-1
    if want:
        sfin = torch.isfinite(s64)
        assert torch.equal(torch.isinf(scores), ~sfin) and relerr(scores[sfin], s64[sfin]) < TOL[dtype]
    return o64, fin


def _compiled(ga) -> int:
    """Kernels of the Gluon attention kernel compiled so far (-1 when this Triton does not expose its cache)."""
    caches = getattr(ga._kivi_attn_kernel, "device_caches", None)
    return -1 if caches is None else sum(len(c[0]) for c in caches.values())


def _row_outliers(part, per_row, g):
    """Give a TokenQuant part ``per_row[i]`` outliers in row ``i`` (distinct random channels, values of scale 8, as
    QAQ keeps each row's extremes)."""
    n, d = part.words.shape[0], int(part.d)
    idx = [r * d + int(c) for r in range(n) for c in torch.randperm(d, generator=g)[:int(per_row[r])]]
    part.out_idx = torch.tensor(idx, dtype=torch.int32).to(DEV)
    part.out_val = _randn(len(idx), g=g, dtype=part.scale.dtype, scale=8.0)
    return part


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32])
def test_value_exponent_kernel_matches_host_rule(dtype):
    """The raw value path's exponent E computed on the part's device (:mod:`kernels.value_exponent`: ``aminmax`` and a
    one-program kernel, no host sync) equals the host rule (``frexp`` of the largest |scale| and |delta|) on hand
    cases (powers of two at both bounds, no scale, no delta, zeros, inf, NaN, float32 subnormals, the cap of 60) and
    on random scales of random magnitude."""
    from kernels import value_exponent as ve

    def host(s, d):
        sm = float(s.float().abs().max()) if s.numel() else 0.0
        return ve.exponent_host(sm, float(d.float().abs().max()) if d is not None and d.numel() else 0.0)

    t = lambda *x: torch.tensor(x, dtype=dtype, device=DEV)  # noqa: E731
    cases = [(t(1.0, -0.5), t(8.0)), (t(1e-3), t(1000.0, -3.0)), (t(0.0, 0.0), t(7.3, -5.1)), (t(0.0), None),
             (t(3.0), None), (t(0.5), None), (t(-2.0), t(0.0)), (t(float("inf")), t(2.0)), (t(float("nan"), 1.0), None),
             (t(), t(4.0)), (t(), None), (t(65504.0 if dtype == torch.float16 else 1e30), None)]
    if dtype != torch.float16:
        cases += [(t(1e-40), None), (t(2.0 ** -130), t(2.0 ** -140)), (t(1e-30), t(1e-3))]
    g = _gen(77)
    for i in range(24):  # deltas 2^8 .. 2^24 above the scales: below 2^16 or so the scales decide E, above the deltas
        mag = 2.0 ** float(torch.randint(-20, 0, (1,), generator=g))
        s = _randn(int(torch.randint(1, 600, (1,), generator=g)), g=g, dtype=dtype, scale=mag)
        up = 2.0 ** float(torch.randint(8, 25, (1,), generator=g))
        n_d = int(torch.randint(1, 40, (1,), generator=g))
        d = _randn(n_d, g=g, dtype=torch.float32, scale=mag * up) if i % 3 else None
        cases.append((s, d))
    by_delta = 0
    for s, d in cases:
        got = ve.exponent(s, d)
        assert got.dtype == torch.float32 and got.shape == (1,) and got.device == s.device
        want = host(s.cpu(), None if d is None else d.cpu())
        assert float(got) == want, (s, d)
        by_delta += d is not None and want != host(s.cpu(), None) and s.numel() > 0 and bool(s.abs().max() > 0)
    assert by_delta >= 3  # the deltas' bound decided some of the random cases
    if dtype == torch.float16:  # the sm_90 build, in a subprocess outside the interpreter (which runs what the
        import subprocess  # compiler refuses, such as a global that is not a constexpr)
        import sys

        env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
        code = ("from kernels import value_exponent as v\n"
                "print('.entry _exponent_kernel' in v.compile_offline().asm['ptx'])")
        root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
        r = subprocess.run([sys.executable, "-c", code], cwd=root, env=env, capture_output=True, text=True, timeout=300)
        assert r.returncode == 0 and r.stdout.strip().endswith("True"), r.stderr[-3000:]


def test_outlier_slots_hand_case():
    """The fixed-slot form of a part's outliers (what the Gluon kernel reads): row i's outliers in channel order, two
    in plane 0, the third and fourth in plane 1, the fifth and sixth in plane 2 ... (only when some row has them),
    the prefix counts of the rows with a third outlier and the number of further planes between them; each slot the
    byte offset of the channel's accumulator row << 16 | the fp16 bits of value - dequantized code; empty slots 0;
    more than 16 in a row, repeated indices, deltas beyond fp16: none."""
    from kernels import gluon_attention as ga
    from kernels.triton_tiles import PartSpec

    cpu = torch.device("cpu")
    codes = torch.tensor([[0, 1, 2, 3] * 32, [3, 2, 1, 0] * 32, [1] * 128])
    scale = torch.tensor([[0.5], [0.25], [1.0]], dtype=torch.float16)
    zero = torch.tensor([[-1.0], [2.0], [0.0]], dtype=torch.float16)
    part = TokenQuant(ref.pack(codes, 2), scale, zero, 2, 128, 128, (3,))
    part.out_idx = torch.tensor([128 + 7, 5, 128 + 2, 128 + 100], dtype=torch.int32)  # row 0: ch 5; row 1: 2, 7, 100
    part.out_val = torch.tensor([10.0, -3.0, 4.5, 0.25], dtype=torch.float16)
    ell = ga.outlier_slots(PartSpec(part, dispatch.outlier_csr(part)))
    # plane 0 (3 x 2), prefix counts (4 entries) + the number of further planes + padding, plane 1 (3 x 2): row 1
    # has a third outlier
    assert ell.shape == (6 + 6 + 6,) and ell.dtype == torch.int32 and ell.device == cpu
    plane0, prefix, more = ga.slot_views(ell, 3)
    assert more.shape == (1, 3, 2) and int(ell[3 * 3 + 1]) == 1
    plane1 = more[0]

    def slot(ch, delta):  # the channel's accumulator row 8 (c % 16) + c // 16, as a byte offset (x 32)
        w = ((8 * (ch % 16) + ch // 16) * 32 << 16) | int(torch.tensor(delta, dtype=torch.float16).view(
            torch.int16)) & 0xFFFF
        return w - (1 << 32) if w >= 1 << 31 else w

    # row 0 ch 5: code 1 -> -1 + 0.5 = -0.5, delta -2.5; row 1 ch 2 / 7 / 100: codes 1, 0, 3 -> 2.25, 2.0, 2.75
    assert plane0.tolist() == [[slot(5, -2.5), 0], [slot(2, 4.5 - 2.25), slot(7, 10.0 - 2.0)], [0, 0]]
    assert plane1.tolist() == [[0, 0], [slot(100, 0.25 - 2.75), 0], [0, 0]]
    assert prefix.tolist() == [0, 0, 1, 1]  # rows before r with plane-1 slots: row 1 only
    assert ga.outlier_slots(PartSpec(part, dispatch.outlier_csr(part))) is ell  # cached on the part
    # as values (raw path: 2 bits, one scale per row) each delta is in its accumulator row's units, delta
    # 2^(E + pos - 24): E = 15 - 1 (largest scale 1 = 0.5 x 2^1; largest delta 8 allows up to 31 - 4), pos the code
    # position of row 8 (c % 16) + c // 16 in its half word (5 codes in place, then shifted): channel 5 -> code 5 ->
    # 0; 2 -> 4; 7 -> code 7 -> 2 x (7 - 5) = 4; 100 -> code 4 -> 8
    if ga.raw_values(2, 128, False, ga.MAX_SLOTS):
        vspec = PartSpec(part, dispatch.outlier_csr(part))
        assert ga.value_exponent(vspec) == 14
        v0, _, (v1,) = ga.slot_views(ga.outlier_slots(vspec, True), 3)
        assert v0.tolist() == [[slot(5, -2.5 / 1024), 0], [slot(2, 2.25 / 64), slot(7, 8.0 / 64)], [0, 0]]
        assert v1.tolist() == [[0, 0], [slot(100, -2.5 / 4), 0], [0, 0]]
        assert [ga.raw_vpos(ga.out_row(c), 2) for c in (5, 2, 7, 100)] == [0, 4, 4, 8]
        # a delta far above the scales lowers E: 2^(E - 16) max |delta| < 2^15 (scales: 24; delta 1000: 31 - 10)
        from types import SimpleNamespace as NS

        big = NS(part=None, scale=torch.tensor([1e-3]), has_out=True, odelta=torch.tensor([1000.0, -3.0]))
        assert ga._raw_exponent(big) == 21
        # all scales 0: the deltas' bound alone (E = 0 would leave the slots deep fp16 subnormals)
        flat = NS(part=None, scale=torch.zeros(3), has_out=True, odelta=torch.tensor([7.3, -5.1]))
        assert ga._raw_exponent(flat) == 31 - 3
    assert [ga.out_row(c) for c in (0, 1, 15, 16, 127)] == [0, 8, 120, 1, 127]
    g = _gen(3)
    for per_row in ([2, 0, 1, 2, 2], [1, 0, 1, 1, 0]):
        two = _row_outliers(_token_part(5, 128, 4, 128, torch.float16, g), per_row, g)
        one = ga.outlier_slots(PartSpec(two, dispatch.outlier_csr(two)))
        assert one.shape == (10 + 8,) and ga.slot_views(one, 5)[2] is None and int(one[16]) == 0  # one plane
        assert ga.slot_views(one, 5)[1].tolist() == [0] * 6  # no plane-1 rows: the kernel never reads plane 1
    four = _row_outliers(_token_part(4, 128, 4, 128, torch.float16, g), [3, 0, 2, 1], g)
    ell4 = ga.outlier_slots(PartSpec(four, dispatch.outlier_csr(four)))
    assert ell4.shape == (8 + 6 + 8,) and ell4[8 + 5] == 1  # 4 rows: 5 prefix counts and the number of planes after 0
    assert ga._slots_of(PartSpec(four, dispatch.outlier_csr(four)), False) == 4  # two planes: the 4-slot kernel
    assert ga.slot_views(ell4, 4)[1].tolist() == [0, 1, 1, 1, 1] and ga.slot_views(ell4, 4)[2][0, 0, 0] != 0
    five = _row_outliers(_token_part(5, 128, 4, 128, torch.float16, g), [1, 5, 0, 3, 0], g)
    ell5 = ga.outlier_slots(PartSpec(five, dispatch.outlier_csr(five)))
    p0, pre5, more5 = ga.slot_views(ell5, 5)
    assert ell5.shape == (10 + 8 + 2 * 10,) and int(ell5[3 * 5 + 1]) == 2 and more5.shape == (2, 5, 2)
    assert pre5.tolist() == [0, 0, 1, 1, 2, 2]  # rows 1 and 3 have a third outlier
    filled = (torch.stack([p0, *more5]) != 0).int()  # [plane, row, slot]: row 1's five, row 3's three, row 0's one
    assert filled[:, 1].flatten().tolist() == [1, 1, 1, 1, 1, 0]
    assert filled[:, 3].flatten().tolist() == [1, 1, 1, 0, 0, 0]
    assert int(filled.sum()) == 9
    assert ga._slots_of(PartSpec(five, dispatch.outlier_csr(five)), False) == ga.MAX_SLOTS  # three: planes looped
    many = _row_outliers(_token_part(5, 128, 4, 128, torch.float16, g), [1, 17, 0, 0, 0], g)
    assert ga.outlier_slots(PartSpec(many, dispatch.outlier_csr(many))) is None
    dup = _row_outliers(_token_part(5, 128, 4, 128, torch.float16, g), [2, 0, 0, 0, 0], g)
    dup.out_idx = dup.out_idx[[0, 0]].contiguous()  # one position twice: the reference writes it once
    assert ga.outlier_slots(PartSpec(dup, dispatch.outlier_csr(dup))) is None
    b16 = TokenQuant(ref.pack(codes, 2), scale.bfloat16(), zero.bfloat16(), 2, 128, 128, (3,))
    b16.out_idx, b16.out_val = part.out_idx, part.out_val.bfloat16()
    bits = int(ga.outlier_slots(PartSpec(b16, dispatch.outlier_csr(b16)))[0]) & 0xFFFF
    assert bits == int(torch.tensor(-2.5, dtype=torch.bfloat16).view(torch.int16)) & 0xFFFF  # bf16 bits
    big = _row_outliers(_token_part(5, 128, 4, 128, torch.float16, g), [1, 0, 0, 0, 0], g)
    big.zero[0] = -60000.0
    big.out_val[0] = 60000.0  # value - dequantized code overflows fp16: not representable in a slot
    assert ga.outlier_slots(PartSpec(big, dispatch.outlier_csr(big))) is None


def test_bench_qaq_rows_are_qaqs_storage():
    """The bench's QAQ-format rows with outliers are what QAQ stores (its quantizer and packer, here in chunks of 4
    rows): each row's extremes exact, codes 0 there, and deltas that are not zero."""
    from kernels.bench import qaq_rows
    from methods.qaq_quant import pack_rows, quantize_groups

    x = _randn(10, 128, g=_gen(21), dtype=torch.float16)
    p = qaq_rows(x, (10,), 2, chunk=4)
    qg = quantize_groups(x, torch.full((10,), 2, dtype=torch.int64, device=x.device), 0.01)
    want = pack_rows(x, qg.codes, qg.scale, qg.zero, qg.outliers, 2, (10,), x.dtype)
    for name in ("words", "scale", "zero", "out_idx", "out_val"):
        assert torch.equal(getattr(p, name), getattr(want, name)), name
    assert p.out_idx.numel() >= 20
    sidx, _, _, delta = dispatch.outlier_csr(p)
    assert bool((delta != 0).all()) and float(delta.abs().mean()) > 1  # statistics over the rest, not the extremes


@gpu_only
@pytest.mark.parametrize("kbits,vbits,kg,vg,M,lq,uniform,want,newr,k_most,v_most,dtype,static", [
    (4, 4, 128, 128, 8, 1, True, False, 0, 2, 2, F16, False), (2, 2, 128, 128, 4, 1, False, True, 0, 2, 2, F16, False),
    (4, 2, 32, 32, 8, 2, False, True, 3, 1, 4, F16, False), (2, 4, 64, 16, 1, 1, True, False, 0, 3, 0, F16, True),
    (4, 4, 128, 32, 4, 4, False, True, 5, 0, 2, F16, False), (2, 2, 32, 128, 8, 1, False, False, 0, 4, 1, F16, False),
    (4, 4, 128, 128, 8, 1, False, True, 0, 2, 2, BF16, True), (2, 4, 64, 32, 4, 2, True, False, 3, 4, 3, BF16, False),
    (3, 3, 128, 128, 8, 1, False, True, 0, 2, 2, F16, False), (3, 2, 128, 32, 4, 2, True, False, 3, 4, 3, F16, False),
    (2, 3, 64, 128, 8, 1, False, True, 0, 3, 4, F16, True), (3, 3, 128, 128, 8, 4, False, False, 5, 2, 3, BF16, False),
    (4, 3, 128, 128, 4, 1, True, True, 0, 0, 2, F16, False),
    (3, 1, 128, 128, 8, 1, False, True, 0, 2, 2, F16, False), (3, 0, 128, 128, 8, 1, False, True, 3, 3, 4, F16, False),
    (4, 0, 128, 64, 4, 2, True, False, 0, 2, 2, BF16, True),
    # raw values (no value outliers) next to key outliers, raw keys or not
    (2, 4, 128, 128, 8, 2, False, True, 3, 2, 0, F16, False), (4, 2, 128, 128, 4, 1, True, True, 0, 3, 0, F16, True),
    # more than 4 per row (planes 2 ..: QAQ's outliers=0.05 keeps about 8), raw values and pairs, the most (16)
    (2, 2, 128, 128, 4, 1, False, True, 0, 9, 8, F16, False), (4, 4, 128, 128, 8, 2, True, False, 3, 5, 16, F16, True),
    (3, 3, 128, 128, 4, 1, False, True, 0, 16, 7, F16, False), (3, 1, 128, 128, 4, 1, True, True, 0, 12, 0, F16, False),
    (2, 4, 64, 32, 8, 1, False, False, 0, 6, 11, BF16, False)])
def test_gluon_outliers_match_float64(kbits, vbits, kg, vg, M, lq, uniform, want, newr, k_most, v_most, dtype, static,
                                      monkeypatch, gluon_strict):
    """TokenQuant pairs with sparse outliers (up to ``k_most`` / ``v_most`` per row, rows with none among them:
    QAQ keeps each row's 2 extremes at its default ratio) on the Gluon kernel against float64: the key outliers'
    score terms and the value outliers' output terms, ragged heads, scores, causal new rows, dynamic or static
    schedule. Each side's outliers change the reference output by more than the tolerance (so a kernel that dropped
    either would fail)."""
    from kernels import gluon_attention as ga
    from kernels.triton_attention import PairPlan
    from kernels.triton_tiles import PartSpec

    taken = []
    launch = ga.launch
    monkeypatch.setattr(ga, "launch", lambda *a, **k: (taken.append(1), launch(*a, **k)))
    if static:
        monkeypatch.setattr(ga, "DYNAMIC", False)
    g = _gen(7 * kbits + 5 * vbits + kg + vg + M + 11 * k_most + 13 * v_most)
    H, d = 6, 128
    if uniform:
        counts = (600,) * H
        starts, cnts = [35] * H, [600 - 35 - 9] * H
    else:
        counts = tuple(int(c) for c in torch.randint(1, 2000, (H,), generator=g))
        starts = [int(torch.randint(0, c, (1,), generator=g)) for c in counts]
        cnts = [int(torch.randint(0, c - s + 1, (1,), generator=g)) for c, s in zip(counts, starts, strict=True)]
        cnts[0] = counts[0] - starts[0]
    n = sum(counts)
    k_part = _make("T", counts, d, kbits, kg, dtype, g, 0)
    v_part = _make("T", counts, d, vbits, vg, dtype, g, 0)
    for part, most in ((k_part, k_most), (v_part, v_most)):
        if most:
            _row_outliers(part, torch.randint(0, most + 1, (n,), generator=g), g)
    kspec, vspec = PartSpec(k_part, dispatch.outlier_csr(k_part)), PartSpec(v_part, dispatch.outlier_csr(v_part))
    assert ga.pair_fits(kspec, vspec)
    ko, vo = dispatch._offsets(counts), dispatch._offsets(counts)
    plan = PairPlan(kspec, vspec, [ko[h] + starts[h] for h in range(H)], [vo[h] + starts[h] for h in range(H)], cnts,
                    nsplit=7, newr=newr, device=DEV)
    q = _randn(H, M, d, g=g, dtype=dtype)
    o64, fin = _gluon_vs_float64(ga, taken, q, plan, k_part, v_part, starts, cnts, newr, lq, want, dtype)
    for side, most in ((0, k_most), (1, v_most)):
        if most:
            parts = [k_part, v_part]
            parts[side] = dataclasses.replace(parts[side], out_idx=None, out_val=None)
            o_bare, _, _ = _ref64_causal(q, *parts, d ** -0.5, starts, cnts, newr, lq)
            assert relerr(o_bare[fin], o64[fin]) > 3 * TOL[dtype], side


def _first_two(part):
    """``part`` without the third and fourth outliers of its rows (in channel order: what plane 1 holds)."""
    idx = part.out_idx.long()
    o = torch.argsort(idx)
    si = idx[o]
    keep = (torch.arange(si.numel(), device=si.device) - torch.searchsorted(si, si // part.d * part.d)) < 2
    return dataclasses.replace(part, out_idx=part.out_idx[o][keep].contiguous(),
                               out_val=part.out_val[o][keep].contiguous())


@gpu_only
@pytest.mark.parametrize("kbits,vbits,amp,spread", [(2, 2, 1, 1), (4, 4, 1, 3), (3, 3, 1, 1), (2, 4, 1e-3, 3),
                                                    (4, 2, 1e-3, 5), (3, 2, 1e-2, 3)])
def test_gluon_raw_paths_are_as_precise(kbits, vbits, amp, spread, monkeypatch, gluon_strict):
    """Keys (2/3 bits) and values (2/4 bits) with one scale per row take the raw paths (codes as the MMA operand,
    scales and zeros on the scores and on ``P^T``) on the Gluon kernel and are at least as close to float64 as the
    pair dequantization they replace, with long heads (thousands of small probabilities), peaked attention (scores
    of standard deviation ``spread``) and small scales (K and V times ``amp``): without the part's factor 2^E
    (:func:`value_exponent`) most ``p s`` entries of ``P^T`` were then fp16 subnormals, and the error grew to 3e-2
    (an emulation of the kernel's rounding in review) against 3e-4 for the pairs."""
    from kernels import gluon_attention as ga
    from kernels.triton_attention import PairPlan
    from kernels.triton_tiles import PartSpec

    g = _gen(7 * kbits + vbits)
    H, d, M = 4, 128, 4
    counts = (4096, 3000, 2048, 1111)
    k_part = _make("T", counts, d, kbits, 128, F16, g, 0)
    v_part = _make("T", counts, d, vbits, 128, F16, g, 0)
    for part in (k_part, v_part):
        part.scale.mul_(amp)
        part.zero.mul_(amp)
    offs = dispatch._offsets(counts)
    plan = PairPlan(PartSpec(k_part), PartSpec(v_part), offs[:H], offs[:H], list(counts), nsplit=5, device=DEV)
    q = _randn(H, M, d, g=g, dtype=F16, scale=spread / amp)  # K rows of about amp: scores of about spread
    o64, _, _ = _ref64(q, k_part, v_part, d ** -0.5, [0] * H, list(counts))
    consts = ga._consts(plan, False, 4)
    assert consts["K_RAW"] == (kbits != 4) and consts["V_RAW"]
    assert ga.value_exponent(plan.v) == 15 - math.frexp(float(v_part.scale.float().max()))[1]
    _raw_then_pairs(ga, monkeypatch, q, plan, o64, ("RAW_K", "RAW_V"), "K_RAW")


@gpu_only
@pytest.mark.parametrize("kbits,vbits,amp,spread,big", [
    (2, 2, 1, 1, 0), (4, 4, 1, 3, 0), (2, 4, 1e-3, 3, 0), (3, 2, 1e-2, 3, 0), (4, 2, 1e-6, 2, 0), (2, 4, 300, 2, 0),
    (3, 3, 1, 2, 0), (2, 3, 1e-4, 3, 0), (2, 2, 1e-3, 2, 1000), (3, 3, 1e-3, 2, 2000)])
def test_gluon_raw_values_with_outliers(kbits, vbits, amp, spread, big, monkeypatch, gluon_strict):
    """Values with QAQ's outliers (up to 4 per row) take the raw path as well: each slot's delta is stored in its
    accumulator row's units (``delta 2^(E + pos - 24)``) and its tile multiplied by ``p``; at least as close to
    float64 as the pairs, with tiny (``amp``: values times 1e-6) and large value scales and peaked attention; and
    with one outlier (``big``) far above the scales, which lowers ``E`` so that its slot stays below ``2^15``."""
    from kernels import gluon_attention as ga
    from kernels.triton_attention import PairPlan
    from kernels.triton_tiles import PartSpec

    g = _gen(70 * kbits + vbits)
    H, d, M = 4, 128, 4
    counts = (4096, 3000, 2048, 1111)
    k_part = _make("T", counts, d, kbits, 128, F16, g, 0)
    v_part = _make("T", counts, d, vbits, 128, F16, g, 0)
    n = sum(counts)
    for part in (k_part, v_part):
        f = amp if part is v_part else 1.0
        part.scale.mul_(f)
        part.zero.mul_(f)
        _row_outliers(part, torch.randint(0, 5, (n,), generator=g), g)
        part.out_val.mul_(f)
    if big:
        v_part.out_val[0] = big
    kspec, vspec = PartSpec(k_part, dispatch.outlier_csr(k_part)), PartSpec(v_part, dispatch.outlier_csr(v_part))
    offs = dispatch._offsets(counts)
    plan = PairPlan(kspec, vspec, offs[:H], offs[:H], list(counts), nsplit=5, device=DEV)
    q = _randn(H, M, d, g=g, dtype=F16, scale=spread)
    o64, _, _ = _ref64(q, k_part, v_part, d ** -0.5, [0] * H, list(counts))
    consts = ga._consts(plan, False, 4)
    assert consts["V_RAW"] and consts["V_OUT"] and not consts["K_TS"]
    e_s = 15 - math.frexp(float(v_part.scale.float().max()))[1]
    e_d = 31 - math.frexp(float(vspec.odelta.abs().max()))[1]
    assert ga.value_exponent(plan.v) == min(e_s, e_d) and (e_d < e_s) == bool(big)
    _raw_then_pairs(ga, monkeypatch, q, plan, o64, ("RAW_VOUT",), "V_RAW")


def _raw_then_pairs(ga, monkeypatch, q, plan, o64, switches, flag):
    """Run ``plan`` on the Gluon kernel's raw path (taken: checked), then with the module ``switches`` off (its
    ``flag`` constant then off) on the pairs, and check that raw is within the fp16 tolerance of float64 and at
    least as close to it as the pairs."""
    from kernels.triton_attention import attend_pairs

    d = q.shape[-1]
    taken = []
    launch = ga.launch
    monkeypatch.setattr(ga, "launch", lambda *a, **k: (taken.append(1), launch(*a, **k)))
    raw = relerr(attend_pairs(q, [plan], d ** -0.5)[0], o64)
    assert taken, "the Gluon kernel was not used"
    for name in switches:
        monkeypatch.setattr(ga, name, False)
    assert not ga._consts(plan, False, 4)[flag]
    pairs = relerr(attend_pairs(q, [plan], d ** -0.5)[0], o64)
    print(f"raw {raw:.2e} pairs {pairs:.2e}")
    assert raw < TOL[F16] and raw <= 1.25 * pairs + 1e-5


@gpu_only
@pytest.mark.parametrize("kbits,vbits", [(2, 2), (4, 4), (2, 4), (4, 2)])
def test_gluon_staged_rows(kbits, vbits, monkeypatch, gluon_strict):
    """QAQ's rows without outliers (2/4-bit TokenQuant keys and raw values, one scale per row, fp16) stage each half
    tile in shared memory (``K_TS``: checked): heads at odd and even rows (an odd head's stage starts one row
    early), ragged ranges ending at odd rows, the part's last row odd, causal new rows and scores, two query tokens.
    Against float64 within the fp16 tolerance, and against the unstaged kernel (``TSTAGE`` off) within rounding; a
    plan whose keys and values start at rows of different parity keeps the unstaged kernel."""
    from kernels import gluon_attention as ga
    from kernels.triton_attention import PairPlan, attend_pairs
    from kernels.triton_tiles import PartSpec

    g = _gen(40 + 4 * kbits + vbits)
    H, d, M, lq, newr = 5, 128, 4, 2, 3
    counts = (1031, 2048, 777, 1500, 67)
    starts, cnts = [3, 0, 10, 1, 0], [1020, 2048, 700, 1499, 67]
    k_part = _make("T", counts, d, kbits, 128, F16, g, 0)
    v_part = _make("T", counts, d, vbits, 128, F16, g, 0)
    offs = dispatch._offsets(counts)
    rows = [offs[h] + starts[h] for h in range(H)]
    assert {r % 2 for r in rows} == {0, 1} and sum(counts) % 2 == 1
    monkeypatch.setattr(ga, "TSTAGE", True)  # whatever the environment says
    plan = PairPlan(PartSpec(k_part), PartSpec(v_part), rows, rows, cnts, nsplit=6, newr=newr, device=DEV)
    assert ga._consts(plan, True, M)["K_TS"]
    taken = []
    launch = ga.launch
    monkeypatch.setattr(ga, "launch", lambda *a, **k: (taken.append(1), launch(*a, **k)))
    q = _randn(H, M, d, g=g, dtype=F16)
    o64, fin = _gluon_vs_float64(ga, taken, q, plan, k_part, v_part, starts, cnts, newr, lq, True, F16)
    staged = attend_pairs(q, [plan], d ** -0.5, None, lq)[0]
    monkeypatch.setattr(ga, "TSTAGE", False)
    assert not ga._consts(plan, True, M)["K_TS"]
    unstaged = attend_pairs(q, [plan], d ** -0.5, None, lq)[0]
    assert relerr(unstaged[fin], o64[fin]) < TOL[F16]
    assert relerr(staged[fin], unstaged[fin]) < 1e-3
    monkeypatch.setattr(ga, "TSTAGE", True)
    odd = PairPlan(PartSpec(k_part), PartSpec(v_part), rows, [r + 1 for r in rows[:-1]] + rows[-1:], cnts,
                   nsplit=6, device=DEV)
    assert not odd.kv_parity and not ga._consts(odd, False, M)["K_TS"]


@gpu_only
@pytest.mark.parametrize("kg,vg,amp,spread", [(32, 32, 1, 1), (64, 64, 1, 3), (128, 32, 1e-3, 3), (32, 64, 1e-2, 5)])
def test_gluon_raw_channel_keys_are_as_precise(kg, vg, amp, spread, monkeypatch, gluon_strict):
    """KIVI 2-bit (2-bit ChannelQuant keys, 2-bit values in groups of 32 or 64) with at most 4 query rows takes the
    raw key path (codes as the MMA operand, each key block's scales on the queries, two softmax streams per query,
    half tiles staged in shared memory: :func:`kernels.gluon_attention._craw_scores`) and is at least as close to
    float64 as the pair dequantization, with long heads, peaked attention and small scales; 8 query rows keep the
    pairs."""
    from kernels import gluon_attention as ga
    from kernels.triton_attention import PairPlan
    from kernels.triton_tiles import PartSpec

    g = _gen(kg + vg)
    H, d, M = 4, 128, 4
    counts = (4096, 3072, 2048, 1152)
    k_part = _make("C", counts, d, 2, kg, F16, g, 0)
    v_part = _make("T", counts, d, 2, vg, F16, g, 0)
    for part in (k_part, v_part):
        part.scale.mul_(amp)
        part.zero.mul_(amp)
    offs = dispatch._offsets(counts)
    plan = PairPlan(PartSpec(k_part), PartSpec(v_part), offs[:H], offs[:H], list(counts), nsplit=5, device=DEV)
    q = _randn(H, M, d, g=g, dtype=F16, scale=spread / amp)
    o64, _, _ = _ref64(q, k_part, v_part, d ** -0.5, [0] * H, list(counts))
    assert ga._consts(plan, False, 4)["K_CRAW"] and not ga._consts(plan, False, 8)["K_CRAW"]
    _raw_then_pairs(ga, monkeypatch, q, plan, o64, ("RAW_C",), "K_CRAW")


@gpu_only
@pytest.mark.parametrize("want,dtype,many", [(False, F16, False), (True, BF16, False), (False, F16, True)])
def test_gluon_rare_second_plane(want, dtype, many, monkeypatch, gluon_strict):
    """QAQ's ties: two outliers in every row, a third or fourth in a few rows only (at a head's first and last row,
    on both sides of a half-tile edge and inside a tile), so most half tiles skip plane 1 (their flag comes from two
    prefix counts) and the others must not: against float64, and dropping just those third and fourth outliers
    changes the reference beyond the tolerance on each side. ``many``: those few rows have 5 to 16 (the kernel's
    variant with planes 2 ..: the same flag, the planes looped over)."""
    from kernels import gluon_attention as ga
    from kernels.triton_attention import PairPlan
    from kernels.triton_tiles import PartSpec

    taken = []
    launch = ga.launch
    monkeypatch.setattr(ga, "launch", lambda *a, **k: (taken.append(1), launch(*a, **k)))
    g = _gen(99 + want + 7 * many)
    counts, d, M = (700, 1000, 385), 128, 4
    H, n = len(counts), sum(counts)
    ko = dispatch._offsets(counts)
    k_part = _make("T", counts, d, 4, 128, dtype, g, 0)
    v_part = _make("T", counts, d, 2, 128, dtype, g, 0)
    for side, part in enumerate((k_part, v_part)):
        per_row = torch.full((n,), 2)
        for h, c in enumerate(counts):
            for j, r in enumerate((0, 63 + side, 64 + 64 * side, 165, c - 1)):
                per_row[ko[h] + r] = (5, 16, 9, 12, 7)[(j + side) % 5] if many else 3 + (j + side) % 2
        _row_outliers(part, per_row, g)
        rare = (per_row > 2).to(DEV)[part.out_idx.long() // d]
        part.out_val = torch.where(rare, part.out_val * 8, part.out_val)  # so those rows' outliers matter
    kspec, vspec = PartSpec(k_part, dispatch.outlier_csr(k_part)), PartSpec(v_part, dispatch.outlier_csr(v_part))
    assert ga.pair_fits(kspec, vspec)
    assert ga._slots_of(kspec, False) == ga._slots_of(vspec, True) == (ga.MAX_SLOTS if many else 4)
    starts, cnts = [0] * H, list(counts)
    plan = PairPlan(kspec, vspec, list(ko[:H]), list(ko[:H]), cnts, nsplit=5, newr=0, device=DEV)
    q = _randn(H, M, d, g=g, dtype=dtype)
    o64, fin = _gluon_vs_float64(ga, taken, q, plan, k_part, v_part, starts, cnts, 0, 1, want, dtype)
    for side in (0, 1):
        parts = [k_part, v_part]
        parts[side] = _first_two(parts[side])
        o_bare, _, _ = _ref64_causal(q, *parts, d ** -0.5, starts, cnts, 0, 1)
        assert relerr(o_bare[fin], o64[fin]) > 3 * TOL[dtype], side


@gpu_only
@pytest.mark.parametrize("varied", [False, True])
def test_gluon_value_outliers_in_one_channel(varied, gluon_strict):
    """Values that are all zero but for one outlier per row, so the output is nothing but the delta tiles' products.
    Same channel in every row (each chunk's tile gets a full row of 16 deltas, the next chunk but one rewrites the
    same entries): queries 0 (every p equal), delta 8 with signs alternating per head, the output exactly +-8 in
    that channel. ``varied``: a channel per row cycling through accumulator rows of both swizzle phases, random
    deltas and queries (unequal p): any entry not cleared, read from the wrong tile or at the wrong column shows as
    an error of the outliers' own size. Both against float64."""
    from kernels import gluon_attention as ga
    from kernels.triton_attention import PairPlan, attend_pairs
    from kernels.triton_tiles import PartSpec

    H, d, T = 4, 128, 640
    g = _gen(77)
    k_part = _make("T", (T,) * H, d, 4, 128, F16, g, 0)
    codes = torch.zeros(H * T, d, dtype=torch.int64)
    v_part = TokenQuant(ref.pack(codes, 4).to(DEV), torch.ones(H * T, 1, dtype=F16, device=DEV),
                        torch.zeros(H * T, 1, dtype=F16, device=DEV), 4, 128, d, (T,) * H)
    rows = torch.arange(H * T)
    if varied:
        v_part.out_idx = (rows * d + (rows * 37) % d).to(torch.int32).to(DEV)
        v_part.out_val = _randn(H * T, g=g, dtype=F16, scale=8.0)
        q = _randn(H, 4, d, g=g, dtype=F16, scale=3.0)
    else:
        v_part.out_idx = (rows * d + 5).to(torch.int32).to(DEV)
        v_part.out_val = torch.where(rows // T % 2 == 0, 8.0, -8.0).to(F16).to(DEV)
        q = torch.zeros(H, 4, d, dtype=F16, device=DEV)
    kspec, vspec = PartSpec(k_part), PartSpec(v_part, dispatch.outlier_csr(v_part))
    assert ga.pair_fits(kspec, vspec)
    plan = PairPlan(kspec, vspec, [h * T for h in range(H)], [h * T for h in range(H)], [T] * H, nsplit=3, device=DEV)
    out, _ = attend_pairs(q, [plan], d ** -0.5)
    o64, _, _ = _ref64(q, k_part, v_part, d ** -0.5, [0] * H, [T] * H)
    assert relerr(out, o64) < (TOL[F16] if varied else 1e-4)
    if not varied:
        want = torch.tensor([8.0, -8.0, 8.0, -8.0]).repeat_interleave(4).view(H, 4)
        assert torch.allclose(out[:, :, 5].cpu(), want, rtol=0, atol=1e-5)


@gpu_only
def test_gluon_scope_of_tokenquant_keys():
    """Which TokenQuant-key pairs the Gluon kernel takes: keys and values of 2 or 4 bits, key groups of 32, 64 or 128
    channels, 3 bits with one scale per row (group 128), values also of 0 and 1 bit, at most 16 outliers per row;
    group 16, 3 bits in smaller groups, 0/1/8-bit keys, more outliers in a row and value outliers next to
    ChannelQuant keys stay on Triton."""
    from kernels import gluon_attention as ga
    from kernels.triton_tiles import PartSpec

    g = _gen(5)
    counts, d = (64, 32), 128

    def fits(kb, kg, k_out=0, vb=2, v_out=0):
        k = _make("T", counts, d, kb, kg, torch.float16, g, k_out)
        v = _make("T", counts, d, vb, 32, torch.float16, g, v_out)
        return ga.pair_fits(PartSpec(k, dispatch.outlier_csr(k)), PartSpec(v, dispatch.outlier_csr(v)))

    assert all(fits(kb, kg, vb=vb) for kb in (2, 4) for vb in (2, 4) for kg in (32, 64, 128))
    assert fits(2, 128, k_out=10) and fits(4, 128, v_out=10)  # a few per row
    assert fits(2, 128, k_out=400) and fits(4, 128, v_out=400)  # about 4 per row, some rows with 9 or more
    ck = _make("C", counts, d, 2, 32, torch.float16, g, 0)
    v = _make("T", counts, d, 2, 32, torch.float16, g, 10)
    assert not ga.pair_fits(PartSpec(ck), PartSpec(v, dispatch.outlier_csr(v)))  # ChannelQuant keys: no outliers
    assert not any([fits(2, 16), fits(0, 32), fits(3, 32), fits(8, 32), fits(2, 32, vb=3), fits(2, 128, k_out=3000),
                    fits(4, 128, v_out=3000)])
    # 3 bits with one scale per row (QAQ, MiKV), outliers too; ChannelQuant keys next to 3-bit values
    v3 = _make("T", counts, d, 3, 128, torch.float16, g, 10)
    for k in (_make("T", counts, d, 3, 128, torch.float16, g, 10), _make("T", counts, d, 2, 64, torch.float16, g, 0)):
        assert ga.pair_fits(PartSpec(k, dispatch.outlier_csr(k)), PartSpec(v3, dispatch.outlier_csr(v3)))
    assert ga.pair_fits(PartSpec(ck), PartSpec(_make("T", counts, d, 3, 128, torch.float16, g, 0)))
    assert not fits(3, 64)
    assert fits(3, 128, vb=1, v_out=10) and fits(4, 64, vb=0, v_out=10) and fits(2, 32, vb=0)  # 0/1-bit values
    assert not (fits(1, 32) or fits(0, 32, vb=1))


@gpu_only
def test_pairs_on_side_streams(monkeypatch):
    """Several part pairs (QAQ's widths on the Gluon kernel, a dense residual on the Triton kernel) captured into a
    CUDA graph launch on side streams forked from the caller's and joined before the merge: replays give the same
    output and scores, bit for bit, as one launch after another (static schedule), and the caller's stream sees the
    results without any other synchronization (the next op reads them on it). Eager calls use no side stream."""
    from kernels import triton_attention as ta
    from kernels.triton_attention import PairPlan, attend_pairs
    from kernels.triton_tiles import PartSpec

    torch.use_deterministic_algorithms(True, warn_only=True)  # the Gluon kernel's static schedule
    try:
        g = _gen(404)
        H, d, M = 4, 128, 4
        plans, col = [], 0
        for kb, vb, n, fmt in ((3, 0, 700, "T"), (3, 1, 520, "T"), (4, 2, 300, "T"), (0, 0, 33, "D")):
            counts = (n,) * H
            k = _make(fmt, counts, d, kb, 128, F16, g, 0)
            v = _make(fmt, counts, d, vb, 128, F16, g, 0)
            if fmt == "T":
                _row_outliers(k, torch.randint(0, 3, (n * H,), generator=g), g)
                _row_outliers(v, torch.randint(0, 3, (n * H,), generator=g), g)
            offs = dispatch._offsets(counts)
            plans.append(PairPlan(PartSpec(k, dispatch.outlier_csr(k) if fmt == "T" else None),
                                  PartSpec(v, dispatch.outlier_csr(v) if fmt == "T" else None),
                                  offs, offs, [n] * H, nsplit=5, col_base=col, device=DEV))
            col += n
        q = _randn(H, M, d, g=g, dtype=F16)

        def run():
            sc = torch.full((H, M, col), float("-inf"), device=DEV)
            out, lse = attend_pairs(q, plans, d ** -0.5, sc)
            return out * 1.0, lse * 1.0, sc  # read on the caller's stream right away

        monkeypatch.setattr(ta, "STREAMS", False)
        want = run()
        monkeypatch.setattr(ta, "STREAMS", True)
        monkeypatch.setattr(ta, "_SIDE", {})
        got = run()
        assert not ta._SIDE, "an eager call forked"
        for a, b in zip(got, want, strict=True):
            assert torch.equal(a, b)
        static = [torch.empty_like(t) for t in want]
        s = torch.cuda.Stream()
        s.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(s):
            run()
        torch.cuda.current_stream().wait_stream(s)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            for dst, src in zip(static, run(), strict=True):
                dst.copy_(src)
        assert ta._SIDE, "the capture used no side stream"
        for _ in range(3):
            for t in static:
                t.fill_(float("nan"))
            graph.replay()
            for a, b in zip(static, want, strict=True):
                assert torch.equal(a, b)
    finally:
        torch.use_deterministic_algorithms(False)


@gpu_only
def test_pairs_chained(monkeypatch, gluon_strict):
    """Part pairs that the Gluon kernel serves all (QAQ's widths with its outliers, ragged heads), captured into a
    CUDA graph, launch as one chain of programmatic dependent launches on the caller's stream (``chain`` 1, then 2);
    eager calls launch one after another. The first pair is long and the last short, so the later launches can start
    in the first one's tail and end before it would: the merge must still read every launch's partials. Replays with
    new queries each time equal the eager calls bit for bit (static schedule), and match them within the dynamic
    schedule's rounding."""
    from kernels import gluon_attention as ga
    from kernels import triton_attention as ta
    from kernels.triton_attention import PairPlan, attend_pairs
    from kernels.triton_tiles import PartSpec

    g = _gen(405)
    H, d, M = 24, 128, 4
    plans, col = [], 0
    for kb, vb, n in ((3, 3, 6000), (2, 2, 700), (4, 4, 90)):
        counts = [n - 37 * (h % 3) for h in range(H)]  # ragged heads
        k = _make("T", counts, d, kb, 128, F16, g, 0)
        v = _make("T", counts, d, vb, 128, F16, g, 0)
        _row_outliers(k, torch.randint(0, 3, (sum(counts),), generator=g), g)
        _row_outliers(v, torch.randint(0, 3, (sum(counts),), generator=g), g)
        offs = dispatch._offsets(counts)[:-1]
        plans.append(PairPlan(PartSpec(k, dispatch.outlier_csr(k)), PartSpec(v, dispatch.outlier_csr(v)), offs, offs,
                              counts, col=[0] * H, col_base=col, device=DEV))
        col += max(counts)
    q = _randn(H, M, d, g=g, dtype=F16)
    assert all(ta.gluon_serves(p, q) for p in plans)
    chains = []
    launch = ga.launch
    monkeypatch.setattr(ga, "launch", lambda *a, **kw: (chains.append(a[-1] if len(a) > 9 else 0), launch(*a, **kw)))
    monkeypatch.setattr(ta, "STREAMS", False)

    def run():
        sc = torch.full((H, M, col), float("-inf"), device=DEV)
        out, lse = attend_pairs(q, plans, d ** -0.5, sc)
        return out * 1.0, lse * 1.0, sc

    def captured():
        static = [torch.empty_like(t) for t in run()]
        s = torch.cuda.Stream()
        s.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(s):
            run()
        torch.cuda.current_stream().wait_stream(s)
        chains.clear()
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            for dst, src in zip(static, run(), strict=True):
                dst.copy_(src)
        assert chains == [1, 2, 2], chains
        return graph, static

    def replays(graph, static, check):
        for i in range(4):
            q.copy_(_randn(H, M, d, g=g, dtype=F16))  # new queries: partials left from a replay before would differ
            for t in static:
                t.fill_(float("nan"))
            graph.replay()
            for a, b in zip(static, run(), strict=True):  # run(): an eager call
                check(a, b, i)

    chains.clear()
    run()
    assert chains == [0, 0, 0], chains  # eager: one launch after another
    torch.use_deterministic_algorithms(True, warn_only=True)  # the static schedule
    try:
        graph, static = captured()

        def equal(a, b, i):
            assert torch.equal(a, b), i

        replays(graph, static, equal)
    finally:
        torch.use_deterministic_algorithms(False)
    graph, static = captured()  # the dynamic schedule: each program's units vary from run to run

    def close(a, b, i):
        assert torch.allclose(a, b, rtol=2e-3, atol=1e-4, equal_nan=True), i

    replays(graph, static, close)


@gpu_only
@pytest.mark.parametrize("kf,kbits,group,draw_late", [("C", 2, 32, True), ("C", 4, 32, True), ("T", 2, 32, True),
                                                      ("T", 2, 128, True), ("T", 4, 128, True), ("C", 2, 32, False),
                                                      ("T", 4, 128, False)])
def test_gluon_dynamic_schedule(kf, kbits, group, draw_late, monkeypatch, gluon_strict):
    """The Gluon kernel's dynamic schedule (programs draw units from a per-head counter): with 1 to 24 programs per
    head over up to 180 units, ragged heads (one empty, one of a single token), every unit is done exactly once (the
    output matches float64 and the static schedule), the counters are back at zero after every launch (also across
    CUDA-graph replays, where the same counters serve again), and with deterministic algorithms asked for, the
    static schedule runs: bitwise the same output every time. KIVI 2-bit and QAQ's rows (``group`` 128: one scale
    per row) are the half-tile staged kernels, whose units' successors are drawn late (``DRAW_LATE``: checked; also
    switched off)."""
    from kernels import gluon_attention as ga
    from kernels.triton_attention import PairPlan, attend_pairs
    from kernels.triton_tiles import PartSpec

    g = _gen(77 + kbits)
    H, d, M = 5, 128, 4
    counts = (90 * 128, 32 * 7, 64, 128 * 40 + 32, 32 * 3)
    starts, cnts = [5, 0, 0, 17, 1], [90 * 128 - 5, 32 * 7, 0, 128 * 40, 1]
    k_part = _make(kf, counts, d, kbits, group, torch.float16, g, 0)
    v_part = _make("T", counts, d, kbits, group, torch.float16, g, 0)
    ko = dispatch._offsets(counts)
    q = _randn(H, M, d, g=g, dtype=torch.float16)
    o64, l64, _ = _ref64(q, k_part, v_part, d ** -0.5, starts, cnts)
    fin = torch.isfinite(l64)
    monkeypatch.setattr(ga, "DRAW_LATE", draw_late)
    monkeypatch.setattr(ga, "TSTAGE", True)
    monkeypatch.setattr(ga, "RAW_C", True)
    staged = PairPlan(PartSpec(k_part), PartSpec(v_part), [ko[h] + starts[h] for h in range(H)],
                      [ko[h] + starts[h] for h in range(H)], cnts, nsplit=7, device=DEV)
    assert ga._consts(staged, False, M)["LATE"] == (draw_late and ((kf, kbits) == ("C", 2) or group == 128))

    def plan(nsplit=None):
        return PairPlan(PartSpec(k_part), PartSpec(v_part), [ko[h] + starts[h] for h in range(H)],
                        [ko[h] + starts[h] for h in range(H)], cnts, nsplit=nsplit, device=DEV)

    modes = []
    consts = ga._consts
    monkeypatch.setattr(ga, "_consts", lambda *a: (modes.append(consts(*a)["DYNAMIC"]), consts(*a))[1])
    monkeypatch.setattr(ga, "DYNAMIC", False)
    static = plan(7)
    o_static, _ = attend_pairs(q, [static], d ** -0.5)
    assert modes == [False] and int(static.counters.abs().sum()) == 0
    monkeypatch.setattr(ga, "DYNAMIC", True)
    for nsplit in (1, 3, 24, None):
        p = plan(nsplit)
        for _ in range(2):
            out, lse = attend_pairs(q, [p], d ** -0.5)
            torch.cuda.synchronize()
            assert modes[-1] is True and int(p.counters.abs().sum()) == 0
            assert torch.equal(torch.isfinite(lse), fin)
            assert relerr(out[fin], o64[fin]) < TOL[torch.float16]
            assert relerr(out[fin], o_static[fin]) < 2e-3
    p = plan()
    attend_pairs(q, [p], d ** -0.5)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        gout, _ = attend_pairs(q, [p], d ** -0.5)
    for _ in range(3):
        gout.fill_(float("nan"))
        graph.replay()
        torch.cuda.synchronize()
        assert int(p.counters.abs().sum()) == 0 and relerr(gout[fin], o64[fin]) < TOL[torch.float16]
    # deterministic algorithms asked for after the plan was made: the next launch takes static ranges
    monkeypatch.setattr(torch, "are_deterministic_algorithms_enabled", lambda: True)
    first, _ = attend_pairs(q, [p], d ** -0.5)
    assert modes[-1] is False
    for _ in range(3):
        assert torch.equal(attend_pairs(q, [p], d ** -0.5)[0], first)


@gpu_only
@pytest.mark.parametrize("kf,kbits,group,outliers", [("C", 2, 32, 0), ("T", 4, 128, 60), ("T", 8, 32, 0)])
def test_fast_relaunch_matches_jit(kf, kbits, group, outliers, monkeypatch):
    """Kernels relaunched from the cache of :mod:`kernels.fast_launch` (the Gluon kernel for KIVI 2-bit and for QAQ's
    rows with outliers, the Triton kernel for 8-bit keys, and the merge) give bitwise the outputs of the JIT launch
    over several calls with fresh queries and scores asked for or not (static schedule, so the work is
    deterministic); a merge of partials at an address that is not 16-byte aligned, after aligned ones were merged,
    gets a kernel of its own (the alignment is in the key) and the right result."""
    from kernels import fast_launch
    from kernels import gluon_attention as ga
    from kernels.triton_attention import PairPlan, attend_pairs, merge_splits
    from kernels.triton_tiles import PartSpec

    monkeypatch.setattr(ga, "DYNAMIC", False)
    g = _gen(5 + kbits)
    H, d, M = 3, 128, 4
    counts = (128 * 9 + 32, 128 * 4, 96)
    k_part = _make(kf, counts, d, kbits, group, torch.float16, g, outliers)
    v_part = _make("T", counts, d, min(kbits, 4), group, torch.float16, g, outliers)
    ko = dispatch._offsets(counts)
    kspec, vspec = PartSpec(k_part, dispatch.outlier_csr(k_part)), PartSpec(v_part, dispatch.outlier_csr(v_part))
    plan = PairPlan(kspec, vspec, ko[:H], ko[:H], list(counts), device=DEV)
    assert plan.gluon == (kbits != 8) and kspec.has_out == bool(outliers)
    for step in range(3):
        q = _randn(H, M, d, g=g, dtype=torch.float16)
        want = step == 1
        runs = []
        for enabled in (False, True, True):
            monkeypatch.setattr(fast_launch, "ENABLED", enabled)
            sc = torch.full((H, M, max(counts)), float("-inf"), device=DEV) if want else None
            out, lse = attend_pairs(q, [plan], d ** -0.5, sc)
            runs.append((out, lse, sc))
        for out, lse, sc in runs[1:]:
            assert torch.equal(out, runs[0][0]) and torch.equal(lse, runs[0][1])
            assert not want or torch.equal(sc, runs[0][2])
        o64, _, _ = _ref64(q, k_part, v_part, d ** -0.5, [0] * H, list(counts))
        assert relerr(runs[0][0], o64) < TOL[torch.float16]
    monkeypatch.setattr(fast_launch, "ENABLED", True)
    S = 5
    buf = torch.randn(H * S * M * d + 1, device=DEV)
    lbuf = torch.randn(H * S * M + 1, device=DEV)
    for off in (0, 0, 1):  # aligned twice (the second from the cache), then a view 4 bytes in
        out_p = buf[off:off + H * S * M * d].view(H, S, M, d)
        lse_p = lbuf[off:off + H * S * M].view(H, S, M)
        out, lse = merge_splits(out_p, lse_p, S, 1, H, S)
        w = torch.softmax(lse_p.double(), 1)
        assert torch.allclose(out.double(), (w[..., None] * out_p.double()).sum(1), rtol=1e-5, atol=1e-6)
        assert torch.allclose(lse.double(), torch.logsumexp(lse_p.double(), 1), rtol=1e-5, atol=1e-6)


_BUILD = """
import sys
from kernels import gluon_attention as ga
bf16, dynamic, tok, out = sys.argv[4] == "1", sys.argv[5] == "1", sys.argv[6] == "1", int(sys.argv[8])
kb, vb, kg = int(sys.argv[1]), int(sys.argv[2]), int(sys.argv[7])
vg = 128 if vb in (1, 3) or (tok and kg == 128) else 32
ptx = ga.compile_offline(kb, vb, kg, vg, want_scores=sys.argv[3] == "1", bf16=bf16, dynamic=dynamic, k_tok=tok,
                         k_out=out, v_out=out, pdl=out > 0 or vb == 3).asm["ptx"]
t = "bf16" if bf16 else "f16"
gdc = ("griddepcontrol.launch_dependents", "griddepcontrol.wait")  # a chained launch's code (QAQ's part pairs)
assert all((g in ptx) == (out > 0 or vb == 3) for g in gdc), [g in ptx for g in gdc]  # built so: out or 3-bit values
need = (f"mma.sync.aligned.m16n8k16.row.col.f32.{t}.{t}.f32", "movmatrix.sync.aligned.m8n8.trans.b16", "prmt.b32")
raw = (ga.raw_keys(kb, kg, tok, bf16), ga.raw_values(vb, vg, bf16, out))
for side, b in ((0, kb), (1, vb)):
    if raw[side]:  # codes masked out as fp16 subnormals at position 0 of both halves (the raw paths)
        need += (f"mov.b32 \t%r", f", {((1 << b) - 1) * 65537};")  # the mask of position 0, both halves
if raw[0]:
    need += ("0f4A800000",)  # a raw key score row's factor 2^22 over its scale
craw = ga.raw_channel_keys(kb, kg, tok, bf16, 4, vb, vg)
if craw:  # raw ChannelQuant keys: masks, two streams merged by shuffles, value scales copied as words
    need += (", 196611;", "shfl.sync.bfly.b32", "cp.async.ca.shared.global")
if not (raw[0] and raw[1]):  # pair dequantization: rotation, magic, fma
    need += ("lop3.b32", f"fma.rn.{t}x2", "shf.l.wrap.b32")
if not tok and not craw:
    need += (f"mul.rn.{t}x2",)  # ChannelQuant key scale pairs prepared in the kernel
if sys.argv[1] == "2" and not tok:
    need += ("cp.async.cg.shared.global",)  # 16-byte copies of the staged 2-bit key tiles
ts = ga.staged_rows(kb, kg, tok, vb, vg, bf16, out, out)
if ts:  # staged rows: 16-byte copies of the words, 4-byte ones of the row scales; a lane's words in one shared load
    need += ("cp.async.cg.shared.global", "cp.async.ca.shared.global",
             "ld.shared.v2.b32" if kb == 2 else "ld.shared.v4.b32")
    if vb == 4:
        need += ("ld.shared.v2.b32",)
elif tok and sys.argv[1] != "3":  # a lane's words of a TokenQuant key in one load (3 bits: four words apart)
    need += ("ld.global.v2.b32" if sys.argv[1] == "2" else "ld.global.v4.b32",)
if sys.argv[2] == "4" and not ts:
    need += ("ld.global.v2.b32",)  # a token's two 4-bit value words per lane in one load
if bf16:
    need += ("sub.rn.bf16x2",)  # the magic subtracted before the fma
if dynamic:
    need += ("atom.global.inc.u32", "shfl.sync.idx.b32")  # the dynamic schedule's counter draws
elif "atom.global" in ptx:
    need += ("no atomics in the static schedule",)
if out:  # outliers: q' pairs read from shared memory, value deltas stored to tiles there and read back by ldmatrix
    need += ("ld.shared.v2.f32", "st.shared.b16", "ldmatrix.sync.aligned", "mov.b32 %r", "global_smem")
print("missing:", [i for i in need if i not in ptx], "shared:", "st.shared" in ptx)
"""


@pytest.mark.parametrize("kbits,vbits,want,bf16,dynamic,tok,kg,out", [
    (2, 2, False, False, True, False, 32, 0), (4, 2, True, False, True, False, 32, 0),
    (2, 4, False, False, False, False, 32, 0), (4, 4, False, True, True, False, 32, 0),
    (2, 2, True, True, False, False, 32, 0), (2, 2, True, False, True, True, 32, 0),
    (4, 2, False, True, False, True, 128, 0), (4, 4, False, False, True, True, 128, 4),
    (2, 4, True, True, False, True, 64, 4), (3, 3, True, False, True, True, 128, 4),
    (2, 3, False, True, False, False, 32, 0), (3, 1, False, False, True, True, 128, 4),
    (2, 4, True, False, True, True, 128, 0), (4, 2, False, False, False, True, 128, 0),
    (2, 3, False, False, True, True, 128, 0), (2, 2, True, False, True, True, 128, 16),
    (3, 1, False, True, True, True, 128, 16)])
def test_gluon_kernel_builds_for_hopper(kbits, vbits, want, bf16, dynamic, tok, kg, out):
    """The Gluon kernel compiles for sm_90 on any machine (no GPU; in a subprocess, outside the interpreter): its
    layout conversions are asserted register-trivial at build time, and the PTX holds the tensor-core, movmatrix
    and pair-dequantization instructions it is built around, and no fp16 tile stored to shared memory (with
    ``out`` outlier slots per row: only its outlier buffer, checked to be the kernel's one shared allocation)."""
    import subprocess
    import sys

    pytest.importorskip("triton.experimental.gluon", reason="this Triton has no Gluon")
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    args = [str(kbits), str(vbits), "1" if want else "0", "1" if bf16 else "0", "1" if dynamic else "0",
            "1" if tok else "0", str(kg), str(out)]
    r = subprocess.run([sys.executable, "-c", _BUILD, *args], cwd=root, env=env, capture_output=True, text=True,
                       timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    assert f"missing: [] shared: {bool(out)}" in r.stdout, r.stdout


def _pair_dequant_error(bits: int, magic: int, fs: float, fb: float, s: float, z: float) -> float:
    """Worst error over the codes of the kernel's fp16 pair dequantization, emulated in numpy: the code ored into
    ``magic`` at mantissa bits ``10 - bits`` and up, prepared scale ``fp16(s fs)``, bias ``fp16(fma(s', fb, z))``,
    result ``fp16(fma(h, s', bias))``, against ``code s + z`` in float64, in units of ``2^-10 (|z| + 2^bits s)``."""
    f16 = np.float16
    sp = f16(f16(s) * f16(fs))
    b = f16(float(sp) * fb + float(f16(z)))
    worst = 0.0
    for code in range(1 << bits):
        h = np.array([magic | code << (10 - bits)], dtype=np.uint16).view(np.float16)[0]
        y = f16(float(h) * float(sp) + float(b))
        exact = code * float(f16(s)) + float(f16(z))
        worst = max(worst, abs(float(y) - exact) / (2.0 ** -10 * (abs(float(f16(z))) + 2 ** bits * float(f16(s)))))
    return worst


@pytest.mark.parametrize("bits", [2, 4])
def test_gluon_pair_dequant_precision(bits):
    """The magic / scale / bias constants of the Gluon kernel's dequantization keep fp16 precision (error within
    ``2^-10`` of the group's range ``|z| + 2^bits s``) for quantization scales from 2^-12 to 2^9; session 5's constants
    (magic 1024, prepared scale ``s 2^(bits - 10)``) fail below ``s = 2^-6`` / ``2^-8``, which this test catches."""
    pytest.importorskip("triton.experimental.gluon", reason="this Triton has no Gluon")
    from kernels import gluon_attention as ga

    magic, fs, fb = ga.dequant_constants(bits)
    assert np.array([magic], dtype=np.uint16).view(np.float16)[0] == 2.0 ** (bits + 2) and fs * fb == -(2 ** bits)
    rng = np.random.default_rng(bits)
    for e in np.linspace(-12, 8, 41):
        s = float(2.0 ** e * rng.uniform(1, 2))
        for z in (0.0, -s * rng.uniform(0, 2 ** bits), s * rng.uniform(-30, 30)):
            assert _pair_dequant_error(bits, magic, fs, fb, s, z) <= 1.0, (s, z)
    old = (0x6400, 2.0 ** (bits - 10), -1024.0)
    assert _pair_dequant_error(bits, *old, 1.37 * 2.0 ** -12, 0.0) > 2.0  # the old constants lose precision here


def _bf16_bits(x: np.ndarray) -> np.ndarray:
    """float64 -> bf16 bit patterns, rounded to nearest even (normal range)."""
    m, e = np.frexp(x)
    r = np.ldexp(np.round(np.ldexp(m, 8)), e - 8)  # 8 significant bits; np.round rounds half to even
    return (r.astype(np.float32).view(np.uint32) >> 16).astype(np.uint32)


def _bf16_val(h: np.ndarray) -> np.ndarray:
    return (h.astype(np.uint32) << 16).view(np.float32).astype(np.float64)


def _run_ptx(asm: str, regs: dict) -> dict:
    """Emulate the few PTX instructions of the kernel's dequantization strings on uint32 arrays (bf16x2 arithmetic
    exact in float64, one rounding to nearest even)."""
    def val(tok):
        tok = tok.strip()
        return regs[tok] if tok in regs else np.uint32(int(tok, 0))

    def halves(x):
        return _bf16_val(x & 0xFFFF), _bf16_val(x >> 16)

    def pack(lo, hi):
        return (_bf16_bits(lo) | _bf16_bits(hi) << 16).astype(np.uint32)

    for line in asm.replace("{", "").replace("}", "").split(";"):
        line = line.strip()
        if not line or line.startswith(".reg"):
            continue
        op, args = line.split(None, 1)
        a = [x.strip() for x in args.split(",")]
        if op == "mov.b32":
            regs[a[0]] = np.asarray(val(a[1]), dtype=np.uint32)
        elif op == "shf.l.wrap.b32":  # funnel shift of (a, b) = rotation when a == b
            x, n = np.asarray(val(a[1]), dtype=np.uint64), np.asarray(val(a[3]), dtype=np.uint64) % 32
            regs[a[0]] = ((x << n | x >> ((32 - n) % 32)) & 0xFFFFFFFF).astype(np.uint32)
        elif op == "prmt.b32":  # byte i of the result = byte (selector nibble i) of (b:a)
            x = np.asarray(val(a[1]), dtype=np.uint64) | np.asarray(val(a[2]), dtype=np.uint64) << 32
            sel = int(val(a[3]))
            regs[a[0]] = sum(((x >> (8 * ((sel >> 4 * i) & 7))) & 0xFF) << (8 * i) for i in range(4)).astype(np.uint32)
        elif op == "fma.rn.f16x2":  # exact in float64, one rounding
            x = [np.asarray(val(t), dtype=np.uint32) for t in a[1:]]
            hv = [[(xi >> (16 * k) & 0xFFFF).astype(np.uint16).view(np.float16).astype(np.float64) for k in (0, 1)]
                  for xi in x]
            out = [(hv[0][k] * hv[1][k] + hv[2][k]).astype(np.float16).view(np.uint16).astype(np.uint32)
                   for k in (0, 1)]
            regs[a[0]] = out[0] | out[1] << 16
        elif op == "lop3.b32":
            assert a[4] == "0xEA"  # (a & b) | c
            regs[a[0]] = (val(a[1]) & val(a[2])) | val(a[3])
        elif op in ("sub.rn.bf16x2", "mul.rn.bf16x2", "fma.rn.bf16x2"):
            x = [halves(np.asarray(val(t), dtype=np.uint32)) for t in a[1:]]
            f = {"sub.rn.bf16x2": lambda p, q: p - q, "mul.rn.bf16x2": lambda p, q: p * q,
                 "fma.rn.bf16x2": lambda p, q, r: p * q + r}[op]
            regs[a[0]] = pack(*(f(*(xi[k] for xi in x)) for k in (0, 1)))
        else:
            raise AssertionError(f"not emulated: {op}")
    return regs


@pytest.mark.parametrize("bits", [2, 4])
def test_gluon_pair_dequant_bf16_rounds_once(bits):
    """bf16 caches: the kernel's PTX strings (:func:`_prep_asm`, :func:`_deq_asm` for keys and values), run by a small
    emulator with the kernel's rotation for every code position, give ``code s + z`` rounded once to bf16 in both
    halves, for random words, scales from 2^-60 to 2^40 and zeros across and beyond the group's range. (The fp16
    form's bias ``z - 2^bits s``, rounded to bf16, misses by several bf16 steps: the ``sub`` of the magic matters.)"""
    pytest.importorskip("triton.experimental.gluon", reason="this Triton has no Gluon")
    from kernels import gluon_attention as ga

    rng = np.random.default_rng(10 + bits)
    n = 4000
    s = np.ldexp(rng.uniform(1, 2, (n, 2)), rng.integers(-60, 41, (n, 2)))
    z = s * rng.uniform(-30, 30, (n, 2)) * (rng.uniform(size=(n, 2)) < 0.8)
    sb, zb = _bf16_bits(s), _bf16_bits(z)
    s, z = _bf16_val(sb), _bf16_val(zb)
    words = rng.integers(0, 2 ** 32, n, dtype=np.uint64).astype(np.uint32)
    spair, zpair = (sb[:, 0] | sb[:, 1] << 16).astype(np.uint32), (zb[:, 0] | zb[:, 1] << 16).astype(np.uint32)
    prep = _run_ptx(ga._prep_asm(bits, bf16=True), {"$2": spair, "$3": zpair})
    for key in (True, False):
        asm = ga._deq_asm(bits, key, bf16=True)
        for j in range(16 // bits):
            regs = {"$1": words, "$2": words, "$3": np.uint32(ga.rotation(j, bits, True)),
                    "$4": np.uint32(ga.rotation(j, bits, True))}
            if key:  # prepared scale and bias from _prep_asm (int32 words of two channels)
                regs.update({"$5": prep["$0"], "$6": prep["$0"], "$7": prep["$1"], "$8": prep["$1"]})
            else:  # values: the kernel passes s / 4 (exact) and the zero
                regs.update({"$5": _bf16_bits(s / 4)[:, 0] | _bf16_bits(s / 4)[:, 1] << 16, "$6": zpair})
            out = _run_ptx(asm, regs)["$0"]
            for half in (0, 1):
                code = (words >> (16 * half + bits * j)) & ((1 << bits) - 1)
                want = _bf16_bits(code * s[:, half] + z[:, half])
                got = (out >> (16 * half)) & 0xFFFF
                assert np.array_equal(got, want), (key, j, half)
    biased = ga._deq_asm(bits, True, bf16=True).replace("sub.rn.bf16x2 t, t, k;", "")
    assert biased != ga._deq_asm(bits, True, bf16=True)  # the subtraction is in the kernel's string


def _prepared(bits: int, halves, bf16: bool) -> tuple:
    """The value path's prepared scale and bias registers for two halves' ``(scale, zero)``, from
    :func:`dequant_constants` as the kernel forms them (bf16: the zero itself, the magic subtracted in the asm)."""
    from kernels import gluon_attention as ga

    _, fs, fb = ga.dequant_constants(bits, bf16)
    if bf16:
        regs = [(_bf16_bits(np.array([s * fs]))[0], _bf16_bits(np.array([z]))[0]) for s, z in halves]
    else:
        f16 = np.float16
        regs = [(f16(s) * f16(fs), f16(f16(z) + f16(s) * f16(fs) * f16(fb))) for s, z in halves]
        regs = [tuple(int(np.array([v], np.float16).view(np.uint16)[0]) for v in r) for r in regs]
    return (np.uint32(regs[0][0] | regs[1][0] << 16), np.uint32(regs[0][1] | regs[1][1] << 16))


@pytest.mark.parametrize("bf16", [False, True])
def test_gluon_3bit_pairs_emulated(bf16):
    """3-bit parts on the Gluon kernel, emulated on CPU for random words (10 codes per word, 13 per row): every lane's
    fp16 (bf16) pairs, built by the scheme's Python twins of the kernel's integer steps (keys: ``spread3`` of words
    3a .. 3a+2, word 12 shifted by 3a; values: ``extra3``, then the prmt merges of the kernel's own strings) and
    dequantized by the kernel's PTX string with its rotation and ``dequant_constants``' prepared scale and bias, with
    a different scale and zero for each of a value pair's two tokens, are ``code s + z`` of the channels the layouts
    name (``tok3_key_channel``, ``v3_channel``, both permutations of the 128 channels), in both halves. (The kernel's
    own integer steps run only on the GPU, where the float64 tests check them.)"""
    pytest.importorskip("triton.experimental.gluon", reason="this Triton has no Gluon")
    from kernels import gluon_attention as ga

    rng = np.random.default_rng(33 + bf16)
    n = 64
    codes = rng.integers(0, 8, (2, n, 128))
    words = ref.pack(torch.from_numpy(codes), 3).numpy().astype(np.int64).astype(np.uint32)  # [2 tokens, n, 13]
    assert words.shape == (2, n, 13)
    mant = 7 if bf16 else 10
    deq = ga._deq_asm(3, False, bf16)
    sz = ((0.5, -3.0), (2.0, 5.0))  # (scale, zero) of the pair's two halves: exact results in fp16 and bf16

    def dequant(x, pos, halves=sz):
        sc, zr = _prepared(3, halves, bf16)
        out = _run_ptx(deq, {"$1": x, "$2": x, "$3": np.uint32((mant - 3 - pos) % 32),
                             "$4": np.uint32((mant - 3 - pos) % 32), "$5": sc, "$6": zr})["$0"]
        got = [(out >> (16 * k) & 0xFFFF) for k in (0, 1)]
        if bf16:
            got = [_bf16_val(h) for h in got]
        else:
            got = [h.astype(np.uint16).view(np.float16).astype(np.float64) for h in got]
        return [(h - z) / s for h, (s, z) in zip(got, halves, strict=True)]  # back to codes

    keys = [ga.tok_key_channel(k, 3) for k in range(128)]
    assert sorted(keys) == list(range(128))
    w = words[0]
    for a in range(4):
        x12 = w[:, 12] >> np.uint32(3 * a)
        x12 = (x12 & 0xFFFF) | ((x12 << np.uint32(4)) & 0xFFFF0000)
        for f in range(16):
            x = np.array([ga.spread3(int(v)) for v in w[:, 3 * a + f // 5]], dtype=np.uint32) if f < 15 else x12
            lo, hi = dequant(x, 3 * (f % 5) if f < 15 else 0, (sz[0], sz[0]))  # keys: one token per pair
            for e, half in ((0, lo), (1, hi)):
                assert np.array_equal(half, codes[0, :, keys[8 * f + 2 * a + e]]), (a, f, e)
    chans = [ga.v3_channel(t, r) for t in range(16) for r in range(8)]
    assert sorted(chans) == list(range(128))
    assert [ga.out_row(c, 3) for c in chans] == list(range(128))  # the value outliers' rows
    assert ga.out_row(torch.tensor(chans), 3).tolist() == list(range(128))
    for r in range(8):
        wn = [np.array([ga.extra3(int(u), int(v), r) for u, v in zip(words[e, :, 8 + r // 2], words[e, :, 12],
                                                                        strict=True)], dtype=np.uint32)
              for e in (0, 1)]
        merged = {}
        for name, src in (("", [words[0, :, r], words[1, :, r]]), ("n", wn)):
            m = _run_ptx(ga._merge_asm(), {"$2": src[0], "$3": src[1]})
            merged[name + "lo"], merged[name + "hi"] = m["$0"], m["$1"]
            merged[name + "mid"] = _run_ptx(ga.MERGE_MID.value if hasattr(ga.MERGE_MID, "value") else ga.MERGE_MID,
                                            {"$2": src[0], "$3": src[1]})["$0"]
        for t in range(16):
            name, pos = ga.v3_source(t)
            lo, hi = dequant(merged[name], pos)
            c = ga.v3_channel(t, r)
            assert np.array_equal(lo, codes[0, :, c]) and np.array_equal(hi, codes[1, :, c]), (r, t)


@pytest.mark.parametrize("bf16", [False, True])
def test_gluon_1bit_values_emulated(bf16):
    """1-bit values on the Gluon kernel, emulated on CPU: lane row ``r``'s two tokens' words (word ``r // 2``) merged
    by the kernel's ``prmt`` with its per-lane selector (low halves for even ``r``, high halves for odd) and
    dequantized by its PTX string with rotation ``rotation(t, 1)`` and ``dequant_constants``' prepared scale and bias
    give ``code s + z`` of channel ``16 r + t`` for both tokens, each with its own scale and zero (the 2/4-bit output
    order, so the output rows and outlier slots need nothing of their own)."""
    pytest.importorskip("triton.experimental.gluon", reason="this Triton has no Gluon")
    from kernels import gluon_attention as ga

    rng = np.random.default_rng(44 + bf16)
    codes = rng.integers(0, 2, (2, 64, 128))
    words = ref.pack(torch.from_numpy(codes), 1).numpy().astype(np.int64).astype(np.uint32)  # [2, 64, 4]
    halves = ((0.5, -3.0), (2.0, 5.0))  # each token's (scale, zero): exact results in fp16 and bf16
    sc, zr = _prepared(1, halves, bf16)
    sel = ga.MERGE_SEL.value if hasattr(ga.MERGE_SEL, "value") else ga.MERGE_SEL
    for r in range(8):
        x = _run_ptx(sel, {"$2": words[0, :, r // 2], "$3": words[1, :, r // 2],
                           "$4": np.uint32(0x5410 if r % 2 == 0 else 0x7632)})["$0"]
        for t in range(16):
            rot = np.uint32(ga.rotation(t, 1, bf16))
            out = _run_ptx(ga._deq_asm(1, False, bf16), {"$1": x, "$2": x, "$3": rot, "$4": rot, "$5": sc, "$6": zr})
            for e, (s_, z_) in enumerate(halves):
                h = out["$0"] >> (16 * e) & 0xFFFF
                got = _bf16_val(h) if bf16 else h.astype(np.uint16).view(np.float16).astype(np.float64)
                assert np.array_equal(got, codes[e, :, 16 * r + t] * s_ + z_), (r, t, e)


def _apply_bases(bases: list, o: int) -> tuple:
    """A linear layout's coordinates of offset ``o`` (XOR of the bases of its set bits)."""
    c = [0] * len(bases[0])
    for k, b in enumerate(bases):
        if o >> k & 1:
            c = [x ^ y for x, y in zip(c, b)]
    return tuple(c)


@pytest.mark.parametrize("bits", [2, 3, 4])
def test_gluon_raw_codes_emulated(bits):
    """The raw paths' premise, emulated bit for bit: for every code position ``j`` of a 16-bit half (3 bits: of a
    spread word, codes ``j`` and ``j + 5``), masking the word (or the word shifted by ``bits * raw_in_place``) with
    the code's mask at ``raw_pos(j)`` in both halves gives the fp16 subnormals ``code x 2^(pos - 24)`` exactly,
    whatever the other codes hold (int32 words, shifted arithmetically as the kernel does); times the query factor
    ``raw_qfac(j)`` every position reads ``code x 2^(RAW_EXP - 24)``; and the factors stay within ``[2^-6, 4]`` (no
    scaled fp16 query overflows)."""
    pytest.importorskip("triton.experimental.gluon", reason="this Triton has no Gluon")
    from kernels import gluon_attention as ga

    g = np.random.default_rng(bits)
    per_half = 5 if bits == 3 else 16 // bits
    nin = ga.raw_in_place(bits)
    exp = ga.RAW_EXP.value if hasattr(ga.RAW_EXP, "value") else ga.RAW_EXP
    for j in range(per_half):
        pos = ga.raw_pos(j, bits)
        assert 0 <= pos and pos + bits <= 10  # below the exponent: a subnormal
        assert 2.0 ** -6 <= ga.raw_qfac(j, bits) <= 4 and ga.raw_qfac(j, bits) * 2.0 ** pos == 2.0 ** exp
        mask = ((1 << bits) - 1) << pos
        for _ in range(50):
            halves = [int(x) for x in g.integers(0, 1 << 15, 2)]  # random codes everywhere (bit 15 unused at 3 bits)
            if bits != 3:
                halves = [int(x) for x in g.integers(0, 1 << 16, 2)]
            word = np.array([halves[0] | halves[1] << 16], dtype=np.uint32).view(np.int32)  # int32, as in the kernel
            shifted = word if j < nin else word >> (bits * nin)  # arithmetic: sign bits must fall outside the masks
            reg = int((shifted & np.int32(mask | mask << 16)).view(np.uint32)[0])
            got = np.array([reg & 0xFFFF, reg >> 16], dtype=np.uint16).view(np.float16).astype(np.float64)
            codes = [(h >> (bits * j)) & ((1 << bits) - 1) for h in halves]
            assert got.tolist() == [c * 2.0 ** (pos - 24) for c in codes]


def test_gluon_raw_3bit_values_emulated():
    """Raw 3-bit values, emulated bit for bit from two tokens' packed rows (10 codes per word, 13 words): for every
    lane row ``r`` and code row ``t``, the merged word the kernel reads (:func:`v3_source`: low, middle or high
    halves of word ``r``, or of the extra word :func:`extra3`), shifted by 8 where the code sits above bit 7, masked
    at :func:`raw_vpos` in both halves, gives the fp16 subnormals ``code x 2^(pos - 24)`` of channel
    ``v3_channel(t, r)`` of each token, whatever the other codes hold."""
    pytest.importorskip("triton.experimental.gluon", reason="this Triton has no Gluon")
    from kernels import gluon_attention as ga

    g = np.random.default_rng(33)
    for _ in range(20):
        codes = g.integers(0, 8, (2, 128))
        words = [[sum(int(codes[k, c]) << (3 * (c % 10)) for c in range(10 * w, min(10 * w + 10, 128)))
                  for w in range(13)] for k in range(2)]
        for r in range(8):
            a, b = words[0][r], words[1][r]
            ea, eb = (ga.extra3(w[8 + r // 2], w[12], r) for w in words)
            src = {"lo": (a & 0xFFFF) | (b & 0xFFFF) << 16, "hi": a >> 16 | (b & 0xFFFF0000),
                   "mid": (a >> 8) & 0xFFFF | ((b >> 8) & 0xFFFF) << 16,
                   "nlo": (ea & 0xFFFF) | (eb & 0xFFFF) << 16, "nhi": (ea >> 16) & 0xFFFF | (eb & 0xFFFF0000)}
            for t in range(16):
                name, bit = ga.v3_source(t)
                pos = int(ga.raw_vpos(8 * t + r, 3))
                assert pos == (bit - 8 if bit > 7 else bit) and pos + 3 <= 10
                x = np.array([src[name]], dtype=np.uint32).view(np.int32)
                x = x >> 8 if bit > 7 else x  # arithmetic, as in the kernel
                reg = int((x & np.int32((7 << pos) | (7 << pos) << 16)).view(np.uint32)[0])
                got = np.array([reg & 0xFFFF, reg >> 16], dtype=np.uint16).view(np.float16).astype(np.float64)
                c = ga.v3_channel(t, r)
                assert got.tolist() == [codes[0, c] * 2.0 ** (pos - 24), codes[1, c] * 2.0 ** (pos - 24)], (r, t)


@pytest.mark.parametrize("kg", [16, 32, 64, 128])
def test_gluon_key_staging_layouts(kg):
    """The two shared-memory views of a staged 2-bit key tile agree: the word each lane reads for (run r, channel
    8f + 2a + e) is the tile's global word for tokens 16 r of that channel (blocks [b, 128 channels, kg / 16 words]);
    16-byte copies stay contiguous, and one read instruction touches at least 16 banks (lanes r, a)."""
    pytest.importorskip("triton.experimental.gluon", reason="this Triton has no Gluon")
    from kernels import gluon_attention as ga

    flat, read = ga._key_word_maps(kg)
    wpb = kg // 16
    seen = set()
    for o in range(1024):
        (g,) = _apply_bases(flat, o)
        r, f, a, e = _apply_bases(read, o)
        b, j = divmod(r, wpb)
        assert g == (b * 128 + 8 * f + 2 * a + e) * wpb + j
        seen.add(g)
        if o % 4:  # a 16-byte copy: 4 consecutive offsets hold 4 consecutive words
            assert g == _apply_bases(flat, o - 1)[0] + 1
    assert len(seen) == 1024
    where = {_apply_bases(read, o): o for o in range(1024)}
    for f in range(16):
        for e in range(2):
            assert len({where[(r, f, a, e)] % 32 for r in range(8) for a in range(4)}) >= 16
    mflat, mread = ga._key_meta_maps()
    for o in range(512):
        r, p = _apply_bases(mflat, o)
        assert _apply_bases(mread, o) == (r, p // 4, p % 4)
        if o % 4:
            r0, p0 = _apply_bases(mflat, o - 1)
            assert (r, p) == (r0, p0 + 1)
    mwhere = {_apply_bases(mread, o): o for o in range(512)}
    for f in range(16):
        assert len({mwhere[(r, f, a)] % 32 for r in range(8) for a in range(4)}) == 32


@pytest.mark.parametrize("kg,ng", [(32, 4), (64, 2), (128, 4)])
def test_gluon_half_stage_layouts(kg, ng):
    """The shared-memory views of a half tile staged for raw ChannelQuant keys (``_hs_layouts``) agree with the
    copies: each read coordinate is the element the copy wrote there (key words of lane rows ``2 u``, ``2 u + 1``,
    the scale pairs of lane rows ``4 b ..``, each chunk's value words and fp16 scales); 16-byte copies stay
    contiguous, and every read instruction's distinct elements lie in distinct banks."""
    pytest.importorskip("triton.experimental.gluon", reason="this Triton has no Gluon")
    from kernels import gluon_attention as ga

    (kf, kr), (mf, mr), (vf, vr), (sf, sr) = ga._hs_layouts(kg, ng)

    def check(flat, read, n, want, lanes, width=1):
        where = {}
        for o in range(n):
            (g,) = _apply_bases(flat, o) if width == 1 else (_apply_bases(flat, o)[0],)
            c = _apply_bases(read, o)
            assert g == want(c), (o, g, c)
            where[c] = o
            if o % 4 and width == 1:
                assert g == _apply_bases(flat, o - 1)[0] + 1
        for group in lanes(where):
            words = {where[c] for c in group}
            assert len({w % 32 for w in words}) == len(words)

    def kword(c):
        u, f, a, e = c
        ch = 8 * f + 2 * a + e
        return (u // 2) * 256 + 2 * ch + u % 2 if kg == 32 else 4 * ch + u

    check(kf, kr, 512, kword, lambda w: [[(r // 2, f, a, e) for r in range(8) for a in range(4)]
                                         for f in range(16) for e in range(2)])
    meta = {}
    for o in range(128):
        b, p = _apply_bases(mf, o)
        assert _apply_bases(mr, o) == (b, p // 4, p % 4)
        meta[(b, p // 4, p % 4)] = o
    for f in range(16):
        assert len({meta[(r // 4, f, a)] % 32 for r in range(8) for a in range(4)}) == 8
    vwhere = {}
    for o in range(512):
        r, h, a, e = _apply_bases(vr, o % 128)
        assert _apply_bases(vf, o)[0] == 8 * (16 * a + 8 * e + h + 2 * (o // 128)) + r
        if o % 4:
            assert _apply_bases(vf, o)[0] == _apply_bases(vf, o - 1)[0] + 1
        vwhere[(o // 128, r, h, a, e)] = o
    for i in range(4):
        for h in range(2):
            for e in range(2):
                assert len({vwhere[(i, r, h, a, e)] % 32 for r in range(8) for a in range(4)}) == 32
    swhere = {}
    per = 16 * ng  # fp16 per chunk
    for p16 in range(64 * ng):
        word = _apply_bases(sf, p16 >> 1)[0]
        g, h, a, e = _apply_bases(sr, p16 % per)
        assert 2 * word + (p16 & 1) == ng * (16 * a + 8 * e + h + 2 * (p16 // per)) + g
        swhere[(p16 // per, g, h, a, e)] = p16 >> 1
    for i in range(4):
        for h in range(2):
            for e in range(2):
                words = {swhere[(i, (16 * r) // (128 // ng), h, a, e)] for r in range(8) for a in range(4)}
                assert len({w % 32 for w in words}) == len(words)


@pytest.mark.parametrize("kb,vb", [(2, 2), (4, 4), (2, 4), (4, 2)])
def test_gluon_row_stage_layouts(kb, vb):
    """The shared-memory views of a half tile of rows (``_ts_layouts``: QAQ's rows staged) agree with the copies: each
    chunk's read coordinate is the element the copy of the parts' own order wrote there (key words of row ``8 r + h +
    2 i``, the row scales as fp16 score rows ``8 (m % 8) + m // 8 + 2 i`` and as ``[2 h, 8 r]``, value words of row
    ``16 a + 8 e + h + 2 i``); 16-byte copies stay contiguous, and the lanes of each phase of a read instruction (8,
    16 or 32 lanes for 16-, 8- or 4-byte reads) hit distinct banks."""
    pytest.importorskip("triton.experimental.gluon", reason="this Triton has no Gluon")
    from kernels import gluon_attention as ga

    (kf, kr), (mf, mr), (vf, vr) = ga._ts_layouts(kb, vb)
    tsc = ga._ts_layout(kb, vb, 3, True).offset_bases

    def check(flat, read, n, want, insts, width):
        per = 1 << len(read)
        where = {}
        for o in range(n):
            (g,) = _apply_bases(flat, o)
            c = (o // per,) + _apply_bases(read, o % per)
            assert g == want(c), (o, g, c)
            where[c] = o
            if o % 4:
                assert g == _apply_bases(flat, o - 1)[0] + 1
        assert len(where) == n
        for lanes in insts:  # one read instruction: [lane][its vector's elements], lane = 4 r + a
            for p in range(0, 32, 32 // width):
                words = [where[c] for lane in lanes[p:p + 32 // width] for c in lane]
                assert len({w % 32 for w in words}) == len(words), (lanes[0], words)

    check(kf, kr, 256 * kb, lambda c: (8 * c[2] + c[1] + 2 * c[0]) * 4 * kb + kb * c[4] + c[3],
          [[[(i, h, r, w, a) for w in range(kb)] for r in range(8) for a in range(4)]
           for i in range(4) for h in range(2)], kb)
    nv = vb // 2

    def vwant(c):
        i, r, h, a, e = c[:5]
        return 4 * vb * (16 * a + 8 * e + h + 2 * i) + nv * r + (c[5] if nv > 1 else 0)

    check(vf, vr, 256 * vb, vwant, [[[(i, r, h, a, e) + ((w,) if nv > 1 else ()) for w in range(nv)]
                                     for r in range(8) for a in range(4)]
                                    for i in range(4) for h in range(2) for e in range(2)], nv)
    if vb == 2:
        assert (vf, vr) == ga._hs_layouts(32, 2)[2]
    for p16 in range(64):  # a stage's fp16 rows: word k holds rows 2 k, 2 k + 1
        i, q = p16 // 16, p16 % 16
        row = 2 * _apply_bases(mf, p16 >> 1)[0] + (p16 & 1)
        (m,) = _apply_bases(mr, q)
        assert row == 8 * (m % 8) + m // 8 + 2 * i, (p16, row, m)
        h, r = _apply_bases(tsc, q)
        assert row == 8 * r + h + 2 * i
    for i in range(4):  # a chunk's scale read: lane row r holds score rows r and r + 8, one word, own bank
        where = {}
        for q in range(16):
            (m,) = _apply_bases(mr, q)
            where.setdefault(m % 8, set()).add((16 * i + q) >> 1)
        assert len(where) == 8 and all(len(w) == 1 for w in where.values())
        assert len({min(w) % 32 for w in where.values()}) == 8


def test_gluon_staged_rows_gate():
    """Staged rows need what their copies need: the words 16-byte aligned, the row scales and zeros 4-byte aligned
    (copied as words of two rows), every head's first key and value rows of one parity; and the formats of
    :func:`staged_rows` (2/4 bits, one scale per row, raw values, no outliers)."""
    pytest.importorskip("triton.experimental.gluon", reason="this Triton has no Gluon")
    from types import SimpleNamespace as NS

    from kernels import gluon_attention as ga

    words = torch.zeros(64, dtype=torch.int32)
    halves = torch.zeros(66, dtype=torch.float16)
    part = NS(data=words, scale=halves[:64], zero=halves[2:], bits=2)
    assert ga.rows_stageable(NS(k=part, v=part, kv_parity=True))
    assert not ga.rows_stageable(NS(k=part, v=part, kv_parity=False))
    odd = NS(data=words, scale=halves[1:65], zero=halves[2:], bits=2)  # a scale view at an odd fp16 offset
    assert not ga.rows_stageable(NS(k=part, v=odd, kv_parity=True))
    shifted = NS(data=torch.zeros(68, dtype=torch.int32)[1:], scale=halves[:64], zero=halves[2:], bits=2)
    assert not ga.rows_stageable(NS(k=shifted, v=part, kv_parity=True))
    if ga.TSTAGE and ga.RAW_V:
        assert ga.staged_rows(2, 128, True, 4, 128, False, 0, 0) and ga.staged_rows(4, 128, True, 2, 128, False, 0, 0)
    for args in [(3, 128, True, 3, 128, False, 0, 0), (2, 32, True, 2, 128, False, 0, 0), (2, 128, False, 2, 128,
                 False, 0, 0), (2, 128, True, 2, 128, True, 0, 0), (2, 128, True, 2, 128, False, 2, 0),
                 (2, 128, True, 2, 128, False, 0, 2), (2, 128, True, 3, 128, False, 0, 0)]:
        assert not ga.staged_rows(*args), args


@pytest.mark.parametrize("bits", [2, 4])
def test_gluon_tokenquant_key_channels(bits):
    """The channel order of TokenQuant keys in the Gluon kernel (the queries are loaded in it): a permutation of the
    128 channels; lane ``a`` (``k // 2 % 4``) holds only its own 32 channels (one 32-channel scale group); and the two
    halves of each fp16 pair (``k``, ``k + 1``) are codes ``j`` and ``j + HALF`` of one word, which sit 16 bits
    apart, so that one rotation by ``rotation(j)`` brings both to their half's top mantissa bits."""
    pytest.importorskip("triton.experimental.gluon", reason="this Triton has no Gluon")
    from kernels import gluon_attention as ga

    per = 32 // bits
    ch = [ga.tok_key_channel(k, bits) for k in range(128)]
    assert sorted(ch) == list(range(128))
    for k in range(0, 128, 2):
        lo, hi = ch[k], ch[k + 1]
        assert lo // 32 == hi // 32 == (k // 2) % 4
        assert lo // per == hi // per and (hi % per) * bits - (lo % per) * bits == 16
        rot = ga.rotation(lo % per, bits)
        for pos, top in ((lo % per) * bits, 10), ((hi % per) * bits, 26):
            assert (pos + rot) % 32 == top - bits
    # the kernel's layout agrees: every register / lane of the 6-D key layout is the A fragment's element (h, r, f, a,
    # e) of K5 with f = HALF w + j, and the code it dequantizes (word NW a + w of the token, code j + HALF e) is the
    # channel the queries are loaded at for that reduction index
    half, nw = per // 2, 32 // per
    k6, k5 = ga._tok_key_layout(per), ga.K5.value if hasattr(ga.K5, "value") else ga.K5

    def coords(layout, reg, lane, n):
        c = [0] * n
        for bases, idx in ((layout.reg_bases, reg), (layout.lane_bases, lane)):
            for b, base in enumerate(bases):
                if idx >> b & 1:
                    c = [x ^ y for x, y in zip(c, base, strict=True)]
        return c

    for reg in range(1 << len(k6.reg_bases)):
        for lane in range(32):
            h, r, w, j, a, e = coords(k6, reg, lane, 6)
            assert coords(k5, reg, lane, 5) == [h, r, half * w + j, a, e]
            assert ga.tok_key_channel(8 * (half * w + j) + 2 * a + e, bits) == per * (nw * a + w) + j + half * e


def test_gluon_argument_lists_match_the_kernel():
    """The warmup build that counts registers and every launch pass exactly the kernel's runtime parameters (a
    stale argument would make every Gluon launch fail and fall back to the Triton kernel, which only GPU runs
    notice)."""
    from types import SimpleNamespace as NS

    gl_mod = pytest.importorskip("kernels.gluon_attention")
    t = torch.zeros(4, dtype=torch.int32)
    part = NS(data=t, scale=torch.zeros(4, dtype=F16), zero=torch.zeros(4, dtype=F16), nrows=4, has_out=False,
              bits=2, group=128)
    plan = NS(k=part, v=part, meta=None, scalars=(0,) * 6, col_base=0, newr=0, nsplit=2, counters=None)
    q = torch.zeros(2, 4, 128, dtype=F16)
    names = gl_mod._kivi_attn_kernel.arg_names
    const = {p.name for p in gl_mod._kivi_attn_kernel.params if p.is_constexpr}
    runtime = [n for n in names if n not in const]
    assert len(gl_mod._warmup_args(plan)) == len(runtime)
    assert len(gl_mod._launch_args(q, plan, t, t, None, 0, 2, 1.0, 1)) == len(runtime)


def test_value_exponents_are_computed_before_the_first_launch(monkeypatch):
    """Every Gluon launch of a call gets its value part's exponent (a device scalar, :mod:`kernels.value_exponent`)
    from :func:`~kernels.gluon_attention.prepare`, which computes them all before the first launch: a chain's later
    launches must read nothing that the chain computes, and a captured call computes them ahead of its launches. Pairs
    without the raw value path get None (the launch passes the lse buffer). The launches are recorded, not run (CPU)."""
    ga = pytest.importorskip("kernels.gluon_attention", reason="this Triton has no Gluon")
    from kernels import triton_attention as ta

    events = []
    of = ga.value_exponent_of
    monkeypatch.setattr(ga, "value_exponent_of", lambda *a: (events.append("E"), of(*a))[1])
    monkeypatch.setattr(ga, "supports", lambda plan, q: True)
    monkeypatch.setattr(ga, "launch", lambda *a, ve=None, **k: events.append(("launch", a[1], ve)))
    monkeypatch.setattr(ta, "merge_splits", lambda o, lse, *a: (o, lse))
    g = _gen(32)
    counts, d = (64, 40), 128
    plans = []
    for vbits, vg in ((2, 128), (2, 32), (4, 128)):  # raw values, pairs (groups of 32), raw values
        k_part = _make("T", counts, d, 2, 128, torch.float16, g, 0)
        v_part = _make("T", counts, d, vbits, vg, torch.float16, g, 0)
        plans.append(dispatch.make_plan(k_part, v_part, [0, 0], list(counts), DEV))
    q = _randn(2, 4, d, g=g, dtype=torch.float16)
    ta.attend_pairs(q, plans, d ** -0.5)
    launches = [e for e in events if e != "E"]
    assert events[:2] == ["E", "E"] and len(launches) == 3 and events[2:] == launches
    assert [e[1] for e in launches] == plans
    for (_, p, ve), raw in zip(launches, (True, False, True), strict=True):
        if raw:
            want = 15 - math.frexp(float(p.v.scale.float().abs().max()))[1]
            assert ve is ga.value_exponent(p.v) and float(ve) == want  # the cached tensor, the part's E
        else:
            assert ve is None and ga.value_exponent(p.v) is None
    events.clear()
    ta.attend_pairs(q, plans, d ** -0.5)  # cached on the parts: no exponent computed again
    assert "E" not in events and len(events) == 3


@pytest.mark.parametrize("what,msg,kfmt,group,seed", [
    ("launch", "no such layout", "C", 32, 31),  # the launch (KIVI's pair)
    ("value_exponent_of", "no exponent kernel", "T", 128, 33),  # its preparation (raw values: an exponent)
])
def test_gluon_failure_falls_back_to_triton(what, msg, kfmt, group, seed, monkeypatch):
    """A Triton release that cannot build the Gluon kernel, at the launch or at what is computed before the launches
    (:func:`~kernels.gluon_attention.prepare`, the value exponents): the first call warns, switches it off for the
    process and the Triton kernel answers (correctly) instead."""
    ga = pytest.importorskip("kernels.gluon_attention", reason="this Triton has no Gluon")
    from kernels import triton_attention as ta

    monkeypatch.setattr(ga, "ENABLED", True)
    monkeypatch.setattr(ga, "supports", lambda plan, q: ga.ENABLED)

    def boom(*a, **k):
        raise RuntimeError(msg)

    monkeypatch.setattr(ga, what, boom)
    g = _gen(seed)
    counts, d = (64, 96), 128
    k_part = _make(kfmt, counts, d, 2, group, torch.float16, g, 0)
    v_part = _make("T", counts, d, 2, group, torch.float16, g, 0)
    q = _randn(2, 4, d, g=g, dtype=torch.float16)
    o64, _, _ = _ref64(q, k_part, v_part, d ** -0.5, [3, 0], [60, 96])
    plan = dispatch.make_plan(k_part, v_part, [3, 0], [60, 96], DEV)
    with pytest.warns(UserWarning, match=f"Gluon decode kernel disabled.*{msg}"):
        out, _ = ta.attend_pairs(q, [plan], d ** -0.5)
    assert not ga.ENABLED and relerr(out, o64) < TOL[torch.float16]
