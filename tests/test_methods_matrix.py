"""The shared method matrix: every registered method (and the documented compositions) on a tiny random Llama.

A method is covered here by being registered. Invariants checked for each: finite logits; segment invariants
(K and V rows agree per head, aux columns aligned); the memory reported equals the bytes of the real tensors; no
store holds more rows than were seen; every compressing method really compresses (an fp16 cache that silently
stayed uncompressed fails); the same inputs give the same outputs.
"""

from __future__ import annotations

import pytest
import torch

import methods
from methods.registry import REGISTRY
from tests.tinymodel import run_cache, tiny_llama

COMPOSED = ["snapkv:budget=0.2+kivi:bits=2", "h2o:budget=0.3+qaq", "tova:budget=0.5+qaq:level=layer",
            "pyramidkv:budget=0.3+qaq:mode=fixed"]
SPECS = sorted(REGISTRY) + [c for c in COMPOSED if all(p.split(":")[0] in REGISTRY for p in c.split("+"))]
T, DECODE = 300, 6


@pytest.fixture(scope="module")
def model():
    return tiny_llama(n_heads=6, n_kv_heads=2, layers=2, head_dim=32)


def _tensor_bytes(store) -> int:
    total = 0
    for seg in store.segments:
        for part in seg.k + seg.v:
            for t in vars(part).values():
                if isinstance(t, torch.Tensor) and not (getattr(part, "nbits", 1) == 0 and t is part.scale):
                    total += t.numel() * t.element_size()
    return total


@pytest.mark.parametrize("spec", SPECS)
def test_method_invariants(model, spec):
    method = methods.parse_spec(spec)
    ids = torch.randint(0, 128, (1, T), generator=torch.Generator().manual_seed(7))
    cache, logits = run_cache(model, method, ids, n_decode=DECODE, kv_dtype=torch.float16)
    assert all(torch.isfinite(x).all() for x in logits), spec
    for layer in cache.layers:
        store = layer.store
        for seg in store.segments:
            seg.check()
        assert store.nbytes() == _tensor_bytes(store), spec
        assert max(store.counts()) <= store.seen
        method.check_budget(store)
    dense_fp16 = cache.kept_rows() * 32 * 2 * 2
    if method.kind == "baseline":
        assert cache.nbytes() == dense_fp16
    else:
        assert cache.nbytes() < cache.seen_rows() * 32 * 2 * 2, f"{spec} did not compress"
    # determinism
    cache2, logits2 = run_cache(model, methods.parse_spec(spec), ids, n_decode=DECODE, kv_dtype=torch.float16)
    assert all(torch.equal(a, b) for a, b in zip(logits, logits2))
    assert cache2.nbytes() == cache.nbytes()


@pytest.mark.parametrize("name", sorted(REGISTRY))
def test_registered_method_is_documented(name):
    cls = REGISTRY[name]
    assert cls.paper and cls.kind in ("baseline", "eviction", "quantization", "mixed")
    doc = cls.__doc__ or ""
    assert "References" in doc or "baseline" in cls.kind, f"{name}: docstring must cite its paper"
    m = methods.parse_spec(name)
    assert methods.parse_spec(m.spec()).spec() == m.spec()  # canonical spec round-trips


def test_per_head_eviction_with_layer_level_qaq_is_a_clear_error(model):
    ids = torch.randint(0, 128, (1, 200), generator=torch.Generator().manual_seed(8))
    with pytest.raises(methods.SpecError, match="same tokens in every KV head"):
        run_cache(model, methods.parse_spec("snapkv:budget=0.5+qaq:level=layer"), ids)


@pytest.mark.parametrize("spec", ["h2o+kivi", "tova+kivi", "random+kivi", "full+kivi", "kivi+h2o", "h2o+snapkv"])
def test_impossible_compositions_are_rejected_at_parse_time(spec):
    with pytest.raises(methods.SpecError):
        methods.parse_spec(spec)
