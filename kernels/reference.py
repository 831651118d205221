"""Plain-torch reference kernels.

These are the ground truth for the Triton kernels and the implementation used on CPU.

Packing: ``b``-bit unsigned codes are packed ``32 // b`` per little-endian int32 word along the last axis (code ``i``
of a row lives in word ``i // per`` at bit ``(i % per) * b``). 3-bit codes therefore use 30 of 32 bits; the real
bytes are what :func:`packed_words` says, and that is what the memory columns count.
"""

from __future__ import annotations

import math

import torch

SUPPORTED_BITS = (1, 2, 3, 4, 8)


def codes_per_word(bits: int) -> int:
    """How many ``bits``-bit codes fit in one int32 word."""
    if bits not in SUPPORTED_BITS:
        raise ValueError(f"unsupported bit width {bits}; choose from {SUPPORTED_BITS}")
    return 32 // bits


def packed_words(n: int, bits: int) -> int:
    """Number of int32 words that hold ``n`` codes of ``bits`` bits."""
    if bits == 0:
        return 0
    return math.ceil(n / codes_per_word(bits))


def pack(codes: torch.Tensor, bits: int) -> torch.Tensor:
    """Pack integer codes in ``[0, 2**bits)`` along the last axis into int32 words.

    Parameters
    ----------
    codes : Tensor[..., n]
        Integer tensor (any integer dtype) of unsigned codes.
    bits : int
        Bit width; ``0`` returns an empty last axis.

    Returns
    -------
    Tensor[..., ceil(n / (32 // bits))] of dtype int32.
    """
    *lead, n = codes.shape
    if bits == 0:
        return torch.zeros(*lead, 0, dtype=torch.int32, device=codes.device)
    per = codes_per_word(bits)
    w = packed_words(n, bits)
    c = codes.to(torch.int64)
    if w * per != n:
        c = torch.nn.functional.pad(c, (0, w * per - n))
    c = c.reshape(*lead, w, per)
    shifts = torch.arange(per, device=codes.device, dtype=torch.int64) * bits
    words = (c << shifts).sum(-1)
    words = torch.where(words >= 2**31, words - 2**32, words)
    return words.to(torch.int32)


def unpack(words: torch.Tensor, bits: int, n: int, dtype: torch.dtype = torch.int64) -> torch.Tensor:
    """Inverse of :func:`pack`: int32 words -> codes ``[..., n]`` (int64 unless ``dtype`` says otherwise)."""
    *lead, _ = words.shape
    if bits == 0:
        return torch.zeros(*lead, n, dtype=dtype, device=words.device)
    per = codes_per_word(bits)
    # int32 arithmetic shifts sign-extend, and the mask removes the extension: no int64 copy of the words needed
    shifts = torch.arange(per, device=words.device, dtype=torch.int32) * bits
    c = (words.unsqueeze(-1) >> shifts) & ((1 << bits) - 1)
    return c.reshape(*lead, -1)[..., :n].to(dtype)


def minmax_quantize(x: torch.Tensor, bits: int, group: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """KIVI's asymmetric min/max quantizer along the last axis in groups of ``group`` elements.

    ``scale = (max - min) / (2**b - 1)``; ``q = round(clamp((x - min) / scale, 0, 2**b - 1))`` (clamp, then round,
    as in KIVI's ``quant/new_pack.py``). A zero range gives scale 0 and code 0 (KIVI divides by zero there; we guard
    it because a constant group is common after eviction and NaN would poison the whole cache).

    Returns
    -------
    codes : Tensor[..., n] int64, scale : Tensor[..., n // group], zero : Tensor[..., n // group] (both float32)
    """
    *lead, n = x.shape
    if n % group:
        raise ValueError(f"axis of {n} elements is not divisible by the group size {group}")
    g = x.float().reshape(*lead, n // group, group)
    mn = g.amin(-1)
    mx = g.amax(-1)
    scale = (mx - mn) / (2**bits - 1)
    safe = torch.where(scale > 0, scale, torch.ones_like(scale))
    q = ((g - mn.unsqueeze(-1)) / safe.unsqueeze(-1)).clamp(0, 2**bits - 1).round()
    q = torch.where(scale.unsqueeze(-1) > 0, q, torch.zeros_like(q))
    return q.to(torch.int64).reshape(*lead, n), scale, mn


def affine_dequantize(codes: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor, group: int) -> torch.Tensor:
    """``x_hat = code * scale + zero`` with one (scale, zero) per ``group`` elements of the last axis (float32)."""
    *lead, n = codes.shape
    g = codes.float().reshape(*lead, n // group, group)
    return (g * scale.float().unsqueeze(-1) + zero.float().unsqueeze(-1)).reshape(*lead, n)


def partial_attention(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float, mask: torch.Tensor | None = None
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Attention of ``q`` over one set of keys, returning the un-merged partial result.

    Parameters
    ----------
    q : Tensor[H_kv, M, d]
        Queries grouped by KV head (``M`` = query heads per KV head x query tokens).
    k, v : Tensor[H_kv, N, d]
    mask : BoolTensor broadcastable to [H_kv, M, N], True = may attend; or None.

    Returns
    -------
    out : Tensor[H_kv, M, d]  normalised partial output (zeros where nothing is visible)
    lse : Tensor[H_kv, M]     log-sum-exp of the scores (-inf where nothing is visible)
    scores : Tensor[H_kv, M, N] the masked scores, so callers can form final probabilities exp(scores - lse_total)
    """
    s = torch.matmul(q.float(), k.float().transpose(-1, -2)) * scale
    if mask is not None:
        s = s.masked_fill(~mask, float("-inf"))
    lse = torch.logsumexp(s, dim=-1)
    finite = torch.isfinite(lse)
    p = torch.exp(s - torch.where(finite, lse, torch.zeros_like(lse)).unsqueeze(-1))
    out = torch.matmul(p, v.float())
    return out, lse, s


def causal_colsum(q: torch.Tensor, k: torch.Tensor, scale: float, chunk: int = 512) -> torch.Tensor:
    """Float32 ``[H_kv, T]``: column sums of the causal softmax of ``q [H_q, T, d]`` against ``k [H_kv, T, d]``, summed
    over each KV head's query heads (GQA groups) and over the queries (H2O's accumulated attention). The softmax
    rows are formed in float32, ``chunk`` queries at a time (each chunk against the keys it can see)."""
    hq, T, d = q.shape
    hk = k.shape[0]
    qg = q.float().reshape(hk, hq // hk, T, d)
    kf = k.float()
    acc = torch.zeros(hk, T, device=q.device)
    for start in range(0, T, chunk):
        stop = min(T, start + chunk)
        s = torch.einsum("hgnd,htd->hgnt", qg[:, :, start:stop], kf[:, :stop]) * scale
        causal = torch.arange(stop, device=q.device)[None, :] <= torch.arange(start, stop, device=q.device)[:, None]
        p = torch.softmax(s.masked_fill(~causal, float("-inf")), dim=-1)
        acc[:, :stop] += p.sum((1, 2))
    return acc


def merge_partials(outs: list[torch.Tensor], lses: list[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    """Flash-decoding merge: combine normalised partial outputs by their log-sum-exps. Exact."""
    lse = torch.logsumexp(torch.stack(lses), dim=0)
    safe = torch.where(torch.isfinite(lse), lse, torch.zeros_like(lse))
    out = torch.zeros_like(outs[0])
    for o, partial_lse in zip(outs, lses):
        out = out + torch.exp(partial_lse - safe).unsqueeze(-1) * o
    return out, lse
