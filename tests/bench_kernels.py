"""pytest-benchmark timings of the decode kernels (CUDA only): fp16 SDPA vs packed KIVI 2-bit at 16k, batch 8.

    python -m pytest tests/bench_kernels.py --benchmark-enable
"""

from __future__ import annotations

import pytest
import torch

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="kernel benchmarks need CUDA")

B, HQ, HKV, T, D = 8, 32, 8, 16384, 128


def _timed(benchmark, fn):
    def run():
        fn()
        torch.cuda.synchronize()

    run()
    benchmark.pedantic(run, rounds=30, iterations=5, warmup_rounds=2)


@pytest.fixture(scope="module")
def cases():
    from kernels.bench import build_cases

    return build_cases(B, HKV, T, D)


def test_bench_sdpa_fp16(benchmark, cases):
    q = torch.randn(B, HQ, 1, D, device="cuda", dtype=torch.float16)
    k, v = cases["k"].view(B, HKV, T, D), cases["v"].view(B, HKV, T, D)
    _timed(benchmark, lambda: torch.nn.functional.scaled_dot_product_attention(q, k, v, enable_gqa=True))


@pytest.mark.parametrize("name", ["triton-fp16", "kivi-4bit", "kivi-2bit", "qaq-mix-2/3/4bit+1%"])
def test_bench_packed(benchmark, cases, name):
    from kernels.bench import plans_for
    from kernels.triton_attention import attend_pairs

    q = torch.randn(B * HKV, HQ // HKV, D, device="cuda", dtype=torch.float16)
    plans = plans_for(cases["cases"][name], q.device)
    _timed(benchmark, lambda: attend_pairs(q, plans, D ** -0.5))
