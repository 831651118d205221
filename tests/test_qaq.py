"""QAQ (METHODS.md §1): golden values §1.10, bit allocation, packed storage, decode rule, accounting, end to end."""

from __future__ import annotations

import math

import pytest
import torch

import methods  # noqa: F401  (registers the shared methods)
from kernels.reference import unpack
from methods.base import SpecError
from methods.formats import Dense, TokenQuant
from methods.qaq import Qaq
from methods.qaq_accounting import qaq_reference_accounting
from methods.qaq_quant import bits_from_bound, fake_quant, key_bound, outlier_mask, quantize_groups
from methods.registry import parse_spec
from methods.stats import PrefillStats, StepStats
from methods.store import LayerInfo, LayerStore, _part_row_index
from tests.tinymodel import run_cache, tiny_llama


def make_store(k: torch.Tensor, v: torch.Tensor, n_q: int = 4, dtype=torch.float32) -> LayerStore:
    h, T, d = k.shape
    store = LayerStore(LayerInfo(0, 1, h, n_q, d, dtype, torch.device("cpu")))
    store.append(k.to(dtype), v.to(dtype), torch.arange(T))
    return store


def rows_by_pos(store: LayerStore) -> dict[tuple[int, int], tuple[torch.Tensor, torch.Tensor]]:
    """(head, pos) -> (dequantized K row, V row), checking every segment's invariants on the way."""
    out = {}
    for seg in store.segments:
        seg.check()
        k, v = seg.dequant()
        heads = torch.repeat_interleave(torch.arange(len(seg.counts)), torch.tensor(seg.counts))
        for i, (h, p) in enumerate(zip(heads.tolist(), seg.aux["pos"].tolist(), strict=True)):
            out[(h, p)] = (k[i], v[i])
    return out


def codes_by_pos(store: LayerStore, j: int) -> dict[tuple[int, int], torch.Tensor]:
    """(head, pos) -> unpacked codes of every quantized row of K (j=0) or V (j=1)."""
    out = {}
    for seg in store.segments:
        parts = seg.k if j == 0 else seg.v
        heads = torch.repeat_interleave(torch.arange(len(seg.counts)), torch.tensor(seg.counts))
        for p, idx in zip(parts, _part_row_index(parts, seg.counts), strict=True):
            if isinstance(p, TokenQuant) and p.nbits:
                codes = unpack(p.words, p.nbits, p.d)
                for r, i in enumerate(idx.tolist()):
                    out[(int(heads[i]), int(seg.aux["pos"][i]))] = codes[r]
    return out


def ramp(R: float, d: int = 8) -> torch.Tensor:
    return torch.linspace(0, R, d)


# -- golden values (§1.10) -------------------------------------------------------------------------------------
@pytest.mark.parametrize("n,expected", [
    (1, [0, 0, 3.5, 3.5, 3.5, 3.5, 3.5, 3.5]),
    (2, [0, 1.75, 1.75, 3.5, 3.5, 5.25, 5.25, 5.25]),
    (3, [0, .875, 1.75, 2.625, 4.375, 5.25, 6.125, 6.125]),
])
def test_golden_ramp(n, expected):
    x = torch.arange(8.0)[None]
    assert fake_quant(x, n).tolist() == [expected]
    store = make_store(x.reshape(1, 1, 8), x.reshape(1, 1, 8), n_q=1)
    Qaq(attention=False, bits=n, outliers=0.0).on_prefill(store, PrefillStats())
    k, v = rows_by_pos(store)[(0, 0)]
    assert k.tolist() == expected and v.tolist() == expected  # packed store == reference output, exactly
    assert all(isinstance(p, TokenQuant) and p.nbits == n for s in store.segments for p in s.k + s.v)


def test_golden_zero_bits_is_mean_minus_half_range():
    torch.manual_seed(0)
    g = torch.randn(5, 16)
    out = fake_quant(g, 0)
    want = g.mean(-1) - (g.amax(-1) - g.amin(-1)) / 2
    assert torch.allclose(out, want[:, None].expand(5, 16), atol=1e-6)
    store = make_store(g.reshape(1, 5, 16), g.reshape(1, 5, 16), n_q=1)
    Qaq(attention=False, bits=0, outliers=0.0).on_prefill(store, PrefillStats())
    rows = rows_by_pos(store)
    assert torch.allclose(torch.stack([rows[(0, t)][1] for t in range(5)]), out, atol=1e-6)
    assert store.segments[0].k[0].words.numel() == 0  # 0 bits: no codes, one zero per row


@pytest.mark.parametrize("N,flagged", [(128, 2), (4096, 42), (131072, 1312)])
def test_golden_outlier_counts(N, flagged):
    torch.manual_seed(1)
    assert int(outlier_mask(torch.randn(1, N), 0.01).sum()) == flagged
    assert int(outlier_mask(torch.randn(1, N), 0.0).sum()) == 0


def test_golden_key_bound():
    M = key_bound(64, 3.0, 300.0)
    assert round(M, 3) == 0.649
    assert round(key_bound(32, 3.0, 300.0), 3) == 0.605 and round(key_bound(512, 3.0, 300.0), 3) == 0.766
    assert bits_from_bound(torch.tensor([10.0]), M, 0, 8).item() == 4
    assert bits_from_bound(torch.tensor([10.0], dtype=torch.float16), M, 0, 8).item() == 4


def test_outlier_bounds_lower_inclusive_upper_exclusive():
    x = torch.arange(128.0)[None]
    m = outlier_mask(x, 0.01)  # k_lo = 1 (x <= 0), k_hi = 127 (x > 126)
    assert torch.nonzero(m[0]).reshape(-1).tolist() == [0, 127]


def test_outliers_excluded_from_statistics():
    x = torch.tensor([[0.0, 1, 2, 3, 4, 5, 6, 100.0]])
    q = quantize_groups(x, torch.tensor([2]), 0.25)  # k_lo = 1, k_hi = 7: flags 0 and 100
    assert q.outliers[0].tolist() == [True] + [False] * 6 + [True]
    assert q.fake[0, 0] == 0 and q.fake[0, -1] == 100  # exact
    mu, s = 3.5, 5 / 4  # mean and range of 1..6
    want = [mu + max(-2, min(1, round((v - mu) / s))) * s for v in range(1, 7)]
    assert q.fake[0, 1:-1].tolist() == pytest.approx(want)


def test_fixed_grid_levels():
    x = torch.arange(8.0)[None]
    q = quantize_groups(x, torch.tensor([2]), 0.0, "fixed")  # levels 0, 7/3, 14/3, 7
    assert q.fake[0].tolist() == pytest.approx([0, 0, 7 / 3, 7 / 3, 14 / 3, 14 / 3, 7, 7])
    assert q.codes[0].tolist() == [0, 0, 1, 1, 2, 2, 3, 3]


# -- bit allocation ----------------------------------------------------------------------------------------------
K_RANGES = [[0, 0.5, 2, 5, 20, 5], [2, 2, 2, 2, 2, 2]]  # M_key(T=6, E=3, 300) = 0.48849
A_MAX = [[1.0, 0.5, 0.1, 0.0, 0.01, 0.3], [0.5] * 6]  # M_v = sqrt(2) * 3 / a; value range 30 everywhere


def alloc_case():
    k = torch.stack([torch.stack([ramp(r) for r in rows]) for rows in K_RANGES])  # [2, 6, 8]
    v = ramp(30.0).expand(2, 6, 8).clone()
    last_n = torch.zeros(2, 2, 2, 6)  # [H_kv, g, n, T]
    for h in range(2):
        for t in range(6):
            last_n[h, t % 2, (t + h) % 2, t] = A_MAX[h][t]  # spread over query heads and window rows
    return k, v, PrefillStats(last_n=last_n)


@pytest.mark.parametrize("level,k_bits,v_bits", [
    # keys: ceil(log2(R/(2*0.48849)+1)) -> 0,1,2,3,5->4 ; values: ceil(log2(3.5355*a+1)) -> 3,2,1,0,1 ; last -> n_max
    ("head", [0, 1, 2, 3, 4, 4, 2, 2, 2, 2, 2, 4], [3, 2, 1, 0, 1, 4, 2, 2, 2, 2, 2, 4]),
    # layer: R = max over heads (2,2,2,5,20), a = max over heads (1,.5,.5,.5,.5)
    ("layer", [2, 2, 2, 3, 4, 4], [3, 2, 2, 2, 2, 4]),
])
def test_hand_computed_bits(level, k_bits, v_bits):
    k, v, stats = alloc_case()
    store = make_store(k, v)
    m = Qaq(err=3.0, n=2, n_min=0, n_max=4, outliers=0.0, level=level)
    m.on_prefill(store, stats)
    st = store.state["qaq"]
    assert st["prefill_k_bits"].tolist() == k_bits and st["prefill_v_bits"].tolist() == v_bits
    per_row_k = k_bits if level == "head" else k_bits * 2
    per_row_v = v_bits if level == "head" else v_bits * 2
    rows = rows_by_pos(store)
    for h in range(2):
        for t in range(6):
            i = h * 6 + t
            gk = k[h, t][None] if level == "head" else k[:, t].reshape(1, -1)
            fk = fake_quant(gk, per_row_k[i]).reshape(-1, 8)[0 if level == "head" else h]
            assert torch.allclose(rows[(h, t)][0], fk, atol=1e-6)
            fv = fake_quant(v[h, t][None], per_row_v[i])[0]  # value groups are identical ramps at both levels
            assert torch.allclose(rows[(h, t)][1], fv, atol=1e-6)
    # one segment per key width, V parts per value width
    assert [s.k[0].nbits for s in store.segments] == sorted(set(k_bits))


def test_last_n_minus_1_tokens_at_n_max():
    torch.manual_seed(2)
    k, v = torch.randn(2, 20, 16) * 0.01, torch.randn(2, 20, 16) * 0.01  # tiny ranges: n_min elsewhere
    stats = PrefillStats(last_n=torch.full((2, 2, 5, 20), 1e-4))
    store = make_store(k, v)
    Qaq(n=5, n_min=1, n_max=3).on_prefill(store, stats)
    st = store.state["qaq"]
    for name in ("k", "v"):
        b = st[f"prefill_{name}_bits"].reshape(2, 20)
        assert (b[:, 16:] == 3).all() and (b[:, :16] == 1).all()


def test_measured_q_norm_and_t1_guard():
    k, v = torch.randn(1, 1, 8), torch.randn(1, 1, 8)
    store = make_store(k, v, n_q=1)
    m = Qaq(q_norm="measured", n=1, n_min=0, n_max=3)
    assert m.needs().qnorm
    m.on_prefill(store, PrefillStats(last_n=torch.ones(1, 1, 1, 1), qnorm2=torch.arange(1.0, 11.0)[None]))
    assert store.state["qaq"]["q_norm"] == 9.0  # nearest-rank 90th percentile
    assert store.state["qaq"]["prefill_k_bits"].tolist() == [3]  # T = 1: n_max


# -- storage and accounting ---------------------------------------------------------------------------------------
def expected_bytes(store: LayerStore) -> int:
    """sum over rows and K/V of 4*ceil(d/(32//c)) + e*[c>0] + e (codes, scale, zero), + (4+e) per outlier; dense d*e."""
    e = store.info.dtype.itemsize
    d = store.info.head_dim
    total = 0
    for seg in store.segments:
        for p in seg.k + seg.v:
            if isinstance(p, Dense):
                total += p.n * d * e
                continue
            c = p.nbits
            total += p.n * ((4 * math.ceil(d / (32 // c)) + e) if c else 0) + p.n * e + p.n_outliers() * (4 + e)
    return total


@pytest.mark.parametrize("level", ["head", "layer"])
@pytest.mark.parametrize("mode", ["faithful", "fixed"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_round_trip_and_bytes(level, mode, dtype):
    torch.manual_seed(3)
    H, T, d = 2, 24, 16
    k = torch.randn(H, T, d) * torch.exp(2 * torch.randn(1, T, 1))  # ranges vary per token: many bit widths
    v = torch.randn(H, T, d) * torch.exp(torch.randn(1, T, 1))
    stats = PrefillStats(last_n=torch.rand(H, 2, 5, T) ** 4)
    store = make_store(k, v, dtype=dtype)
    m = Qaq(level=level, mode=mode, n_min=0, n_max=8, err=1.0)
    m.on_prefill(store, stats)
    st = store.state["qaq"]
    rows = rows_by_pos(store)
    for name, x, j in (("k", k, 0), ("v", v, 1)):
        bits = st[f"prefill_{name}_bits"].long()
        assert bits.unique().numel() > 2
        xs = x.to(dtype)
        g = xs.reshape(H * T, d) if level == "head" else xs.transpose(0, 1).reshape(T, H * d)
        q = quantize_groups(g, bits, 0.01, mode)
        ref = q.fake.reshape(H, T, d) if level == "head" else q.fake.reshape(T, H, d).transpose(0, 1)
        got = torch.stack([torch.stack([rows[(h, t)][j] for t in range(T)]) for h in range(H)])
        # equal up to float rounding at the group's magnitude: the reference rounds q*s and q*s+mu in the cache dtype,
        # we round zero = mu - 2^(n-1) s to the cache dtype; each <= 1/2 ulp of <= 2 max|x|
        mag = g.float().abs().amax(-1)
        mag = mag.reshape(H, T, 1) if level == "head" else mag.reshape(1, T, 1)
        assert ((got - ref.float()).abs() <= 3 * mag * (2**-10 if dtype == torch.float16 else 2**-23)).all()
        codes = codes_by_pos(store, j)  # and the packed codes are the reference's codes, exactly
        want = q.codes.reshape(H, T, d) if level == "head" else q.codes.reshape(T, H, d).transpose(0, 1)
        for (h, t), c in codes.items():
            assert torch.equal(c, want[h, t] % (1 << max(1, bits.max().item())))
    n_out = 2 * (2 if level == "head" else 1) * H * T  # N=16: min+max per row; N=32: k_lo=1, k_hi=31
    assert store.n_outliers() == n_out
    assert store.nbytes() == expected_bytes(store)
    # the same bytes from the chosen bit widths alone: per (token, head) row and tensor, c = container(bits)
    e, G = dtype.itemsize, (1 if level == "head" else H)
    per_row = [4 * math.ceil(d / (32 // c)) + 2 * e if c else e for c in (b if b < 5 else 8 for b in range(9))]
    rows_bytes = sum(per_row[int(b)] * G for name in "kv" for b in st[f"prefill_{name}_bits"])
    assert store.nbytes() == rows_bytes + n_out * (4 + e)
    kinds = {type(p) for s in store.segments for p in s.k + s.v}
    assert kinds == {TokenQuant}


def test_target_and_reference_accounting():
    k, v, stats = alloc_case()
    store = make_store(k, v)
    Qaq(n=2, outliers=0.0, target="v").on_prefill(store, stats)
    assert all(isinstance(p, Dense) for s in store.segments for p in s.k)
    assert all(isinstance(p, TokenQuant) for s in store.segments for p in s.v)
    acc = qaq_reference_accounting([store])
    elems = 2 * 8
    v_mean = sum([3, 2, 1, 0, 1, 4, 2, 2, 2, 2, 2, 4]) / 12
    assert acc["avg_bits_k"] == 16 and acc["key_size"] == 16 * elems
    assert acc["value_size"] == pytest.approx(v_mean * elems + 2 * 16 * 2)
    assert acc["compression_ratio"] == pytest.approx(16 * elems / ((16 * elems + v_mean * elems + 64) / 2))
    store2 = make_store(k, v)
    Qaq(n=2, outliers=0.01, level="layer").on_prefill(store2, stats)
    acc2 = Qaq.reference_accounting([store2])
    assert acc2["avg_bits_k"] == pytest.approx(17 / 6 * 0.99 + 0.16)
    assert acc2["key_size"] == pytest.approx(acc2["avg_bits_k"] * elems + 2 * 16 * 1)


# -- decode-time rule ---------------------------------------------------------------------------------------------
def step_stats(store: LayerStore, amax: dict[int, float]) -> StepStats:
    mx = [torch.tensor([amax.get(p, 0.0) for p in s.aux["pos"].tolist()]) for s in store.segments]
    return StepStats(mx, mx, mx, 1)


def test_decode_rule_running_max():
    k, v, stats = alloc_case()
    store = make_store(k, v)
    m = Qaq(n=2, outliers=0.0, decode_batch=1)
    m.on_prefill(store, stats)
    new_k, new_v = ramp(2.0).expand(2, 1, 8), ramp(30.0).expand(2, 1, 8)
    store.append(new_k, new_v, torch.tensor([6]))
    m.on_append(store, step_stats(store, {6: 1.0}))
    dense = [s for s in store.segments if isinstance(s.k[0], Dense)]
    assert len(dense) == 1 and dense[0].aux["pos"].tolist() == [6, 6] and dense[0].aux["qaq_obs"].tolist() == [1, 1]
    store.append(new_k, new_v, torch.tensor([7]))
    m.on_append(store, step_stats(store, {6: 0.2, 7: 0.3}))
    # pos 6 saw 2 queries: quantized at T=8 with running max a=1: values ceil(log2(30/(2*3.674)+1)) = 3 bits
    # (the last step alone, a=0.2, would give 1); keys M_key(8)=0.5096: ceil(log2(2/1.019+1)) = 2 bits
    st = store.state["qaq"]
    assert st["decode_v_bits"].tolist() == [3, 3] and st["decode_k_bits"].tolist() == [2, 2]
    dense = [s for s in store.segments if isinstance(s.k[0], Dense)]
    assert len(dense) == 1 and dense[0].aux["pos"].tolist() == [7, 7]
    rows = rows_by_pos(store)
    assert torch.allclose(rows[(0, 6)][1], fake_quant(ramp(30.0)[None], 3)[0], atol=1e-6)
    assert torch.equal(rows[(1, 7)][0], new_k[1, 0])  # still dense
    assert dense[0] is store.segments[-1]


@pytest.mark.parametrize("level,mode,merge_rows", [("head", "faithful", 64), ("head", "fixed", 2),
                                                    ("layer", "faithful", 2), ("layer", "fixed", 64)])
def test_end_to_end_tiny_llama(level, mode, merge_rows, monkeypatch):
    monkeypatch.setattr("methods.qaq.MERGE_ROWS", merge_rows)
    model = tiny_llama()
    ids = torch.randint(0, 128, (1, 40), generator=torch.Generator().manual_seed(0))
    method = Qaq(level=level, mode=mode, n=5, decode_batch=1)
    cache, logits = run_cache(model, method, ids, n_decode=10)
    assert all(torch.isfinite(lg).all() for lg in logits)
    for layer in cache.layers:
        store = layer.store
        rows = rows_by_pos(store)
        assert len(rows) == 2 * 50
        assert any(isinstance(p, TokenQuant) for s in store.segments for p in s.k + s.v)
        resid = store.segments[-1]
        assert isinstance(resid.k[0], Dense) and sorted(set(resid.aux["pos"].tolist())) == [46, 47, 48, 49]
        assert all(not isinstance(p, Dense) for s in store.segments[:-1] for p in s.k + s.v)
        widths = [s.k[0].nbits for s in store.segments[:-1]]
        assert max(widths.count(w) for w in widths) <= 2  # a large and a small (decode) segment per key width
        n_dec = store.state["qaq"]["decode_k_bits"].numel()
        assert n_dec == 6 * (2 if level == "head" else 1)  # positions 40..45 have seen 5 queries
    assert cache.nbytes() < 0.6 * sum(layer.store.seen * 2 * 2 * 16 * 4 for layer in cache.layers)
    assert 1 < Qaq.reference_accounting([layer.store for layer in cache.layers])["compression_ratio"] < 16


def test_end_to_end_fp16_cache():
    model = tiny_llama()
    ids = torch.randint(0, 128, (1, 30), generator=torch.Generator().manual_seed(2))
    cache, logits = run_cache(model, Qaq(level="layer", q_norm="measured", n_max=8), ids, n_decode=8,
                              kv_dtype=torch.float16)
    assert all(torch.isfinite(lg).all() for lg in logits)
    store = cache.layers[1].store
    assert all(p.zero.dtype == torch.float16 for s in store.segments for p in s.k + s.v if isinstance(p, TokenQuant))
    assert store.state["qaq"]["q_norm"] > 0 and len(rows_by_pos(store)) == 2 * 38


def test_end_to_end_uniform_and_dense_decode():
    model = tiny_llama()
    ids = torch.randint(0, 128, (1, 12), generator=torch.Generator().manual_seed(1))
    cache, logits = run_cache(model, parse_spec("qaq:attention=false,bits=3,decode=dense,target=k"), ids, n_decode=3)
    assert all(torch.isfinite(lg).all() for lg in logits)
    store = cache.layers[0].store
    assert store.segments[0].k[0].nbits == 3 and isinstance(store.segments[0].v[0], Dense)
    assert store.segments[-1].aux["pos"].tolist() == [12, 13, 14] * 2  # generated tokens stay dense


# -- spec ----------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("spec", ["qaq:level=token", "qaq:q_norm=abc", "qaq:q_norm=-1", "qaq:n_min=3,n_max=2",
                                  "qaq:n_max=9", "qaq:bits=9", "qaq:outliers=0.6", "qaq:n=0", "qaq:err=0",
                                  "qaq:mode=paper", "qaq:target=q", "qaq:level=block"])
def test_spec_errors(spec):
    with pytest.raises(SpecError):
        parse_spec(spec)


def test_spec_defaults_and_level_token_message():
    assert parse_spec("qaq").spec() == ("qaq:err=3,n=5,n_min=0,n_max=4,outliers=0.01,q_norm=300,level=head,"
                                        "mode=faithful,attention=true,bits=2,target=kv,decode=quantize,decode_batch=8")
    assert parse_spec("qaq:q_norm=300.0").q_norm == "300"
    with pytest.raises(SpecError, match="all layers"):
        Qaq(level="token")


def test_decode_batch_packs_ready_rows_together():
    """decode_batch=B: ready rows stay dense until B per head are ready, then are packed at once."""
    model = tiny_llama()
    ids = torch.randint(0, 128, (1, 40), generator=torch.Generator().manual_seed(3))
    cache, _ = run_cache(model, Qaq(n=2, decode_batch=4), ids, n_decode=6)
    for layer in cache.layers:
        resid = layer.store.segments[-1]
        assert isinstance(resid.k[0], Dense)
        # generated rows 40..45; rows 40..44 have been seen by >= 2 queries (ready): 40..43 were packed as one
        # batch of 4, 44 waits for its batch, 45 is not ready yet
        dense_pos = sorted(set(resid.aux["pos"].tolist()))
        assert dense_pos == [44, 45]
        assert layer.store.state["qaq"]["decode_k_bits"].numel() == 4 * 2
