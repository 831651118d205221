"""Causal attention column sums (H2O's / MiKV's prefill statistics): the Triton kernels and the plain-torch reference
against float64, a hand-computed case, and the prefill dispatch. CPU runs the kernels in Triton's interpreter."""

from __future__ import annotations

import math
import os
import zlib

import pytest
import torch

CUDA = torch.cuda.is_available()
if not CUDA:
    os.environ.setdefault("TRITON_INTERPRET", "1")

pytest.importorskip("triton", reason="triton is not installed")

from kernels import reference as ref  # noqa: E402
from kernels import triton_colsum, triton_tiles  # noqa: E402

DEV = torch.device("cuda" if CUDA else "cpu")
TOL = {torch.float32: 1e-4, torch.float16: 1e-2, torch.bfloat16: 1e-2}


@pytest.fixture(autouse=True)
def _poison():
    triton_tiles.POISON = True  # outputs start as NaN: an element the kernel does not write fails the test
    yield
    triton_tiles.POISON = False


def colsum64(q: torch.Tensor, k: torch.Tensor, scale: float) -> torch.Tensor:
    """float64 ``[H_kv, T]`` of the inputs as given (already rounded to their dtype)."""
    hq, T, d = q.shape
    hk = k.shape[0]
    s = torch.einsum("hgnd,htd->hgnt", q.double().reshape(hk, hq // hk, T, d), k.double()) * scale
    causal = torch.ones(T, T, dtype=torch.bool, device=q.device).tril()
    return torch.softmax(s.masked_fill(~causal, float("-inf")), -1).sum((1, 2))


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.double() - b).norm() / b.norm())


def inputs(hq, hk, T, d, dtype, seed, spread=2.0):
    g = torch.Generator().manual_seed(seed)
    q = (torch.randn(hq, T, d, generator=g) * spread).to(dtype).to(DEV)
    k = torch.randn(hk, T, d, generator=g).to(dtype).to(DEV)
    return q, k


# (H_q, H_kv, T, d): GQA ratios 1, 3, 4, 8; one token; lengths around the 64 / 128 blocks; d not a power of 2
SHAPES = [
    (2, 2, 1, 16), (4, 1, 17, 32), (9, 3, 77, 64), (8, 2, 128, 80), (8, 1, 130, 128), (4, 4, 65, 8),
]


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16], ids=str)
@pytest.mark.parametrize("shape", SHAPES, ids=str)
def test_kernel_matches_float64(shape, dtype):
    hq, hk, T, d = shape
    seed = zlib.crc32(f"{shape}{dtype}".encode())
    q, k = inputs(hq, hk, T, d, dtype, seed)
    scale = d ** -0.5
    got = triton_colsum.causal_colsum(q, k, scale)
    want = colsum64(q, k, scale)
    assert got.shape == (hk, T) and got.dtype == torch.float32
    assert torch.isfinite(got).all()
    assert rel(got, want) < TOL[dtype]
    # every softmax row sums to 1: the column sums of a KV head add up to its query heads x T
    torch.testing.assert_close(got.sum(1).double().cpu(), torch.full((hk,), hq // hk * T, dtype=torch.float64),
                               rtol=1e-5, atol=1e-3)


@pytest.mark.parametrize("chunk", [1, 7, 512])
def test_reference_matches_float64(chunk):
    q, k = inputs(8, 2, 70, 16, torch.float32, chunk)
    assert rel(ref.causal_colsum(q, k, 0.25, chunk), colsum64(q, k, 0.25)) < 1e-5


@pytest.mark.parametrize("impl", ["kernel", "reference"])
def test_two_tokens_by_hand(impl):
    """One head, two tokens: query 0 sees key 0 only (p = 1); query 1 splits between keys 0 and 1 by their scores."""
    q = torch.tensor([[[1.0, 0.0], [0.0, 2.0]]], device=DEV)
    k = torch.tensor([[[3.0, 0.0], [0.0, 1.0]]], device=DEV)
    # query 1's scores: 0 against key 0, 2 * 1 * 0.5 = 1 against key 1
    p11 = math.exp(1) / (1 + math.exp(1))
    want = torch.tensor([[1 + (1 - p11), p11]])
    fn = triton_colsum.causal_colsum if impl == "kernel" else ref.causal_colsum
    torch.testing.assert_close(fn(q, k, 0.5).cpu(), want, rtol=1e-6, atol=1e-6)


def test_kernel_reads_strided_queries():
    """The attention function hands over ``query[0]`` of a ``[1, T, H, d]`` tensor transposed: not contiguous."""
    q, k = inputs(6, 2, 40, 32, torch.float16, 3)
    qs = q.transpose(0, 1).contiguous().transpose(0, 1)  # same values, head stride d
    assert not qs.is_contiguous()
    torch.testing.assert_close(triton_colsum.causal_colsum(qs, k, 0.2), triton_colsum.causal_colsum(q, k, 0.2))


def test_mismatched_inputs_are_refused():
    q, k = inputs(4, 3, 8, 16, torch.float32, 0)
    with pytest.raises(ValueError, match="do not match"):
        triton_colsum.causal_colsum(q, k, 0.25)


@pytest.mark.parametrize("dtype", [torch.float16, torch.float32], ids=str)
@pytest.mark.parametrize("backend", ["triton", "reference"])
def test_prefill_stats_dispatch(backend, dtype, monkeypatch):
    """``prefill_stats`` takes the kernels for fp16 / bf16 inputs under the Triton backend, and the reference under
    ``reference`` or for float32 inputs; every path agrees with float64."""
    from kernels import dispatch
    from methods.attention import prefill_stats
    from methods.stats import Needs

    calls = []
    kernel = triton_colsum.causal_colsum
    monkeypatch.setattr(triton_colsum, "causal_colsum", lambda *a, **kw: calls.append(1) or kernel(*a, **kw))
    q, k = inputs(8, 2, 90, 32, dtype, 11)
    monkeypatch.setattr(dispatch, "BACKEND", backend)
    stats = prefill_stats(q, k, 32 ** -0.5, Needs(colsum=True, last_n=3))
    assert len(calls) == (backend == "triton" and dtype == torch.float16)
    assert rel(stats.colsum, colsum64(q, k, 32 ** -0.5)) < 1e-4
    assert stats.last_n.shape == (2, 4, 3, 90)


@pytest.mark.skipif(not CUDA, reason="needs CUDA (larger shapes)")
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=str)
def test_kernel_matches_float64_gpu(dtype):
    q, k = inputs(32, 8, 1543, 128, dtype, 5, spread=4.0)
    got = triton_colsum.causal_colsum(q, k, 128 ** -0.5)
    assert torch.isfinite(got).all() and rel(got, colsum64(q, k, 128 ** -0.5)) < 1e-4


@pytest.mark.parametrize("fits", [2, 3])
def test_configurations_that_do_not_fit_fall_back(fits, monkeypatch):
    """A GPU whose shared memory the first configurations exceed (fp32 at d = 256 asks 320 KB on an H100) gets the
    next one that compiles, remembered for that device, dtype and head dimension; where none does, the reference."""
    from triton.runtime.errors import OutOfResources

    tried = []
    launch = triton_colsum._launch

    def small_gpu(q, k, lse, out, scale2, cfg, block_d, ieee):
        tried.append(triton_colsum.CONFIGS.index(cfg))
        if triton_colsum.CONFIGS.index(cfg) < fits:
            raise OutOfResources(327680, 232448, "shared memory")
        launch(q, k, lse, out, scale2, cfg, block_d, ieee)

    monkeypatch.setattr(triton_colsum, "_launch", small_gpu)
    monkeypatch.setattr(triton_colsum, "_FITS", {})
    q, k = inputs(4, 2, 50, 24, torch.float32, fits)
    for _ in range(2):
        got = triton_colsum.causal_colsum(q, k, 0.3)
        assert torch.isfinite(got).all() and rel(got, colsum64(q, k, 0.3)) < 1e-4
    assert tried == [0, 1, 2] + ([2] if fits == 2 else [])  # the second call starts where the first succeeded
    assert triton_colsum._FITS == {(q.device, torch.float32, 24): fits}
    with pytest.raises(OutOfResources):  # an explicit configuration is not replaced
        triton_colsum.causal_colsum(q, k, 0.3, triton_colsum.CONFIGS[0])
