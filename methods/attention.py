"""Attention over a compressed layer store, registered with transformers' ``AttentionInterface``.

For each segment the function computes a partial output and its log-sum-exp, then merges the partials exactly
(the flash-decoding merge). The plain-torch path dequantizes; on CUDA the Triton kernels in :mod:`kernels` read the
packed bytes directly (:func:`triton_attend`). The same pass produces the statistics policies declare
(:mod:`methods.stats`), so the main prefill pass stays on SDPA.

The prefill of an empty store runs SDPA over the fresh keys and values (full precision, like KIVI and kvpress), then
hands them to the method, which compresses them before the next layer runs: peak memory never holds the full
uncompressed cache of all layers.
"""

from __future__ import annotations

import contextvars

import torch
import torch.nn.functional as F

from kernels import reference as ref
from methods.formats import head_offsets
from methods.stats import Needs, PrefillStats, StepStats

ATTN_NAME = "kvcompress"
ACTIVE_LAYER: contextvars.ContextVar = contextvars.ContextVar("kvcompress_active_layer", default=None)
COLSUM_CHUNK = 512


def pad_by_head(x: torch.Tensor, counts: tuple[int, ...]) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Head-grouped rows ``[n, ...]`` -> ``[H, max_count, ...]`` and a validity mask (None when not ragged)."""
    h = len(counts)
    m = max(counts) if counts else 0
    if all(c == m for c in counts):
        return x.reshape(h, m, *x.shape[1:]), None
    out = x.new_zeros((h, m, *x.shape[1:]))
    valid = torch.zeros(h, m, dtype=torch.bool, device=x.device)
    off = head_offsets(counts)
    for i, c in enumerate(counts):
        out[i, :c] = x[off[i]:off[i + 1]]
        valid[i, :c] = True
    return out, valid


def _reduce_rows(p: torch.Tensor, g: int, lq: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``p [H_kv, g*lq, N]`` -> (sum, max, last) over the group's heads and queries, each ``[H_kv, N]``."""
    p4 = p.reshape(p.shape[0], g, lq, p.shape[-1])
    return p4.sum((1, 2)), p4.amax((1, 2)), p4[:, :, -1].sum(1)


def segment_partials(q: torch.Tensor, segments, scale: float):
    """Reference partial attention of grouped queries ``q [H_kv, M, d]`` over each segment (dequantizes).

    Returns a list of ``(out, lse, scores, counts)`` with padded per-head scores ``[H_kv, M, n_max]``.
    """
    parts = []
    for seg in segments:
        counts = seg.counts
        k, v = seg.dequant()
        kp, valid = pad_by_head(k, counts)
        vp, _ = pad_by_head(v, counts)
        mask = None if valid is None else valid.unsqueeze(1)
        out, lse, s = ref.partial_attention(q, kp, vp, scale, mask)
        parts.append((out, lse, s, counts))
    return parts


def reference_attend(q: torch.Tensor, segments, scale: float, lq: int, want: bool):
    """Exact attention of grouped queries ``q [H_kv, g*lq, d]`` over every segment (plain torch).

    The step's ``lq`` tokens are already stored: they are the last ``lq`` rows of every head of the last segment, and
    query token ``i`` sees new token ``j`` only if ``j <= i``. Per KV head, the head's rows of every segment
    (dequantized) form one key set and one softmax (the same function as per-segment partials merged by their
    log-sum-exps, with far fewer small operations on CPU). Returns ``(out [H_kv, g*lq, d], seg_stats)`` where, when
    ``want``, ``seg_stats[i]`` is the (sum, max, last) row statistics of segment ``i`` (head-grouped).
    """
    hk, m, d = q.shape
    g = m // lq
    deq = [seg.dequant() for seg in segments]
    offs = [head_offsets(seg.counts) for seg in segments]
    tail = None
    if lq > 1:
        qtok = torch.arange(m, device=q.device) % lq
        tail = torch.arange(lq, device=q.device)[None, :] > qtok[:, None]  # [M, lq] True = hidden
    outs, probs = [], []
    qf = q.float()
    for h in range(hk):
        ks = [k[o[h]:o[h + 1]] for (k, _), o in zip(deq, offs)]
        vs = [v[o[h]:o[h + 1]] for (_, v), o in zip(deq, offs)]
        s = qf[h] @ torch.cat(ks).T * scale  # [M, n_h]
        if tail is not None:
            s[:, -lq:] = s[:, -lq:].masked_fill(tail, float("-inf"))
        p = torch.softmax(s, dim=-1)
        outs.append(p @ torch.cat(vs))
        if want:
            probs.append(torch.split(p, [x.shape[0] for x in ks], dim=-1))
    out = torch.stack(outs)
    if not want:
        return out, None

    def reduce(cols: list[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        red = [_reduce_rows(c.unsqueeze(0), g, lq) for c in cols]  # per head: ([1, n], [1, n], [1, n])
        return tuple(torch.cat([r[j][0] for r in red]) for j in range(3))

    return out, [reduce([probs[h][i] for h in range(hk)]) for i in range(len(segments))]


def _ranges(parts) -> list[list[tuple[int, int]]]:
    """Per part, per head: the (begin, end) of its rows within the head's rows of the segment."""
    acc = [0] * len(parts[0].counts)
    out = []
    for p in parts:
        out.append([(a, a + c) for a, c in zip(acc, p.counts)])
        acc = [a + c for a, c in zip(acc, p.counts)]
    return out


def segment_pairs(seg):
    """Split a segment into (K part, V part) pairs over aligned row ranges.

    K and V parts may split a head's rows at different points (KIVI: keys leave the residual in blocks, values one
    by one). Each returned ``(k_part, v_part, k_start, v_start, count, col)`` covers, per head, the rows where one K
    part and one V part overlap; starts are row offsets inside each part, ``col`` the offset of the first row within
    the head's rows of the segment. Pairs come in row order within every head.
    """
    kr, vr = _ranges(seg.k), _ranges(seg.v)
    pairs = []
    for kp, kh in zip(seg.k, kr):
        for vp, vh in zip(seg.v, vr):
            lo = [max(a[0], b[0]) for a, b in zip(kh, vh)]
            cnt = [max(0, min(a[1], b[1]) - x) for a, b, x in zip(kh, vh, lo)]
            if any(cnt):
                pairs.append((kp, vp, [x - a[0] if c else 0 for x, a, c in zip(lo, kh, cnt)],
                              [x - b[0] if c else 0 for x, b, c in zip(lo, vh, cnt)], cnt,
                              [x if c else 0 for x, c in zip(lo, cnt)]))
    return pairs


class SegmentPlan:
    """A segment prepared for the Triton kernels: its part-pairs as plans, kept while its parts are the same.

    ``nmax`` is its widest head (score-buffer columns) and ``index`` (ragged segments only) picks its head-grouped
    rows out of a ``[H, nmax]`` block flattened.
    """

    def __init__(self, seg, device: torch.device):
        from kernels.dispatch import outlier_csr
        from kernels.triton_attention import PairPlan
        from kernels.triton_tiles import PartSpec

        self.parts = tuple(seg.k) + tuple(seg.v)
        self.plans = []
        for kp, vp, ks, vs, cnt, col in segment_pairs(seg):
            ko, vo = head_offsets(kp.counts), head_offsets(vp.counts)
            self.plans.append(PairPlan(PartSpec(kp, outlier_csr(kp)), PartSpec(vp, outlier_csr(vp)),
                                       [o + x for o, x in zip(ko, ks)], [o + x for o, x in zip(vo, vs)], cnt, col,
                                       device=device))
        counts = seg.counts
        self.nmax = max(counts)
        self.index = None
        if len(set(counts)) > 1:
            self.index = torch.cat([torch.arange(c) + h * self.nmax for h, c in enumerate(counts)]).to(device)

    def fits(self, seg) -> bool:
        parts = tuple(seg.k) + tuple(seg.v)
        return len(parts) == len(self.parts) and all(a is b for a, b in zip(parts, self.parts))


def triton_attend(q: torch.Tensor, segments, scale: float, lq: int, want: bool, cache: dict | None = None):
    """Fused Triton attention over every part-pair of every segment, merged; reads the packed bytes directly.

    Same contract as :func:`reference_attend` (the step's tokens are the last ``lq`` rows of each head of the last
    segment). ``cache`` maps ``id(segment)`` to its :class:`SegmentPlan` and is pruned to the current segments, so
    a decode step rebuilds plans only for segments whose parts changed.
    """
    from kernels.triton_attention import attend_pairs

    hk, m, _ = q.shape
    g = m // lq
    cache = {} if cache is None else cache
    seg_plans, plans, base = [], [], 0
    for seg in segments:
        sp = cache.get(id(seg))
        if sp is None or not sp.fits(seg):
            sp = SegmentPlan(seg, q.device)
        seg_plans.append(sp)
        for p in sp.plans:
            p.col_base, p.newr = base, 0
            plans.append(p)
        base += sp.nmax
    plans[-1].newr = lq
    cache.clear()
    cache.update({id(seg): sp for seg, sp in zip(segments, seg_plans)})
    scores = torch.full((hk, m, base), float("-inf"), device=q.device) if want else None
    out, lse = attend_pairs(q, plans, scale, scores, lq)
    if not want:
        return out, None
    red = torch.stack(_reduce_rows(torch.exp(scores - lse.unsqueeze(-1)), g, lq))  # [3, H, base]
    stats, base = [], 0
    for sp in seg_plans:
        block = red[:, :, base:base + sp.nmax].reshape(3, -1)
        if sp.index is not None:
            block = block[:, sp.index]
        stats.append(tuple(block))
        base += sp.nmax
    return out, stats


def prefill_stats(q: torch.Tensor, k: torch.Tensor, scale: float, needs: Needs) -> PrefillStats:
    """Statistics of a causal prefill. ``q [H_q, T, d]``, ``k [H_kv, T, d]``. The column sums of fp16 / bf16 inputs
    run in the Triton kernels of :mod:`kernels.triton_colsum` where attention does (:func:`use_triton`); float32
    inputs and other backends take plain torch (Triton's IEEE float32 ``dot`` runs without tensor cores: 251 ms
    for one 4k layer of 32 / 8 heads on an H100, where the float32 reference took 6.6 ms on fp16 inputs, which it
    upcasts)."""
    hq, T, d = q.shape
    hk = k.shape[0]
    stats = PrefillStats()
    if needs.last_n:
        n = min(needs.last_n, T)
        s = torch.einsum("hgnd,htd->hgnt", q[:, T - n:].float().reshape(hk, hq // hk, n, d), k.float()) * scale
        qpos = torch.arange(T - n, T, device=q.device)
        causal = torch.arange(T, device=q.device)[None, :] <= qpos[:, None]
        stats.last_n = torch.softmax(s.masked_fill(~causal, float("-inf")), dim=-1)
    if needs.colsum:
        if q.dtype in (torch.float16, torch.bfloat16) and use_triton(q.device):
            from kernels import triton_colsum

            stats.colsum = triton_colsum.causal_colsum(q, k, scale)
        else:
            stats.colsum = ref.causal_colsum(q, k, scale, COLSUM_CHUNK)
    if needs.qnorm:
        stats.qnorm2 = q.float().pow(2).sum(-1)
    return stats


class LayerAttention:
    """The per-layer compute: attend over the store, gather statistics, hand new rows to the method."""

    def __init__(self, store, method):
        self.store = store
        self.method = method
        self.needs = method.needs()
        self.plans: dict = {}  # id(segment) -> SegmentPlan, for the Triton path

    def __call__(self, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, scale: float) -> torch.Tensor:
        if query.shape[0] != 1:
            raise NotImplementedError("the compressed cache runs one sequence at a time (batch size 1)")
        q, k, v = query[0], key[0], value[0]
        store = self.store
        if not store.segments:
            out = self._prefill(q, k, v, scale)
        else:
            out = self._step(q, k, v, scale)
        self.method.check_budget(store)
        return out.unsqueeze(0).transpose(1, 2).to(query.dtype)  # [1, Lq, H_q, d]

    def _prefill(self, q, k, v, scale):
        hq, T, d = q.shape
        hk = k.shape[0]
        out = F.scaled_dot_product_attention(q.unsqueeze(0), k.unsqueeze(0), v.unsqueeze(0), is_causal=True,
                                             scale=scale, enable_gqa=hq != hk)[0]
        stats = prefill_stats(q, k, scale, self.needs)
        pos = torch.arange(self.store.seen, self.store.seen + T, device=q.device)
        self.store.append(k.to(self.store.info.dtype), v.to(self.store.info.dtype), pos)
        self.method.on_prefill(self.store, stats)
        return out

    def _step(self, q, k, v, scale):
        hq, lq, d = q.shape
        hk = k.shape[0]
        store = self.store
        pos = torch.arange(store.seen, store.seen + lq, device=q.device)
        store.append(k.to(store.info.dtype), v.to(store.info.dtype), pos)
        qg = q.reshape(hk, (hq // hk) * lq, d)
        want = self.needs.step
        if use_triton(q.device):
            out, seg_stats = triton_attend(qg, store.segments, scale, lq, want, self.plans)
        else:
            out, seg_stats = reference_attend(qg, store.segments, scale, lq, want)
        stats = None
        if want:
            stats = StepStats([r[0] for r in seg_stats], [r[1] for r in seg_stats], [r[2] for r in seg_stats], lq)
        self.method.on_append(store, stats)
        # plans keep their parts alive: drop those of segments the method replaced, so memory is the store's alone
        live = {id(seg): seg for seg in store.segments}
        self.plans = {k: sp for k, sp in self.plans.items() if k in live and sp.fits(live[k])}
        return out.reshape(hq, lq, d)


def compressed_attention(module, query, key, value, attention_mask, scaling=None, dropout=0.0, **kwargs):
    """``AttentionInterface`` entry point: attention over the active compressed layer (see :mod:`methods.cache`)."""
    layer = ACTIVE_LAYER.get()
    if layer is None:
        raise RuntimeError(f"attn_implementation '{ATTN_NAME}' needs a CompressedCache as past_key_values")
    ACTIVE_LAYER.set(None)
    scale = scaling if scaling is not None else query.shape[-1] ** -0.5
    return layer.compute(query, key, value, scale), None


def _no_mask(*args, **kwargs):
    return None


def register() -> str:
    """Register the attention function (and a no-op mask builder) under :data:`ATTN_NAME`; idempotent."""
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface

    AttentionInterface.register(ATTN_NAME, compressed_attention)
    AttentionMaskInterface.register(ATTN_NAME, _no_mask)
    return ATTN_NAME


BACKENDS = ("auto", "reference", "triton")


def set_backend(name: str) -> None:
    """Kernel backend for attention over segments: ``auto`` (Triton on CUDA, reference elsewhere), or forced."""
    from kernels import dispatch

    if name not in BACKENDS:
        raise ValueError(f"unknown kernel backend {name!r}; choose from: {', '.join(BACKENDS)}")
    dispatch.set_backend(name)


def use_triton(device: torch.device) -> bool:
    """Whether attention on ``device`` runs the Triton kernels (needs triton importable)."""
    from kernels import dispatch

    if not dispatch.use_triton(device):
        return False
    try:
        import triton  # noqa: F401
    except ImportError:
        if dispatch.BACKEND == "triton":
            raise
        return False
    return True
