"""MiKV: the important set stays at high precision, the rest is packed at 2-4 bits, nothing is dropped."""

from __future__ import annotations

import pytest
import torch

from methods import h2o, mikv  # noqa: F401  (registration)
from methods.base import resolve_budget
from methods.formats import Dense, TokenQuant, quantize_tokens
from methods.registry import parse_spec
from methods.stats import PrefillStats, StepStats
from tests.test_eviction import N_DECODE, T_PROMPT, append_token, kept_positions, make_store, per_row, prompt, recording
from tests.tinymodel import run_cache, tiny_llama


@pytest.fixture(scope="module")
def model():
    return tiny_llama(n_heads=4, n_kv_heads=2, layers=2)


def hi_positions(method, store) -> list[list[int]]:
    lo = method.low_mask(store)
    pos, heads = store.all_rows("pos"), store.head_ids()
    return [sorted(pos[(heads == h) & ~lo].tolist()) for h in range(store.info.n_kv_heads)]


def test_spec():
    m = parse_spec("mikv")
    assert m.kind == "mixed"
    assert m.needs().colsum and m.needs().step
    assert parse_spec("mikv:budget=0.5,hi_bits=8,lo_bits=2").lo_bits == 2


@pytest.mark.parametrize("hi_bits,lo_bits", [(16, 2), (16, 4), (8, 3)])
@pytest.mark.parametrize("budget", [0.1, 0.5, 24])
def test_mixed_store_every_step(model, budget, hi_bits, lo_bits):
    method = parse_spec(f"mikv:budget={budget},hi_bits={hi_bits},lo_bits={lo_bits}")
    log = recording(method)
    cache, logits = run_cache(model, method, prompt(), n_decode=N_DECODE)
    assert all(c == (seen, seen) for _, seen, c in log)  # nothing dropped, at every hook
    b = resolve_budget(budget, T_PROMPT)
    for layer in cache.layers:
        st = layer.store
        (seg,) = st.segments
        lo_k = [p for p in seg.k if isinstance(p, TokenQuant) and p.nbits == lo_bits]
        lo_v = [p for p in seg.v if isinstance(p, TokenQuant) and p.nbits == lo_bits]
        assert len(lo_k) == len(lo_v) == 1 and lo_k[0].counts == (T_PROMPT + N_DECODE - b,) * 2  # packed low part
        hi = [p for p in seg.k if p is not lo_k[0]]
        assert sum(p.n for p in hi) == 2 * b
        if hi_bits == 16:
            assert all(isinstance(p, Dense) for p in hi)
        else:
            assert all(isinstance(p, TokenQuant) and p.nbits == 8 for p in hi)
    assert all(torch.isfinite(x).all() for x in logits)


def test_bytes_between_all_low_and_dense(model):
    ids = prompt()
    full, _ = run_cache(model, parse_spec("full"), ids, n_decode=N_DECODE)
    cache, _ = run_cache(model, parse_spec("mikv:budget=0.25,lo_bits=2"), ids, n_decode=N_DECODE)
    all_low = 0
    for layer in full.layers:
        (seg,) = layer.store.segments
        k, v = seg.dequant()
        d = k.shape[-1]
        all_low += sum(quantize_tokens(x, seg.counts, 2, d, torch.float32).nbytes() for x in (k, v))
    assert all_low < cache.nbytes() < full.nbytes()
    assert cache.kept_rows() == full.kept_rows()


def test_important_set_is_h2o_set_and_stays_exact(model):
    """After the prefill the high-precision set is exactly H2O's kept set, with bit-identical rows; low rows are
    within half a quantization step of the originals."""
    ids = prompt()
    ref, _ = run_cache(model, parse_spec("h2o:budget=0.25"), ids)
    full, _ = run_cache(model, parse_spec("full"), ids)
    method = parse_spec("mikv:budget=0.25,lo_bits=4")
    cache, _ = run_cache(model, method, ids)
    for lm, lh, lf in zip(cache.layers, ref.layers, full.layers):
        assert hi_positions(method, lm.store) == kept_positions(lh.store)
        (seg,) = lm.store.segments
        (lo_k, _), (lo_v, _) = seg.k, seg.v
        k_full, v_full = lf.store.segments[0].dequant()  # head-major, position order
        pos, heads = lm.store.all_rows("pos").long(), lm.store.head_ids()
        lo = method.low_mask(lm.store)
        k_all, v_all = seg.dequant()
        src = heads * T_PROMPT + pos
        assert torch.equal(k_all[~lo], k_full[src[~lo]]) and torch.equal(v_all[~lo], v_full[src[~lo]])
        for x, x_ref, part in ((k_all, k_full, lo_k), (v_all, v_full, lo_v)):
            err = (x[lo] - x_ref[src[lo]]).abs().amax(-1)
            assert (err <= part.scale.float().squeeze(-1) / 2 + 1e-5).all()


def test_demoted_never_promoted(model):
    method = parse_spec("mikv:budget=0.2")
    seen_low: dict[int, set] = {}
    orig = method.check_budget

    def check(store):
        orig(store)
        lo = method.low_mask(store)
        now = set(zip(store.head_ids()[lo].tolist(), store.all_rows("pos")[lo].tolist()))
        assert seen_low.get(store.info.layer, set()) <= now
        seen_low[store.info.layer] = now

    method.check_budget = check
    run_cache(model, method, prompt(), n_decode=N_DECODE)
    assert all(len(s) == 2 * (T_PROMPT + N_DECODE - 19) for s in seen_low.values())


def test_hand_case_split_and_demotion():
    store = make_store(8)
    colsum = torch.tensor([[5, 1, 4, 0, 3, 0, 0, 0], [0, 0, 0, 9, 0, 1, 2, 0]], dtype=torch.float32)
    m = mikv.MiKV(budget=4, recent=2, lo_bits=4)
    m.on_prefill(store, PrefillStats(colsum=colsum))
    assert hi_positions(m, store) == [[0, 2, 6, 7], [3, 5, 6, 7]]
    assert store.counts() == (8, 8)
    append_token(store)
    step = {(0, 6): 10.0, (0, 0): 0.5, (1, 6): 0.5, (1, 7): 0.25, (0, 1): 100.0}  # pos 1 is low: no promotion
    stats = StepStats(sum=[per_row(store, 0, step), per_row(store, 1, {(0, 8): 0.5, (1, 8): 20.0})], max=[], last=[],
                      n_queries=1)
    m.on_append(store, stats)
    assert hi_positions(m, store) == [[0, 6, 7, 8], [3, 6, 7, 8]]  # as H2O: pos 2 (head 0), 5 (head 1) demoted
    assert store.counts() == (9, 9) and len(store.segments) == 1
    (seg,) = store.segments
    assert [type(p).__name__ for p in seg.k] == ["TokenQuant", "Dense"] and seg.k[0].counts == (5, 5)


def test_mikv_cannot_follow_an_eviction(model):
    from methods.base import SpecError

    with pytest.raises(SpecError, match="cannot compose"):
        parse_spec("recency:budget=0.5+mikv")


@pytest.mark.parametrize("spec", ["mikv", "mikv:budget=24", "mikv:recent=0,lo_bits=2,group=8",
                                  "mikv:recent=1.0,lo_bits=4", "mikv:budget=0.1,recent=3", "mikv:budget=1000"])
def test_decode_layout_path_equals_the_general_path(model, spec, monkeypatch):
    """The decode steps' host-counted resplit (``_resplit_layout``) leaves the same parts, rows, aux and logits as the
    general mask-and-repack path; and it is the one that runs once the store has MiKV's layout."""
    ids = prompt()
    calls = []
    fast = mikv.MiKV._resplit_layout
    monkeypatch.setattr(mikv.MiKV, "_resplit_layout", lambda self, *a: calls.append(1) or fast(self, *a))
    cache_f, logits_f = run_cache(model, parse_spec(spec), ids, n_decode=N_DECODE)
    assert len(calls) >= N_DECODE * len(cache_f.layers)  # every decode step of every layer
    monkeypatch.setattr(mikv.MiKV, "_decode_layout", lambda self, store: None)
    cache_g, logits_g = run_cache(model, parse_spec(spec), ids, n_decode=N_DECODE)
    assert all(torch.equal(a, b) for a, b in zip(logits_f, logits_g, strict=True))
    for lf, lg in zip(cache_f.layers, cache_g.layers, strict=True):
        (sf,), (sg,) = lf.store.segments, lg.store.segments
        assert sf.describe() == sg.describe() and sf.counts == sg.counts
        for pf, pg in zip(sf.k + sf.v, sg.k + sg.v, strict=True):
            assert pf.counts == pg.counts
            assert torch.equal(pf.dequant(), pg.dequant())
        assert sf.aux.keys() == sg.aux.keys() and all(torch.equal(sf.aux[n], sg.aux[n]) for n in sf.aux)
