"""The cache interface: full reproduces plain transformers; formats and stores hold real packed tensors."""

from __future__ import annotations

import pytest
import torch

import methods
from kernels import reference as ref
from methods.formats import Dense, first_rows_mask, head_cat, quantize_channels, quantize_tokens
from methods.store import Segment
from tests.tinymodel import run_cache, tiny_llama


@pytest.mark.parametrize("heads,kv_heads", [(4, 4), (4, 2), (6, 2)])
def test_full_reproduces_transformers_logits(heads, kv_heads):
    """Prefill, then a 6-token chunk in one forward (causal among the new tokens), then 20 decode steps."""
    model = tiny_llama(heads, kv_heads, layers=3)
    ids = torch.randint(0, 128, (1, 57), generator=torch.Generator().manual_seed(1))
    chunk = [5, 77, 12, 9, 100, 3]
    with torch.no_grad():
        ref_out = model(ids, use_cache=True)
        pkv = ref_out.past_key_values
        logits = [ref_out.logits]
        logits.append(model(torch.tensor([chunk]), past_key_values=pkv, use_cache=True).logits)
        toks = []
        for _ in range(20):
            t = int(logits[-1][0, -1].argmax())
            toks.append(t)
            o = model(torch.tensor([[t]]), past_key_values=pkv, use_cache=True)
            logits.append(o.logits)
    cache, ours = run_cache(model, methods.parse_spec("full"), ids, n_decode=20, tokens=toks, chunk=chunk)
    assert len(ours) == 22
    for a, b in zip(ours, logits):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)
    assert cache.kept_rows() == cache.seen_rows() == 3 * kv_heads * (57 + 6 + 20)
    # fp32 rows: 4 bytes x (K + V) x head_dim per row
    assert cache.nbytes() == cache.kept_rows() * 2 * 16 * 4


def test_pack_roundtrip_every_width():
    g = torch.Generator().manual_seed(0)
    for bits in ref.SUPPORTED_BITS:
        codes = torch.randint(0, 2**bits, (7, 37), generator=g)
        words = ref.pack(codes, bits)
        assert words.dtype == torch.int32 and words.shape[-1] == ref.packed_words(37, bits)
        assert torch.equal(ref.unpack(words, bits, 37), codes)


def _kivi_reference(x: torch.Tensor, bits: int, group: int, axis: str) -> torch.Tensor:
    """METHODS.md §2 written out plainly: per-group min/max, clamp then round."""
    x = x.float()
    if axis == "channel":  # groups of `group` tokens per channel
        x = x.T
    n, d = x.shape
    g = x.reshape(n, d // group, group)
    mn, mx = g.amin(-1, keepdim=True), g.amax(-1, keepdim=True)
    scale = (mx - mn) / (2**bits - 1)
    q = torch.round(torch.clamp((g - mn) / scale, 0, 2**bits - 1))
    out = (q * scale + mn).reshape(n, d)
    return out.T if axis == "channel" else out


@pytest.mark.parametrize("bits", [2, 4])
def test_kivi_formats_match_reference_and_bytes(bits):
    g = torch.Generator().manual_seed(bits)
    x = torch.randn(3 * 64, 32, generator=g)  # 3 heads x 64 tokens, head_dim 32
    counts = (64, 64, 64)
    tq = quantize_tokens(x, counts, bits, 16, torch.float16)
    torch.testing.assert_close(tq.dequant(), _kivi_reference(x, bits, 16, "token"), atol=2e-3, rtol=1e-3)
    cq = quantize_channels(x, counts, bits, 32, torch.float16)
    want = torch.cat([_kivi_reference(x[h * 64:(h + 1) * 64], bits, 32, "channel") for h in range(3)])
    # reference blocks are per head: each head's 64 tokens are 2 blocks of 32
    want = torch.cat([torch.cat([_kivi_reference(x[h * 64 + b * 32:h * 64 + (b + 1) * 32], bits, 32, "channel")
                                 for b in range(2)]) for h in range(3)])
    torch.testing.assert_close(cq.dequant(), want, atol=2e-3, rtol=1e-3)
    n_el = x.numel()
    # METHODS.md §2: b bits per element + 2 x 16 bits per group of G
    assert tq.nbytes() * 8 == n_el * bits + 2 * 16 * n_el // 16
    assert cq.nbytes() * 8 == n_el * bits + 2 * 16 * n_el // 32


@pytest.mark.parametrize("counts,n_first", [((5, 5, 5), (2, 2, 2)), ((5, 5, 5), (0, 0, 0)), ((5, 5, 5), (5, 5, 5)),
                                             ((4, 0, 7, 1), (1, 0, 7, 0)), ((3, 6), (3, 2)), ((6,), (6,)), ((6,), (2,)),
                                             ((), ())])
def test_split_first_is_the_mask_selection(counts, n_first):
    """``Dense.split_first`` (host slicing, no device sync) gives exactly the rows and counts of selecting
    ``first_rows_mask`` and its complement, for equal and ragged heads, one head or none, nothing or everything
    first; and like the selection it never returns a view of the part's storage (a view, even an empty one, would
    keep the old rows alive outside the store's byte count)."""
    x = torch.randn(sum(counts), 8, generator=torch.Generator().manual_seed(sum(counts)))
    part = Dense(x, counts)
    mask = first_rows_mask(counts, n_first, x.device)
    first, rest = part.split_first(n_first)
    want_first, want_rest = part.select(mask), part.select(~mask)
    assert torch.equal(first.x, want_first.x) and first.counts == want_first.counts == n_first
    assert torch.equal(rest.x, want_rest.x) and rest.counts == want_rest.counts
    base = x.untyped_storage().data_ptr()
    for got in (first, rest):
        assert got.x.numel() == 0 or got.x.untyped_storage().data_ptr() != base
        assert got.x.untyped_storage().nbytes() == got.x.numel() * got.x.element_size()
    if counts:
        with pytest.raises(ValueError):
            part.split_first(tuple(c + 1 for c in counts))


def test_kivi_store_layout_and_nbytes_formula():
    """After prefill of T tokens: keys T - T%R quantized, values T - R quantized, the rest fp16 (METHODS.md §2)."""
    model = tiny_llama(4, 2, layers=2, head_dim=32)
    T, R, G, b = 150, 64, 32, 2
    ids = torch.randint(0, 128, (1, T), generator=torch.Generator().manual_seed(2))
    cache, logits = run_cache(model, methods.parse_spec(f"kivi:bits={b},group={G},residual={R}"), ids,
                              n_decode=3, kv_dtype=torch.float16)
    seen = T + 3
    for layer in cache.layers:
        (seg,) = layer.store.segments
        kq = seen - seen % R
        vq = seen - R
        assert seg.k[0].counts == (kq, kq) and seg.k[1].counts == (seen - kq, seen - kq)
        assert seg.v[0].counts == (vq, vq) and seg.v[1].counts == (R, R)
        d, h = 32, 2
        want = h * d * (kq * b + 2 * 16 * kq // G) + h * d * (vq * b + 2 * 16 * vq // G) \
            + h * d * 16 * ((seen - kq) + R)
        assert layer.store.nbytes() * 8 == want
    assert all(torch.isfinite(x).all() for x in logits)


def test_streaming_keeps_sinks_and_window_every_layer_every_step():
    model = tiny_llama(4, 2, layers=3)
    T = 80
    ids = torch.randint(0, 128, (1, T), generator=torch.Generator().manual_seed(3))
    meth = methods.parse_spec("streaming:budget=20,sinks=4")
    cache, _ = run_cache(model, meth, ids, n_decode=0)
    for step in range(12):
        for layer in cache.layers:
            pos = sorted(layer.store.all_rows("pos").tolist())
            seen = layer.store.seen
            expect = sorted(list(range(4)) * 2 + list(range(seen - 16, seen)) * 2)
            assert pos == expect, (step, layer.info.layer)
        with torch.no_grad():
            model(torch.tensor([[5]]), past_key_values=cache, position_ids=torch.tensor([[T + step]]), use_cache=True)


def test_ragged_heads_attention_matches_dense_reference():
    """Per-head different token sets: attention over segments equals a per-head softmax computed by hand."""
    from kernels.reference import merge_partials
    from methods.attention import segment_partials

    g = torch.Generator().manual_seed(4)
    counts = (5, 9, 1)
    k = torch.randn(sum(counts), 8, generator=g)
    v = torch.randn(sum(counts), 8, generator=g)
    k2 = torch.randn(6, 8, generator=g)
    v2 = torch.randn(6, 8, generator=g)
    segs = [Segment([Dense(k, counts)], [Dense(v, counts)]), Segment([Dense(k2, (2, 2, 2))], [Dense(v2, (2, 2, 2))])]
    q = torch.randn(3, 4, 8, generator=g)  # 3 KV heads x (2 q heads x 2 queries)
    parts = segment_partials(q, segs, 0.3)
    out, _ = merge_partials([p[0] for p in parts], [p[1] for p in parts])
    kk = head_cat(k, counts, k2, (2, 2, 2))
    vv = head_cat(v, counts, v2, (2, 2, 2))
    off = 0
    for h, c in enumerate(counts):
        kh, vh = kk[off:off + c + 2], vv[off:off + c + 2]
        off += c + 2
        want = torch.softmax(q[h] @ kh.T * 0.3, -1) @ vh
        torch.testing.assert_close(out[h], want, atol=1e-5, rtol=1e-5)


def test_spec_parsing_and_errors():
    ms = methods.parse_specs("full,kivi:bits=4,group=16,residual=32,streaming:budget=0.1")
    assert [m.spec() for m in ms] == ["full", "kivi:bits=4,group=16,residual=32", "streaming:budget=0.1,sinks=4"]
    for bad in ["nope", "kivi:bits=5", "kivi:bitz=2", "kivi:bits", "kivi:residual=30", "streaming:budget=0",
                "streaming:budget=1.5", "full+kivi", ""]:
        with pytest.raises(methods.SpecError) as e:
            methods.parse_specs(bad)
        assert "\n" not in str(e.value)
