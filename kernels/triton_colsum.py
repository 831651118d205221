"""Causal attention column sums of a prefill in two Triton passes (H2O's and MiKV's accumulated attention).

``colsum[h_kv, t] = sum over the query heads of KV head h_kv and over the queries i >= t of softmax_i(q_i . k / sqrt)``
(the plain-torch :func:`kernels.reference.causal_colsum` materialises the softmax rows in chunks of queries).

* :func:`_row_lse_kernel`: per query head and block of queries, an online max / sum over the causal keys gives each
  row's log-sum-exp (base 2).
* :func:`_colsum_kernel`: per KV head and block of keys, the key tile stays in registers while the program walks the
  query blocks on and below the diagonal of each query head of its group, adding ``2^(s - lse)`` over the queries.
  Each program owns its keys' sums: no atomics, the same result on every run.

Nothing of size ``T x T`` is written: the passes read q and k (and the ``[H_q, T]`` lse) only. Products are formed
by ``tl.dot`` with fp32 accumulation; fp32 inputs use IEEE precision (not TF32), so every input's products are exact
as in the reference's float32 einsum, and the sums differ from it only in their order.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch
import triton
import triton.language as tl
from triton.runtime.errors import OutOfResources

from kernels import reference as ref
from kernels.triton_tiles import new_empty

LOG2E = 1.4426950408889634


@triton.jit
def _rows(ptr, head, rows, T, sh, st, offs_d, D: tl.constexpr):
    """Rows ``rows`` of head ``head`` (``[len(rows), BLOCK_D]``; zero past ``T`` and past ``D`` channels)."""
    return tl.load(ptr + head.to(tl.int64) * sh + rows[:, None].to(tl.int64) * st + offs_d[None, :],
                   mask=(rows < T)[:, None] & (offs_d < D)[None, :], other=0.0)


@triton.jit
def _scores(q, kt, IEEE: tl.constexpr):
    """``q @ kt`` in fp32; fp32 inputs at IEEE precision (not TF32)."""
    if IEEE:
        return tl.dot(q, kt, input_precision="ieee")
    return tl.dot(q, kt)


@triton.jit
def _row_lse_kernel(q_ptr, k_ptr, lse_ptr, T, sqh, sqt, skh, skt, scale2,
                    G: tl.constexpr, D: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_M: tl.constexpr,
                    BLOCK_N: tl.constexpr, IEEE: tl.constexpr):
    pid_m, h = tl.program_id(0), tl.program_id(1)
    hk = h // G
    rows = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    rmask = rows < T
    offs_d = tl.arange(0, BLOCK_D)
    q = _rows(q_ptr, h, rows, T, sqh, sqt, offs_d, D)
    m = tl.full([BLOCK_M], float("-inf"), tl.float32)
    s_sum = tl.zeros([BLOCK_M], tl.float32)
    hi = tl.minimum((pid_m + 1) * BLOCK_M, T)
    for start in range(0, hi, BLOCK_N):
        cols = start + tl.arange(0, BLOCK_N)
        s = _scores(q, tl.trans(_rows(k_ptr, hk, cols, T, skh, skt, offs_d, D)), IEEE)
        s = tl.where((cols[None, :] <= rows[:, None]) & (cols < T)[None, :], s * scale2, float("-inf"))
        m_new = tl.maximum(m, tl.max(s, 1))
        m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)  # rows past T see no key
        s_sum = s_sum * tl.exp2(m - m_safe) + tl.sum(tl.exp2(s - m_safe[:, None]), 1)
        m = m_new
    tl.store(lse_ptr + h.to(tl.int64) * T + rows, m + tl.log2(s_sum), mask=rmask)


@triton.jit
def _colsum_kernel(q_ptr, k_ptr, lse_ptr, out_ptr, T, sqh, sqt, skh, skt, scale2,
                   G: tl.constexpr, D: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_M: tl.constexpr,
                   BLOCK_N: tl.constexpr, IEEE: tl.constexpr):
    pid_n, hk = tl.program_id(0), tl.program_id(1)
    cols = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    cmask = cols < T
    offs_d = tl.arange(0, BLOCK_D)
    kt = tl.trans(_rows(k_ptr, hk, cols, T, skh, skt, offs_d, D))
    acc = tl.zeros([BLOCK_N], tl.float32)
    lo = (pid_n * BLOCK_N) // BLOCK_M * BLOCK_M  # the first query block that reaches these keys
    for g in range(G):
        h = hk * G + g
        for start in range(lo, T, BLOCK_M):
            rows = start + tl.arange(0, BLOCK_M)
            rmask = rows < T
            lse = tl.load(lse_ptr + h.to(tl.int64) * T + rows, mask=rmask, other=0.0)
            s = _scores(_rows(q_ptr, h, rows, T, sqh, sqt, offs_d, D), kt, IEEE)
            p = tl.exp2(s * scale2 - lse[:, None])
            acc += tl.sum(tl.where((cols[None, :] <= rows[:, None]) & rmask[:, None], p, 0.0), 0)
    tl.store(out_ptr + hk.to(tl.int64) * T + cols, acc, mask=cmask)


def _rows_last(x: torch.Tensor) -> torch.Tensor:
    return x if x.stride(-1) == 1 else x.contiguous()


@dataclass(frozen=True)
class Config:
    """Block sizes: ``block_m`` queries per tile in both passes, ``block_n`` keys per step of the lse pass,
    ``block_n_cols`` keys per program of the column pass."""

    block_m: int = 64
    block_n: int = 128
    block_n_cols: int = 128
    num_warps: int = 4
    num_stages: int = 3


# The first was the fastest of seven configurations on an H100 at 32k (32 / 8 heads, d = 128, fp16: 30.7 ms per
# layer against 31.4-37.0; the float32 chunked reference 357 ms, the causal SDPA prefill itself 15.4 ms). The others
# need less shared memory (float32 inputs or d = 256 exceed the first's on some GPUs: fp32 at d = 256 asks 320 KB).
CONFIGS = (Config(), Config(64, 64, 64, 4, 2), Config(32, 32, 32, 4, 1))
_FITS: dict = {}  # (device, dtype, d) -> index in CONFIGS of the first configuration that compiled there


def _launch(q, k, lse, out, scale2: float, cfg: Config, block_d: int, ieee: bool) -> None:
    hq, T, d = q.shape
    hk = k.shape[0]
    common = dict(G=hq // hk, D=d, BLOCK_D=block_d, IEEE=ieee, num_warps=cfg.num_warps, num_stages=cfg.num_stages)
    _row_lse_kernel[(triton.cdiv(T, cfg.block_m), hq)](q, k, lse, T, q.stride(0), q.stride(1), k.stride(0),
                                                       k.stride(1), scale2, BLOCK_M=cfg.block_m,
                                                       BLOCK_N=cfg.block_n, **common)
    _colsum_kernel[(triton.cdiv(T, cfg.block_n_cols), hk)](q, k, lse, out, T, q.stride(0), q.stride(1), k.stride(0),
                                                           k.stride(1), scale2, BLOCK_M=cfg.block_m,
                                                           BLOCK_N=cfg.block_n_cols, **common)


def causal_colsum(q: torch.Tensor, k: torch.Tensor, scale: float, config: Config | None = None) -> torch.Tensor:
    """Float32 ``[H_kv, T]`` column sums of the causal softmax of ``q [H_q, T, d]`` against ``k [H_kv, T, d]``
    (query heads grouped over KV heads as in GQA), summed over each KV head's query heads.

    ``config``: one block configuration, or ``None`` for the first of :data:`CONFIGS` that fits the GPU's shared
    memory (remembered per device, dtype and head dimension); where none fits, the plain-torch
    :func:`kernels.reference.causal_colsum` gives the result."""
    hq, T, d = q.shape
    hk = k.shape[0]
    if k.shape[1:] != (T, d) or hq % hk or q.dtype != k.dtype:
        raise ValueError(f"causal_colsum: q {tuple(q.shape)} {q.dtype} and k {tuple(k.shape)} {k.dtype} do not match")
    q, k = _rows_last(q), _rows_last(k)
    if q.dtype == torch.bfloat16 and os.environ.get("TRITON_INTERPRET") == "1":
        q, k = q.float(), k.float()  # the interpreter's bf16 dot is not bf16's (numpy has none); fp32 is exact here
    block_d = max(16, triton.next_power_of_2(d))
    ieee = q.dtype == torch.float32
    lse = new_empty((hq, T), torch.float32, q.device)
    out = new_empty((hk, T), torch.float32, q.device)
    if T == 0:
        return out
    scale2 = float(scale) * LOG2E
    if config is not None:
        _launch(q, k, lse, out, scale2, config, block_d, ieee)
        return out
    key = (q.device, q.dtype, d)
    for i in range(_FITS.get(key, 0), len(CONFIGS)):
        try:
            _launch(q, k, lse, out, scale2, CONFIGS[i], block_d, ieee)
        except OutOfResources:
            continue
        _FITS[key] = i
        return out
    _FITS[key] = len(CONFIGS)
    return ref.causal_colsum(q, k, scale)
