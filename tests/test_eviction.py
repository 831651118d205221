"""Eviction methods (H2O, SnapKV, PyramidKV, TOVA, random, recency): budgets end to end and hand-computed rules."""

from __future__ import annotations

from dataclasses import dataclass

import pytest
import torch

import methods  # noqa: F401  (registers the shared methods)
from methods import h2o, mikv, pyramidkv, random_evict, recency, snapkv, tova  # noqa: F401  (registration)
from methods.base import BudgetViolation, Method, SpecError, resolve_budget
from methods.compose import Composite
from methods.formats import Dense, TokenQuant, quantize_tokens
from methods.registry import REGISTRY, parse_spec
from methods.stats import Needs, PrefillStats, StepStats
from methods.store import LayerInfo, LayerStore
from tests.tinymodel import run_cache, tiny_llama

T_PROMPT = 96
N_DECODE = 10
N_LAYERS = 4

# every eviction method of this change, with the parameter variants that change the selection path
EVICTION_SPECS = [
    "h2o", "h2o:recent=0", "h2o:recent=1",
    "snapkv", "snapkv:window=8,pooling=max",
    "pyramidkv", "pyramidkv:window=8,kernel=7,pooling=max",
    "tova",
    "random", "random:per=head,recent=0.5", "random:every_step=false",
    "recency", "streaming", "streaming:sinks=0",
]
BUDGETS = [0.1, 0.5, 24]
NEW_METHODS = ["h2o", "snapkv", "pyramidkv", "tova", "random", "recency", "mikv"]


@pytest.fixture(scope="module")
def model():
    return tiny_llama(n_heads=4, n_kv_heads=2, layers=N_LAYERS)


def prompt(T: int = T_PROMPT, seed: int = 0) -> torch.Tensor:
    return torch.randint(0, 128, (1, T), generator=torch.Generator().manual_seed(seed))


def recording(method: Method) -> list[tuple[int, int, tuple[int, ...]]]:
    """Wrap ``method.check_budget`` (the guard, run after every hook) to record (layer, seen, counts)."""
    log: list = []
    orig = method.check_budget

    def check(store):
        log.append((store.info.layer, store.seen, store.counts()))
        orig(store)

    method.check_budget = check
    return log


def expected_prompt_rows(method: Method, T: int, layer: int) -> int:
    """Rows per head right after the prefill, from each method's definition (hand formulas, not the code's)."""
    b = resolve_budget(method.budget, T)
    if isinstance(method, pyramidkv.PyramidKV) and b > method.window:
        return pyramidkv.pyramid_budget(b, method.window, T, N_LAYERS, layer, method.beta)[0]
    return b


def kept_positions(store: LayerStore) -> list[list[int]]:
    pos, heads = store.all_rows("pos"), store.head_ids()
    return [sorted(pos[heads == h].tolist()) for h in range(store.info.n_kv_heads)]


# -- end to end: budgets on every layer and every step ------------------------------------------------------------
@pytest.mark.parametrize("budget", BUDGETS)
@pytest.mark.parametrize("spec", EVICTION_SPECS)
def test_budget_every_layer_every_step(model, spec, budget):
    method = parse_spec(f"{spec}{',' if ':' in spec else ':'}budget={budget}")
    log = recording(method)
    cache, logits = run_cache(model, method, prompt(), n_decode=N_DECODE)
    assert len(log) == N_LAYERS * (1 + N_DECODE)
    for layer, seen, counts in log:
        base = expected_prompt_rows(method, T_PROMPT, layer)
        extra = 0 if method.decode_evicts else seen - T_PROMPT
        assert counts == (base + extra,) * 2, (layer, seen, counts)
    for layer in cache.layers:
        st = layer.store
        assert max(st.counts()) <= method.max_rows(st)
        assert min(st.counts()) >= 1
        assert len(st.segments) == 1  # fresh rows are folded back: no segment per generated token
    assert all(torch.isfinite(x).all() for x in logits)
    if "recency" in spec:
        b = resolve_budget(budget, T_PROMPT)
        for layer in cache.layers:
            seen = layer.store.seen
            assert kept_positions(layer.store) == [list(range(seen - b, seen))] * 2
    if spec == "tova" or (spec.startswith("random") and "per=head" not in spec):
        for layer in cache.layers:  # one set per layer
            a, b = kept_positions(layer.store)
            assert a == b


def test_guard_catches_a_store_over_budget(model):
    """A run that silently kept the full cache must fail: the guard compares store.counts() with max_rows."""

    @dataclass
    class Lazy(h2o.H2O):
        name = "lazy-h2o"

        def _evict(self, store):  # forgets to evict
            pass

    with pytest.raises(BudgetViolation):
        run_cache(model, Lazy(budget=0.5), prompt(), n_decode=2)


@pytest.mark.parametrize("spec", ["snapkv", "pyramidkv", "random:every_step=false", "h2o", "tova", "random",
                                  "recency", "mikv"])
def test_budget_one_reproduces_full(model, spec):
    """budget=1.0 keeps everything at prefill: prefill-only methods match the full cache at every step; methods
    that evict at every step match up to the first generated token (evicting after it is their definition)."""
    ids = prompt()
    _, ref = run_cache(model, parse_spec("full"), ids, n_decode=N_DECODE)
    tokens = [int(x[0, -1].argmax()) for x in ref[:-1]]
    method = parse_spec(f"{spec}{',' if ':' in spec else ':'}budget=1.0")
    _, got = run_cache(model, method, ids, n_decode=N_DECODE, tokens=tokens)
    n = len(ref) if (method.kind == "eviction" and not method.decode_evicts) else 2
    for a, b in zip(ref[:n], got[:n]):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)
    if n == 2:
        assert not torch.allclose(ref[-1], got[-1], atol=1e-6)  # it did evict (or quantize) later


def test_registry_and_docs():
    for name in NEW_METHODS:
        cls = REGISTRY[name]
        assert cls.name == name and cls.paper and cls.kind in ("eviction", "mixed")
        doc = cls.__doc__ or ""
        assert "METHODS.md §" in doc and "References" in doc
        m = parse_spec(name)
        assert parse_spec(m.spec()).spec() == m.spec()
    with pytest.raises(SpecError):
        parse_spec("snapkv:kernel=4")
    with pytest.raises(SpecError):
        parse_spec("h2o:recent=2.5")
    with pytest.raises(SpecError):
        parse_spec("random:per=token")
    with pytest.raises(SpecError):
        parse_spec("tova:budget=0")


# -- hand-built stores ------------------------------------------------------------------------------------------
def make_store(T: int, layer: int = 0, n_layers: int = 1, seed: int = 0, hk: int = 2, hq: int = 4,
               d: int = 4) -> LayerStore:
    info = LayerInfo(layer, n_layers, hk, hq, d, torch.float32, torch.device("cpu"), seed)
    store = LayerStore(info)
    g = torch.Generator().manual_seed(100 + layer)
    store.append(torch.randn(hk, T, d, generator=g), torch.randn(hk, T, d, generator=g), torch.arange(T))
    return store


def append_token(store: LayerStore) -> None:
    hk, d = store.info.n_kv_heads, store.info.head_dim
    store.append(torch.randn(hk, 1, d), torch.randn(hk, 1, d), torch.tensor([store.seen]))


def per_row(store: LayerStore, seg: int, table: dict[tuple[int, int], float]) -> torch.Tensor:
    """A stats vector aligned with segment ``seg``'s rows, from {(head, pos): value} (0 elsewhere)."""
    s = store.segments[seg]
    heads = torch.repeat_interleave(torch.arange(len(s.counts)), torch.tensor(s.counts))
    return torch.tensor([table.get((int(h), int(p)), 0.0) for h, p in zip(heads, s.aux["pos"])])


def test_h2o_heavy_recent_per_head_and_accumulation():
    store = make_store(8)
    colsum = torch.tensor([[5, 1, 4, 0, 3, 0, 0, 0], [0, 0, 0, 9, 0, 1, 2, 0]], dtype=torch.float32)
    m = h2o.H2O(budget=4, recent=2)
    m.on_prefill(store, PrefillStats(colsum=colsum))
    assert kept_positions(store) == [[0, 2, 6, 7], [3, 5, 6, 7]]
    append_token(store)  # pos 8: a new segment (the old one carries scores)
    assert len(store.segments) == 2
    step = {(0, 6): 10.0, (0, 0): 0.5, (1, 6): 0.5, (1, 7): 0.25}
    fresh = {(0, 8): 0.5, (1, 8): 20.0}
    stats = StepStats(sum=[per_row(store, 0, step), per_row(store, 1, fresh)], max=[], last=[], n_queries=1)
    m.on_append(store, stats)
    # recent = {7, 8}; heavy among the rest: head 0 {6: 10, 0: 5.5} > 2: 4; head 1 {3: 9, 6: 2.5} > 5: 1
    assert kept_positions(store) == [[0, 6, 7, 8], [3, 6, 7, 8]]
    assert len(store.segments) == 1
    score = dict(zip(zip(store.head_ids().tolist(), store.all_rows("pos").tolist()), store.all_rows("score").tolist()))
    assert score[(0, 6)] == 10.0 and score[(0, 0)] == 5.5 and score[(1, 8)] == 20.0 and score[(1, 6)] == 2.5


def test_h2o_gqa_scores_sum_the_group():
    """Prefill scores are the causal column sums summed over the KV group's query heads."""
    from methods.attention import prefill_stats

    torch.manual_seed(0)
    T, d = 20, 8
    q, k = torch.randn(4, T, d), torch.randn(2, T, d)
    stats = prefill_stats(q, k, d ** -0.5, Needs(colsum=True))
    causal = torch.ones(T, T).tril().bool()
    p = torch.softmax((q @ k.repeat_interleave(2, 0).transpose(1, 2) * d ** -0.5).masked_fill(~causal, -1e30), -1)
    ref = p.sum(1).reshape(2, 2, T).sum(1)  # [H_kv, T]
    torch.testing.assert_close(stats.colsum, ref, rtol=1e-5, atol=1e-5)
    store = make_store(T, d=d)
    h2o.H2O(budget=6, recent=0).on_prefill(store, stats)
    assert kept_positions(store) == [sorted(torch.topk(ref[h], 6).indices.tolist()) for h in range(2)]


S0 = [8, 0, 0, 0, 0, 3, 6, 4, 0]  # prefix scores (T = 12, W = 3)


def snap_stats(T: int = 12, W: int = 3) -> PrefillStats:
    s = torch.tensor([S0, S0[::-1]], dtype=torch.float32)
    a = torch.zeros(2, 2, W, T)
    a[:, 0, 0, : T - W] = 0.25 * s  # split over the group's heads and window queries: the sum is what counts
    a[:, 1, 2, : T - W] = 0.75 * s
    a[:, :, :, T - W:] = 5.0  # the window's own columns never compete
    return PrefillStats(last_n=a)


@pytest.mark.parametrize("pooling,kernel,expect", [
    # avg (padding counted): head 0 [2.67 2.67 0 0 1 3 4.33 3.33 1.33] -> {6, 7}; head 1 mirrored -> {1, 2}
    ("avg", 3, [[6, 7], [1, 2]]),
    # max: head 0 [8 8 0 0 3 6 6 6 4] -> {0, 1}; head 1 -> {7, 8}
    ("max", 3, [[0, 1], [7, 8]]),
    # kernel 1 = no pooling: head 0 {0: 8, 6: 6}; head 1 {8: 8, 2: 6}
    ("avg", 1, [[0, 6], [2, 8]]),
])
def test_snapkv_pooling_and_window(pooling, kernel, expect):
    store = make_store(12)
    snapkv.SnapKV(budget=5, window=3, kernel=kernel, pooling=pooling).on_prefill(store, snap_stats())
    assert kept_positions(store) == [e + [9, 10, 11] for e in expect]


def test_snapkv_edges():
    store = make_store(12)
    snapkv.SnapKV(budget=12, window=3).on_prefill(store, snap_stats())  # T <= C: keep all
    assert kept_positions(store) == [list(range(12))] * 2
    store = make_store(12)
    snapkv.SnapKV(budget=2, window=3).on_prefill(store, snap_stats())  # C <= W: the last C tokens
    assert kept_positions(store) == [[10, 11]] * 2
    m = snapkv.SnapKV(budget=5, window=3)
    assert m.needs().last_n == 3 and not m.decode_evicts


def test_pyramid_budget_hand_computed():
    pb = pyramidkv.pyramid_budget
    # C=40, W=8, T=100, L=4, beta=20: min=32//20=1, max=64-1=63 (< T-W=92), steps=62//3=20 -> 63,43,23,3 (+W)
    assert [pb(40, 8, 100, 4, i, 20) for i in range(4)] == [(71, "pyramid"), (51, "pyramid"), (31, "pyramid"),
                                                           (11, "pyramid")]
    # C=58, W=8, T=100: min=50//20=2, max=98 >= T-W=92 -> max=92, min=100-92=8, steps=84//3=28 -> 92,64,36,8 (+W)
    assert [pb(58, 8, 100, 4, i, 20)[0] for i in range(4)] == [100, 72, 44, 16]
    assert pb(58, 8, 90, 4, 3, 20) == (58, "uniform")  # T < 2 (C - W) = 100
    assert pb(58, 8, 50, 4, 3, 20) == (50, "all")  # T < C
    assert pb(40, 8, 100, 1, 0, 20) == (71, "pyramid")  # one layer: steps = 0


def test_pyramidkv_per_layer_budgets_end_to_end(model):
    method = parse_spec("pyramidkv:budget=40,window=8")
    cache, _ = run_cache(model, method, prompt(100), n_decode=3)
    assert [ly.store.counts() for ly in cache.layers] == [(71 + 3,) * 2, (51 + 3,) * 2, (31 + 3,) * 2, (11 + 3,) * 2]
    assert [method.max_rows(ly.store) for ly in cache.layers] == [74, 54, 34, 14]


def test_pyramidkv_selection_is_snapkv_scoring():
    store = make_store(12, layer=1, n_layers=2)
    # C=6, W=3, T=12 >= 2 (C - W) = 6: min=0, max=6 >= T-W=9? no; steps=6 -> layer 1 keeps 0 + W
    pyramidkv.PyramidKV(budget=6, window=3).on_prefill(store, snap_stats())
    assert kept_positions(store) == [[9, 10, 11]] * 2
    store = make_store(12, layer=0, n_layers=2)
    pyramidkv.PyramidKV(budget=6, window=3, kernel=3, pooling="max").on_prefill(store, snap_stats())
    # layer 0 keeps max_num=6 prefix tokens: max-pooled head 0 [8 8 0 0 3 6 6 6 4] -> {0,1,5,6,7,8}
    assert kept_positions(store)[0] == [0, 1, 5, 6, 7, 8, 9, 10, 11]


def test_tova_head_average_same_set():
    store = make_store(8)
    last = torch.zeros(2, 2, 1, 8)
    last[0, 0, 0] = torch.tensor([0.9, 0, 0, 0, 0, 0, 0, 0.1])
    last[0, 1, 0] = torch.tensor([0, 0.5, 0, 0, 0, 0, 0, 0.5])
    last[1, 0, 0] = torch.tensor([0, 0.6, 0.2, 0, 0, 0, 0, 0.2])
    last[1, 1, 0] = torch.tensor([0, 0, 0, 0.7, 0, 0, 0, 0.3])
    # mean over the 4 query heads: pos0 .225, pos1 .275, pos2 .05, pos3 .175, pos7 .275 -> top 3 {1, 7, 0}
    m = tova.TOVA(budget=3)
    assert m.needs() == Needs(last_n=1, step=True)
    m.on_prefill(store, PrefillStats(last_n=last))
    assert kept_positions(store) == [[0, 1, 7]] * 2
    append_token(store)  # pos 8 joins the same segment (no policy columns)
    assert len(store.segments) == 1
    # head 0 loves pos 0, head 1 hates it; summed over KV heads / H_q: pos0 .3, pos1 .25, pos7 .1, pos8 .35
    last_row = per_row(store, 0, {(0, 0): 1.2, (1, 1): 1.0, (0, 7): 0.2, (1, 7): 0.2, (0, 8): 0.6, (1, 8): 0.8})
    m.on_append(store, StepStats(sum=[], max=[], last=[last_row], n_queries=1))
    assert kept_positions(store) == [[0, 1, 8]] * 2


def test_random_seeded_per_sample_and_layer():
    def kept(layer, seed, **kw):
        store = make_store(64, layer=layer, n_layers=4, seed=seed)
        random_evict.RandomEvict(budget=16, **kw).on_prefill(store, PrefillStats())
        return kept_positions(store)

    a = kept(0, 0)
    assert a == kept(0, 0)  # deterministic
    assert a[0] == a[1]  # per layer: one set
    assert a != kept(1, 0) and a != kept(0, 1)  # differs by layer and by sample seed
    h = kept(0, 0, per="head")
    assert h[0] != h[1] and all(len(x) == 16 for x in h)
    r = kept(0, 0, recent=6)  # "random from prefix": the last 6 always kept, 10 random older ones
    assert all(x[-6:] == list(range(58, 64)) and len(x) == 16 for x in r)
    assert random_evict.RandomEvict(every_step=False).decode_evicts is False
    assert random_evict.RandomEvict().decode_evicts is True


def test_random_end_to_end_deterministic(model):
    runs = [run_cache(model, parse_spec("random:budget=0.25"), prompt(), n_decode=4)[0] for _ in range(2)]
    assert [kept_positions(x.store) for x in runs[0].layers] == [kept_positions(x.store) for x in runs[1].layers]
    assert kept_positions(runs[0].layers[0].store) != kept_positions(runs[0].layers[1].store)


def test_recency_rule():
    store = make_store(10)
    m = recency.Recency(budget=4)
    m.on_prefill(store, PrefillStats())
    assert kept_positions(store) == [[6, 7, 8, 9]] * 2
    append_token(store)
    m.on_append(store, None)
    assert kept_positions(store) == [[7, 8, 9, 10]] * 2


# -- composition -----------------------------------------------------------------------------------------------------
@dataclass
class PerToken4(Method):
    """Test-only per-token 4-bit quantizer of keys and values (everything but nothing kept dense)."""

    name = "pertoken4"
    kind = "quantization"
    paper = "test"

    def _pack(self, store):
        for seg in store.segments:
            for parts in (seg.k, seg.v):
                if isinstance(parts[-1], Dense):
                    x = parts[-1]
                    q = quantize_tokens(x.x.float(), x.counts, 4, store.info.head_dim, store.info.dtype)
                    if len(parts) > 1 and isinstance(parts[-2], TokenQuant):
                        parts[-2:] = [parts[-2].cat(q)]
                    else:
                        parts[-1] = q

    def on_prefill(self, store, stats):
        self._pack(store)

    def on_append(self, store, stats):
        self._pack(store)


def test_h2o_composes_with_a_per_token_quantizer(model):
    method = Composite(parts=[h2o.H2O(budget=0.25), PerToken4()])
    log = recording(method)
    cache, logits = run_cache(model, method, prompt(), n_decode=5)
    assert all(c == (24, 24) for _, _, c in log)
    for layer in cache.layers:
        (seg,) = layer.store.segments
        assert all(isinstance(p, TokenQuant) and p.nbits == 4 for p in seg.k + seg.v)
    assert all(torch.isfinite(x).all() for x in logits)


def test_snapkv_composes_with_kivi(model):
    method = parse_spec("snapkv:budget=0.5,window=8+kivi:bits=2,group=16,residual=16")
    log = recording(method)
    cache, _ = run_cache(model, method, prompt(), n_decode=N_DECODE)
    assert all(c == (48 + seen - T_PROMPT,) * 2 for _, seen, c in log)
    assert "ChannelQuant" in cache.layers[0].store.segments[0].describe()


def test_h2o_with_kivi_is_a_clear_spec_error(model):
    """KIVI's per-channel key blocks cannot lose single tokens; decode-time eviction says so (at the first step
    after keys were packed; parse time would need a change in the shared registry, see the report)."""
    with pytest.raises(SpecError, match="per-channel"):
        run_cache(model, parse_spec("h2o:budget=0.5+kivi:bits=2,group=16,residual=16"), prompt(), n_decode=3)


# -- selections that state their kept counts (no device sync on a GPU) ---------------------------------------------
def _top_per_head_loop(heads: torch.Tensor, score: torch.Tensor, keep: torch.Tensor, k: int, cand) -> torch.Tensor:
    """The per-head definition: ``keep`` plus, per head, the top-``k`` scores among the other (candidate) rows."""
    final = keep.clone()
    other = ~keep if cand is None else cand & ~keep
    for h in heads.unique():
        idx = ((heads == h) & other).nonzero().squeeze(-1)
        if idx.numel() and k > 0:
            final[idx[torch.topk(score[idx], min(k, idx.numel())).indices]] = True
    return final


@pytest.mark.parametrize("seed", range(6))
@pytest.mark.parametrize("k", [0, 1, 5, 40])
def test_top_per_head_all_heads_at_once_is_the_per_head_rule(seed, k):
    g = torch.Generator().manual_seed(seed)
    store = make_store(30, hk=3, hq=6)
    n = store.counts()
    assert len(set(n)) == 1  # the one-topk path
    score = torch.rand(sum(n), generator=g)
    keep = torch.rand(sum(n), generator=g) < 0.3
    cand = (torch.rand(sum(n), generator=g) < 0.5) if seed % 2 else None
    got = h2o.top_per_head(store, score, keep, k, cand)
    assert torch.equal(got, _top_per_head_loop(store.head_ids(), score, keep, k, cand))


def test_kept_rows_gives_the_masks_rows_and_checks_the_counts():
    from methods import formats

    keep = torch.tensor([1, 0, 1, 1, 0, 0, 1, 0], dtype=torch.bool)
    rows, kept = formats.kept_rows(keep, (4, 4), (3, 1))
    assert kept == (3, 1) and rows.tolist() == [0, 2, 3, 6]
    assert formats.kept_rows(keep, (4, 4)) == (keep, (3, 1))
    assert formats.CHECK_KEPT  # tests/conftest.py: every stated count is verified
    with pytest.raises(AssertionError, match="kept counts"):
        formats.kept_rows(keep, (4, 4), (2, 2))
    d = Dense(torch.arange(8.0)[:, None], (4, 4))
    assert torch.equal(d.select(keep, (3, 1)).x, d.select(keep).x)


@pytest.mark.parametrize("seed", range(4))
def test_tova_aligned_path_is_the_by_position_rule(seed, monkeypatch):
    stores = []
    for aligned in (True, False):
        monkeypatch.setattr(tova, "_aligned", lambda s, a=aligned: a)
        store = make_store(20, hk=2, hq=4)
        m = tova.TOVA(budget=7)
        m.on_prefill(store, PrefillStats(last_n=torch.rand(2, 2, 1, 20, generator=torch.Generator().manual_seed(seed))))
        gg = torch.Generator().manual_seed(seed)
        for _ in range(5):
            append_token(store)
            m.on_append(store, StepStats(sum=[], max=[], last=[torch.rand(store.segments[0].n, generator=gg)],
                                         n_queries=1))
        stores.append(kept_positions(store))
    assert stores[0] == stores[1]
