"""The Triton path of the attention function equals the reference path end to end (TRITON_INTERPRET on CPU)."""

from __future__ import annotations

import os

import pytest
import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")
triton = pytest.importorskip("triton")

import methods  # noqa: E402
from methods.attention import segment_pairs, set_backend  # noqa: E402
from tests.tinymodel import run_cache, tiny_llama  # noqa: E402

SPECS = ["full", "kivi:bits=2,group=16,residual=32", "qaq", "h2o:budget=0.5+qaq:n_min=2", "mikv:budget=0.5",
         "snapkv:budget=0.5+kivi:bits=4,group=16,residual=16", "tova:budget=0.5"]


@pytest.fixture(autouse=True)
def _reset_backend():
    yield
    set_backend("auto")


@pytest.mark.parametrize("spec", SPECS)
def test_triton_path_matches_reference(spec, monkeypatch):
    """Prefill, a 3-token chunk (causal tail inside the kernel), then 5 decode steps: same logits, bytes, rows; and
    each backend took its own path at every step of every layer (a fall-back to the reference would compare the
    reference with itself)."""
    from methods import attention

    dev = "cuda" if torch.cuda.is_available() else "cpu"
    model = tiny_llama(4, 2, layers=2, head_dim=32).to(dev)
    ids = torch.randint(0, 128, (1, 70), generator=torch.Generator().manual_seed(5)).to(dev)
    calls = {"triton": 0, "reference": 0}
    for name, fn in (("triton", attention.triton_attend), ("reference", attention.reference_attend)):
        monkeypatch.setattr(attention, f"{name}_attend",
                            lambda *a, _fn=fn, _n=name, **kw: calls.__setitem__(_n, calls[_n] + 1) or _fn(*a, **kw))
    out = {}
    for backend in ("reference", "triton"):
        set_backend(backend)
        before = dict(calls)
        cache, logits = run_cache(model, methods.parse_spec(spec), ids, n_decode=5, kv_dtype=torch.float32,
                                  tokens=[3, 1, 4, 1, 5], chunk=[7, 8, 9])
        other = "reference" if backend == "triton" else "triton"
        assert calls[backend] - before[backend] >= 6 * len(cache.layers) and calls[other] == before[other]
        out[backend] = (torch.cat([x[0, -1] for x in logits]), cache.nbytes(), cache.kept_rows())
    ref, tri = out["reference"], out["triton"]
    assert ref[1:] == tri[1:]
    err = (tri[0] - ref[0]).norm() / ref[0].norm()
    assert err < 1e-4, err


def test_segment_pairs_split_kivi_layout():
    """KIVI's K split (blocks) and V split (one by one) give three aligned row ranges per head."""
    model = tiny_llama(4, 2, layers=1, head_dim=32)
    ids = torch.randint(0, 128, (1, 100), generator=torch.Generator().manual_seed(6))
    cache, _ = run_cache(model, methods.parse_spec("kivi:bits=2,group=16,residual=32"), ids)
    (seg,) = cache.layers[0].store.segments
    pairs = segment_pairs(seg)
    # keys: 96 quantized + 4 dense; values: 68 quantized + 32 dense
    assert [(p[2], p[3], p[4]) for p in pairs] == [([0, 0], [0, 0], [68, 68]), ([68, 68], [0, 0], [28, 28]),
                                                  ([0, 0], [28, 28], [4, 4])]


@pytest.mark.skipif(not torch.cuda.is_available(), reason="compilation counting needs the GPU")
def test_decode_does_not_recompile_as_the_cache_grows():
    """Sizes are runtime arguments: 60 decode steps over a growing cache compile the attention kernel once per
    (format pair, flags), not once per length."""
    from kernels import triton_attention as ta

    model = tiny_llama(4, 2, layers=2, head_dim=32).to("cuda")
    ids = torch.randint(0, 128, (1, 300), generator=torch.Generator().manual_seed(7)).to("cuda")
    set_backend("triton")
    run_cache(model, methods.parse_spec("full"), ids, n_decode=2)
    caches = getattr(ta._attn_split_kernel, "device_caches", None)
    if caches is None:
        pytest.skip("this triton version does not expose its kernel cache")
    before = sum(len(c[0]) for c in caches.values())
    run_cache(model, methods.parse_spec("full"), ids, n_decode=60)
    after = sum(len(c[0]) for c in caches.values())
    assert after - before <= 1, (before, after)


@pytest.mark.parametrize("spec", ["qaq:decode_batch=1", "h2o:budget=0.5", "kivi:bits=2,group=16,residual=16"])
def test_plan_cache_holds_only_live_parts(spec):
    """After every decode step the Triton plan cache refers only to parts of the store's current segments (replaced
    segments must not be kept alive by their plans: the memory is the store's alone)."""
    dev = "cuda" if torch.cuda.is_available() else "cpu"
    model = tiny_llama(4, 2, layers=2, head_dim=32).to(dev)
    ids = torch.randint(0, 128, (1, 60), generator=torch.Generator().manual_seed(8)).to(dev)
    set_backend("triton")
    cache, _ = run_cache(model, methods.parse_spec(spec), ids, n_decode=6)
    for layer in cache.layers:
        live = {id(p) for seg in layer.store.segments for p in seg.k + seg.v}
        cached = [p for sp in layer.attn.plans.values() for p in sp.parts]
        assert all(id(p) in live for p in cached)
        assert len(layer.attn.plans) <= len(layer.store.segments)
        if spec.startswith("qaq"):  # its packed segments outlive a step, so their plans are reused
            assert cached


@pytest.mark.skipif(not torch.cuda.is_available(), reason="the Gluon kernel needs an NVIDIA GPU")
@pytest.mark.parametrize("spec", ["kivi:bits=2,group=32,residual=32", "kivi:bits=4,group=32,residual=32",
                                  "qaq:attention=false,bits=4,outliers=0", "qaq:attention=false,bits=2,outliers=0",
                                  "qaq:attention=false,bits=4", "qaq:attention=false,bits=2",
                                  "mikv:lo_bits=2,budget=0.5", "mikv:lo_bits=4,budget=0.25,hi_bits=8",
                                  "qaq:attention=false,bits=3", "mikv:budget=0.5", "qaq:n_min=2", "qaq"])
def test_gluon_path_in_the_cache(spec, monkeypatch, gluon_strict):
    """A head-dim-128 fp16 KIVI cache (ChannelQuant keys), QAQ cache with or without its outliers (each row's
    extremes at the default ratio; 2, 3 or 4 bits, or its attention-aware mix, whose values are mostly 0 or 1 bit)
    or MiKV cache (TokenQuant keys: its low-precision tokens, 3 bits by default) decodes through the
    Gluon kernel (checked; QAQ's rows without outliers staged in shared memory) with the reference path's logits (fp16
    tolerance), and 40 more decode steps over the
    growing cache do not compile it again (but for a new outlier variant)."""
    from kernels import gluon_attention as ga

    taken, variants = [], []
    launch, consts = ga.launch, ga._consts
    monkeypatch.setattr(ga, "launch", lambda *a, **k: (taken.append(1), launch(*a, **k)))
    monkeypatch.setattr(ga, "_consts", lambda *a: (c := consts(*a), variants.append(tuple(sorted(c.items()))))[0])
    model = tiny_llama(8, 2, layers=2, head_dim=128).to("cuda").half()
    ids = torch.randint(0, 128, (1, 300), generator=torch.Generator().manual_seed(9)).to("cuda")
    out = {}
    for backend in ("reference", "triton"):
        set_backend(backend)
        _, logits = run_cache(model, methods.parse_spec(spec), ids, n_decode=5, kv_dtype=torch.float16,
                              tokens=[3, 1, 4, 1, 5])
        out[backend] = torch.cat([x[0, -1].float() for x in logits[1:]])
    assert taken, "the Gluon kernel was not used"
    if spec.startswith("qaq") and "outliers=0" not in spec:  # QAQ's outliers went through the kernel's outlier path
        assert any(dict(c)["K_OUT"] > 0 and dict(c)["V_OUT"] > 0 for c in variants), variants
    if "bits=3" in spec or spec == "mikv:budget=0.5":  # 3-bit parts (MiKV's default) on the kernel
        assert any(dict(c)["K_BITS"] == 3 and dict(c)["V_BITS"] == 3 for c in variants), variants
    if "outliers=0" in spec:  # QAQ's rows without outliers: staged in shared memory (the cache's parts qualify)
        assert any(dict(c)["K_TS"] for c in variants), variants
    if spec == "qaq":  # its default bounds: 0- and 1-bit values beside 2-4-bit keys
        assert any(dict(c)["V_BITS"] <= 1 for c in variants), variants
    err = float((out["triton"] - out["reference"]).norm() / out["reference"].norm())
    assert err < 1e-2, err
    caches = getattr(ga._kivi_attn_kernel, "device_caches", None)
    if caches is None:
        pytest.skip("this triton version does not expose its kernel cache")
    before, seen = sum(len(c[0]) for c in caches.values()), set(variants)
    run_cache(model, methods.parse_spec(spec), ids, n_decode=40, kv_dtype=torch.float16)
    # a new compile only for a new kernel variant (the outlier variants differ in K_OUT / V_OUT: a first part with
    # outliers on one side), never for the cache's growth
    new = set(variants) - seen
    assert all(any(all(a == b or a[0] in ("K_OUT", "V_OUT") for a, b in zip(n, o, strict=True)) for o in seen)
               for n in new), new
    assert sum(len(c[0]) for c in caches.values()) <= before + len(new)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="the Gluon kernel and CUDA's sync check need an NVIDIA GPU")
def test_mikv_decode_steps_do_not_sync(monkeypatch, gluon_strict):
    """MiKV moves rows into its low-precision part at every decode step, so every step of every layer builds a new
    3-bit part, which the Gluon kernel serves on its raw value path: the part's exponent E is computed on the device
    (kernels/value_exponent.py; it was one host sync per new part) and the steps' cache and attention code on the
    Triton path (MiKV's resplit, the plans, the launches) run under CUDA's sync debug mode set to raise, with the
    reference path's logits."""
    from kernels import gluon_attention as ga
    from methods import formats
    from methods.cache import CompressedLayer

    monkeypatch.setattr(formats, "CHECK_KEPT", False)  # the tests' own check of stated kept counts reads them back
    exps = []
    of = getattr(ga, "value_exponent_of", None)
    monkeypatch.setattr(ga, "value_exponent_of", lambda *a: (exps.append(1), of(*a))[1], raising=False)
    compute = CompressedLayer.compute

    def strict(self, *a, **kw):
        torch.cuda.set_sync_debug_mode("error")
        try:
            return compute(self, *a, **kw)
        finally:
            torch.cuda.set_sync_debug_mode(0)

    model = tiny_llama(8, 2, layers=2, head_dim=128).to("cuda").half()
    ids = torch.randint(0, 128, (1, 300), generator=torch.Generator().manual_seed(10)).to("cuda")
    toks = [torch.tensor([[t]], device="cuda") for t in (3, 1, 4, 1, 5, 9)]
    pos = [torch.tensor([[300 + i]], device="cuda") for i in range(len(toks))]
    out = {}
    for backend in ("reference", "triton"):
        set_backend(backend)
        cache, logits = run_cache(model, methods.parse_spec("mikv:budget=0.5"), ids, n_decode=1,
                                  kv_dtype=torch.float16, tokens=[2])
        n = len(exps)
        if backend == "triton":
            monkeypatch.setattr(CompressedLayer, "compute", strict)
        for t, p in zip(toks, pos, strict=True):
            logits.append(model(t, past_key_values=cache, position_ids=p + 1, use_cache=True).logits)
        monkeypatch.setattr(CompressedLayer, "compute", compute)
        if backend == "triton":  # a new part with an exponent at every step of every layer
            assert len(exps) - n >= len(toks) * len(cache.layers), exps
        out[backend] = torch.cat([x[0, -1].float() for x in logits[1:]])
    err = (out["triton"] - out["reference"]).norm() / out["reference"].norm()
    assert err < 1e-2, err
