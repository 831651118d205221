"""QAQ's quantizer, outlier rule and bit-allocation bounds (METHODS.md §1.3-§1.5), on groups ``g [G, N]``.

Everything here works on a batch of ``G`` groups of ``N`` elements each, one bit width per group, in the dtype of
the cached rows (the reference runs in fp16; our fp32 test caches run in fp32):

* :func:`outlier_mask`: per-group ``kthvalue`` thresholds, lower bound inclusive, upper exclusive (§1.3).
* :func:`key_bound`, :func:`value_bound`, :func:`bits_from_bound`: the code's bit formula (§1.4).
* :func:`quantize_groups`: codes, affine ``(scale, zero)`` and the reference's own dequantized output (§1.5), for the
  ``faithful`` (mean-centred, clamped) or ``fixed`` (asymmetric min/scale) grid.
* :func:`pack_rows`: rows of codes -> a :class:`~methods.formats.TokenQuant` part (group = head_dim).

Faithful grid as an affine map: ``x_hat = q*s + mu`` with ``q in [-2^(n-1), 2^(n-1)-1]`` equals
``code*scale + zero`` with ``code = q + 2^(n-1)``, ``scale = s``, ``zero = mu - 2^(n-1)*s``. Codes are identical to
the reference; the packed dequantization differs from the reference's ``fl(fl(q*s) + mu)`` only by float rounding of
that affine rewrite (exact on the §1.10 golden values). 0 bits: every element is ``mu - R/2`` (stored as ``zero``).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from kernels import reference as ref
from methods.formats import TokenQuant

DENSE = 16  # bucket key / logical bit width of rows kept dense


def container_bits(bits: int) -> int:
    """Packed width that holds ``bits``-bit codes: 0-4 and 8 as is, 5-7 in the 8-bit container, 16 = dense."""
    if bits in (0, 1, 2, 3, 4, 8, DENSE):
        return bits
    if 5 <= bits <= 7:
        return 8
    raise ValueError(f"qaq: unsupported bit width {bits}")


def outlier_mask(g: torch.Tensor, ratio: float) -> torch.Tensor:
    """Outliers of each group (row) of ``g [G, N]``: ``x <= kth(ceil(r/2 N))`` or ``x > kth(floor((1-r/2) N))``."""
    G, N = g.shape
    if ratio <= 0 or N == 0:
        return torch.zeros_like(g, dtype=torch.bool)
    k_lo = max(1, math.ceil(ratio / 2 * N))
    k_hi = min(N, max(1, math.floor((1 - ratio / 2) * N)))
    x = g.float()  # kthvalue and comparisons are exact in float32 for fp16/bf16/fp32 inputs
    lo = torch.kthvalue(x, k_lo, dim=-1).values.unsqueeze(-1)
    hi = torch.kthvalue(x, k_hi, dim=-1).values.unsqueeze(-1)
    return (x <= lo) | (x > hi)


def group_stats(g: torch.Tensor, out: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Mean, min and max of the non-outliers of each group, in ``g.dtype`` (mean accumulated in float32)."""
    keep = ~out
    x = g.float()
    cnt = keep.sum(-1).clamp(min=1)
    mu = torch.where(keep, x, 0.0).sum(-1) / cnt
    mn = torch.where(keep, x, math.inf).amin(-1)
    mx = torch.where(keep, x, -math.inf).amax(-1)
    empty = ~keep.any(-1)  # every element an outlier (tiny groups): any finite value will do, outliers cover it
    mn, mx = torch.where(empty, 0.0, mn), torch.where(empty, 0.0, mx)
    return mu.to(g.dtype), mn.to(g.dtype), mx.to(g.dtype)


def key_bound(T: int, err: float, q_norm: float) -> float:
    """``M_key = sqrt(12/q_norm * ln(T^3/(T-1) * E^2 + 1))``; ``inf`` at ``T <= 1`` (the caller guards it)."""
    if T <= 1:
        return math.inf
    return math.sqrt(12.0 / q_norm * math.log(T**3 / (T - 1) * err**2 + 1.0))


def value_bound(T: int, err: float, a: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """``M_g = sqrt(12/T) * E / a_g`` in ``dtype`` (``a_g = 0`` gives ``inf``, hence 0 bits before clamping)."""
    return math.sqrt(12.0 / max(T, 1)) * err / a.to(dtype)


def bits_from_bound(R: torch.Tensor, M: torch.Tensor | float, n_min: int, n_max: int) -> torch.Tensor:
    """``clamp(ceil(log2(R/(2M) + 1)), n_min, n_max)`` computed in ``R.dtype``; int64 per group."""
    b = torch.ceil(torch.log2(R / (2 * M) + 1))
    b = torch.nan_to_num(b, nan=float(n_max), posinf=float(n_max), neginf=float(n_min))
    return b.clamp(n_min, n_max).to(torch.int64)


@dataclass
class QuantGroups:
    """Result of :func:`quantize_groups` (``G`` groups of ``N`` elements)."""

    codes: torch.Tensor  # [G, N] int64, unsigned codes in [0, 2^n - 1] (0 where n == 0 or outlier)
    scale: torch.Tensor  # [G] dtype
    zero: torch.Tensor  # [G] dtype
    outliers: torch.Tensor  # [G, N] bool
    fake: torch.Tensor  # [G, N] dtype: the reference quantizer's dequantized output (outliers exact)


def quantize_groups(g: torch.Tensor, bits: torch.Tensor, ratio: float, mode: str = "faithful",
                    stats: tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor] | None = None) -> QuantGroups:
    """Quantize each group (row) of ``g [G, N]`` at ``bits [G]`` (0..8) with outliers at ``ratio``.

    ``stats``: ``(outlier_mask(g, ratio), *group_stats(g, that mask))`` where the caller has them already (QAQ's bit
    allocation needs the same range), so they are not computed twice.

    ``faithful`` reproduces ``src/quantizer.py`` L215-262: ``s = R/2^n``, ``q = clamp(round((x-mu)/s), -2^(n-1),
    2^(n-1)-1)`` (round half to even), ``x_hat = q*s + mu``; 0 bits give ``mu - R/2``; statistics over non-outliers.
    ``fixed`` is the standard asymmetric grid: ``scale = R/(2^n-1)``, ``code = clamp(round((x-min)/scale), 0,
    2^n-1)``, ``x_hat = min + code*scale``; 0 bits give the mean of the non-outliers.
    A zero range gives ``s = 0`` and every non-outlier dequantizes to ``mu`` (faithful) or ``min`` (fixed).
    """
    dt = g.dtype
    if stats is None:
        out = outlier_mask(g, ratio)
        mu, mn, mx = group_stats(g, out)
    else:
        out, mu, mn, mx = stats
    R = mx - mn
    nb = bits.to(device=g.device, dtype=torch.int64)
    levels = torch.pow(2.0, nb.double())  # 2^n as exact doubles
    if mode == "faithful":
        s = (R.double() / levels).to(dt)
        half = levels / 2  # 2^(n-1): 0.5 at n = 0, as Python computes it in the reference
        safe = torch.where(s == 0, torch.ones_like(s), s)
        q = torch.round((g - mu[:, None]) / safe[:, None])
        q = torch.where(s[:, None] == 0, torch.zeros_like(q), q)
        q = torch.minimum(torch.maximum(q.double(), -half[:, None]), half[:, None] - 1)
        fake = (q.to(dt) * s[:, None]).to(dt) + mu[:, None]
        code = torch.where(nb[:, None] > 0, q + half[:, None], torch.zeros_like(q))
        zero = torch.where(nb > 0, mu.double() - half * s.double(), mu.double() - 0.5 * R.double())
        scale = s
    elif mode == "fixed":
        top = torch.clamp(levels - 1, min=1)
        s = (R.double() / top).to(dt)
        safe = torch.where(s == 0, torch.ones_like(s), s)
        q = torch.round((g - mn[:, None]) / safe[:, None]).double()
        q = torch.where(s[:, None] == 0, torch.zeros_like(q), q)
        q = torch.minimum(torch.maximum(q, torch.zeros_like(q)), (levels - 1)[:, None])
        fake = torch.where(nb[:, None] > 0, (q.to(dt) * s[:, None]).to(dt) + mn[:, None], mu[:, None])
        code = torch.where(nb[:, None] > 0, q, torch.zeros_like(q))
        zero = torch.where(nb > 0, mn.double(), mu.double())
        scale = s
    else:
        raise ValueError(f"qaq: unknown quantizer mode {mode!r}")
    fake = torch.where(out, g, fake.to(dt))
    code = torch.where(out, torch.zeros_like(code), code).to(torch.int64)
    return QuantGroups(code, scale.to(dt), zero.to(dt), out, fake)


def fake_quant(g: torch.Tensor, bits: torch.Tensor | int, ratio: float = 0.0, mode: str = "faithful") -> torch.Tensor:
    """The reference quantizer's output (dequantized, same shape and dtype) for groups ``g [G, N]``."""
    if isinstance(bits, int):
        bits = torch.full((g.shape[0],), bits, dtype=torch.int64)
    return quantize_groups(g, bits, ratio, mode).fake


def pack_rows(x: torch.Tensor, codes: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor, out: torch.Tensor,
              bits: int, counts: tuple[int, ...], dtype: torch.dtype) -> TokenQuant:
    """Pack rows (one group of ``d`` channels per row) whose codes fit ``bits`` into one :class:`TokenQuant`.

    ``x [m, d]`` are the original rows (outlier values are taken from it), ``codes [m, d]``, ``scale/zero [m]``,
    ``out [m, d]`` the outlier mask. ``bits`` is the packed container width (0, 1, 2, 3, 4 or 8).
    """
    m, d = x.shape
    words = ref.pack(codes, bits)
    sc = scale.to(dtype).reshape(m, 1) if bits else scale.to(dtype).reshape(m, 1)[:, :0]
    idx = val = None
    if bool(out.any()):
        flat = out.reshape(-1)
        idx = torch.nonzero(flat).reshape(-1).to(torch.int32)
        val = x.reshape(-1)[flat].to(dtype)
    return TokenQuant(words, sc, zero.to(dtype).reshape(m, 1), bits, d, d, counts, idx, val)
