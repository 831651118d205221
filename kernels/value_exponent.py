"""The exponent ``E`` by which the Gluon kernel's raw value path scales the probabilities, on the part's device.

``E`` (see :func:`kernels.gluon_attention.value_exponent`) follows from the largest value scale ``s`` and, for parts
with value outliers, the largest delta ``d``: with ``x = m 2^e`` (``1/2 <= m < 1``, ``frexp``), ``E = 15 - e(s)``
so that ``2^15 <= 2^E s < 2^16``, lowered to ``31 - e(d)`` where the deltas need it, 0 when neither is a positive
finite number, at most 60. :func:`exponent` computes it where the part lives: on a GPU by two or three reductions and
one one-program kernel into a float32 device scalar, so a decode step that builds a new part (MiKV moves rows into
its low-precision part every step) waits for nothing; :func:`exponent_host` is the same rule on host numbers (the
reference, and the path for CPU tensors).
"""

from __future__ import annotations

import math
import os

import torch
import triton
import triton.language as tl

from kernels import fast_launch

E_MAX = 60  # p 2^E and l stay finite in float32
_E_MAX = tl.constexpr(E_MAX)  # (a kernel reads only constexpr globals)


def exponent_host(smax: float, dmax: float) -> int:
    """``E`` from the largest value scale and the largest outlier delta (absolute values; 0 where there are none)."""
    e = 15 - math.frexp(smax)[1] if smax > 0 and math.isfinite(smax) else None  # smax = m 2^x, 1/2 <= m < 1
    if dmax > 0 and math.isfinite(dmax):  # no scale to go by (all 0): the deltas' bound alone, not deep subnormals
        cap = 31 - math.frexp(dmax)[1]
        e = cap if e is None else min(e, cap)
    return 0 if e is None else min(e, E_MAX)


@triton.jit
def _frexp_exponent(x):
    """``(ok, e)`` for ``x >= 0``: ``x = m 2^e`` with ``1/2 <= m < 1``; ``ok`` when ``x`` is positive and finite.
    From the bits alone (float32 subnormals included: their mantissa as an integer is an exact normal float)."""
    b = x.to(tl.int32, bitcast=True)
    biased = (b >> 23) & 0xFF
    sub = ((b & 0x7FFFFF).to(tl.float32).to(tl.int32, bitcast=True) >> 23) & 0xFF  # m 2^-149, m < 2^23
    return (b > 0) & (biased != 255), tl.where(biased == 0, sub - 126 - 149, biased - 126)


@triton.jit
def _load_abs(lo, hi, BF16: tl.constexpr):
    """max(|lo|, |hi|) as float32; bf16 from its bits (exact for subnormals, which the interpreter's conversion
    flushes)."""
    if BF16:
        a = ((tl.load(lo).to(tl.int32) & 0xFFFF) << 16).to(tl.float32, bitcast=True)
        b = ((tl.load(hi).to(tl.int32) & 0xFFFF) << 16).to(tl.float32, bitcast=True)
    else:
        a = tl.load(lo).to(tl.float32)
        b = tl.load(hi).to(tl.float32)
    return tl.maximum(tl.abs(a), tl.abs(b))


@triton.jit
def _exponent_kernel(s_lo, s_hi, d_lo, d_hi, out_ptr, HAS_S: tl.constexpr, HAS_D: tl.constexpr,
                     S_BF16: tl.constexpr, D_BF16: tl.constexpr):
    big = 1 << 20
    e = big
    if HAS_S:
        ok, x = _frexp_exponent(_load_abs(s_lo, s_hi, S_BF16))
        e = tl.where(ok, 15 - x, big)
    if HAS_D:
        ok, x = _frexp_exponent(_load_abs(d_lo, d_hi, D_BF16))
        e = tl.where(ok, tl.minimum(e, 31 - x), e)
    e = tl.where(e == big, 0, tl.minimum(e, _E_MAX))
    tl.store(out_ptr, e.to(tl.float32))


def compile_offline(arch: int = 90):
    """Build :func:`_exponent_kernel` for an NVIDIA target without a GPU (how CI checks that it compiles: the
    interpreter accepts what the compiler refuses, such as a global that is not a ``constexpr``)."""
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    sig = dict(s_lo="*fp16", s_hi="*fp16", d_lo="*fp32", d_hi="*fp32", out_ptr="*fp32", HAS_S="constexpr",
               HAS_D="constexpr", S_BF16="constexpr", D_BF16="constexpr")
    const = dict(HAS_S=True, HAS_D=True, S_BF16=False, D_BF16=False)
    return triton.compile(ASTSource(_exponent_kernel, sig, const), target=GPUTarget("cuda", arch, 32))


def _minmax(x: torch.Tensor | None, out: torch.Tensor) -> tuple:
    """``aminmax`` of ``x`` (bf16 results as their int16 bits, see :func:`_load_abs`), or ``out`` twice."""
    if x is None:
        return out, out
    lo, hi = torch.aminmax(x)
    return (lo.view(torch.int16), hi.view(torch.int16)) if x.dtype == torch.bfloat16 else (lo, hi)


def exponent(scale: torch.Tensor, delta: torch.Tensor | None) -> torch.Tensor:
    """``E`` of a part with value scales ``scale`` and outlier deltas ``delta`` (or None) as a float32 tensor of one
    element on their device. CUDA tensors (and any under Triton's interpreter): no host sync (``aminmax`` of each,
    then :func:`_exponent_kernel`); CPU tensors otherwise: :func:`exponent_host`."""
    has_s = scale.numel() > 0
    has_d = delta is not None and delta.numel() > 0
    if not (scale.is_cuda or os.environ.get("TRITON_INTERPRET") == "1"):
        smax = float(scale.float().abs().max()) if has_s else 0.0
        dmax = float(delta.float().abs().max()) if has_d else 0.0
        return torch.tensor([float(exponent_host(smax, dmax))], dtype=torch.float32)
    out = torch.empty(1, dtype=torch.float32, device=scale.device)
    delta = delta.to(scale.device) if has_d else None
    s, d = _minmax(scale if has_s else None, out), _minmax(delta, out)
    fast_launch.launch(_exponent_kernel, (1,), (*s, *d, out),
                       dict(HAS_S=has_s, HAS_D=has_d, S_BF16=scale.dtype == torch.bfloat16,
                            D_BF16=has_d and delta.dtype == torch.bfloat16))
    return out
