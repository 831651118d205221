"""MiKV: H2O-style importance keeps tokens at high precision; the "evicted" ones stay at 2–4 bits."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

import torch

from methods import formats
from methods.base import BudgetViolation, Method, SpecError, check_budget_param, resolve_budget
from methods.formats import Dense, Part, TokenQuant, first_rows_mask, head_cat, kept_rows, quantize_tokens
from methods.h2o import SCORE, accumulate_scores, check_share, h2o_keep, h2o_kept, resolve_share
from methods.registry import register
from methods.stats import Needs
from methods.store import LayerStore, Segment


def _part_rows(parts: list[Part], counts: tuple[int, ...]) -> list[torch.Tensor]:
    """Segment-row index of every row of every part (rows of a head: part 0's, then part 1's, ...)."""
    starts = [0]
    for c in counts:
        starts.append(starts[-1] + c)
    within = [0] * len(counts)
    out = []
    for p in parts:
        idx = [torch.arange(starts[h] + within[h], starts[h] + within[h] + c) for h, c in enumerate(p.counts)]
        out.append(torch.cat(idx) if idx else torch.zeros(0, dtype=torch.int64))
        within = [w + c for w, c in zip(within, p.counts, strict=True)]
    return out


def _cat(pieces: list[tuple[Part, torch.Tensor]]) -> tuple[Part, torch.Tensor] | None:
    """Concatenate parts head by head, carrying the segment-row index of each row along."""
    pieces = [p for p in pieces if p[0].n]
    if not pieces:
        return None
    part, idx = pieces[0]
    for p, i in pieces[1:]:
        idx = head_cat(idx, part.counts, i, p.counts)
        part = part.cat(p)
    return part, idx


@register
@dataclass
class MiKV(Method):
    """MiKV (METHODS.md §5.3): mixed precision instead of eviction, importance chosen as in H2O.

    * Importance: H2O's rule (:class:`~methods.h2o.H2O`, real-drop path): accumulated attention (prefill column
      sums plus every later query), per KV head (GQA group's query heads summed); the ``recent`` newest tokens plus
      the top heavy hitters make the important set of ``budget`` tokens per head (resolved against the prompt).
    * Important tokens are stored at ``hi_bits`` (16: dense in the cache dtype; 8: per-token INT8), the others at
      ``lo_bits`` with per-token asymmetric RTN (``scale = (max - min) / (2^b - 1)``, ``zero = min``, one pair per
      ``group`` channels, ``group=0`` = the whole head row) as real packed :class:`~methods.formats.TokenQuant`
      parts. Nothing is dropped: every head holds every token seen.
    * Decode: scores accumulate and the split is redone after every step. A token demoted from high to low precision
      is quantized then (from its stored high-precision values). A low-precision token is never promoted back: there
      is no full-precision copy of it. So the important set is exactly the set H2O would have kept with the same
      scores (H2O never brings back an evicted token either); low-precision tokens keep receiving attention (and
      keep accumulating score, which is then unused).
    * Not implemented: the outlier-aware per-channel balancer (``k_c * b_c``, ``q_c / b_c``). Keeping ``q . k``
      unchanged needs the *queries* scaled by ``1 / b_c`` inside attention; a store policy cannot change the queries
      (and the composition interface has no hook for it), so balancing only the keys would change the model.

    Memory: ``f * hi_bits + (1 - f) * lo_bits`` bits per element plus ``2 * 16 / group`` bits of (scale, zero) per
    quantized element (``f`` = important fraction); scores are per-row aux (reported by ``aux_bytes``).

    References
    ----------
    Yang et al., "No Token Left Behind: Reliable KV Cache Compression via Importance-Aware Mixed Precision
    Quantization", arXiv 2402.18096 (from the abstract and secondary summaries; see METHODS.md §5.3).
    """

    name = "mikv"
    kind = "mixed"
    paper = "Yang et al., arXiv 2402.18096"
    budget: float = field(default=0.25, metadata={"help": "important tokens per KV head: ratio of prompt or tokens"})
    recent: float = field(default=0.5, metadata={"help": "recent share of the important set (<= 1) or tokens (> 1)"})
    hi_bits: Literal[16, 8] = field(default=16, metadata={"help": "important tokens: 16 = dense, 8 = INT8 per token"})
    lo_bits: Literal[2, 3, 4] = field(default=3, metadata={"help": "the other tokens: per-token asymmetric RTN bits"})
    group: int = field(default=0, metadata={"help": "channels per (scale, zero); 0 = the whole head row"})

    def validate(self) -> None:
        super().validate()
        check_budget_param(self, self.budget)
        check_share(self, "recent", self.recent)
        if self.group < 0:
            raise SpecError(f"mikv: group={self.group} must be >= 0 (0 = the whole head row)")

    def needs(self) -> Needs:
        return Needs(colsum=True, step=True)

    def _group(self, d: int) -> int:
        g = self.group or d
        if d % g:
            raise SpecError(f"mikv: group={self.group} must divide the head dimension {d}")
        return g

    # -- hooks ----------------------------------------------------------------------------------------------------
    def on_prefill(self, store: LayerStore, stats) -> None:
        if store.state or len(store.segments) != 1:
            raise SpecError("mikv: picks its own high-precision set from every step's attention; it cannot be the "
                            "second part of a composition (use it alone)")
        self._group(store.info.head_dim)
        b = resolve_budget(self.budget, store.seen)
        store.state.update(budget=b, prefill_len=store.seen, recent=resolve_share(self.recent, b))
        store.state["heavy"] = b - store.state["recent"]
        (seg,) = store.segments
        seg.aux[SCORE] = stats.colsum.reshape(-1).to(torch.float32)
        self._resplit(store)

    def on_append(self, store: LayerStore, stats) -> None:
        accumulate_scores(store, stats, self.name)
        self._resplit(store)

    # -- the split --------------------------------------------------------------------------------------------------
    def _is_lo(self, p: Part) -> bool:
        return isinstance(p, TokenQuant) and p.nbits == self.lo_bits

    def low_mask(self, store: LayerStore) -> torch.Tensor:
        """Rows (over ``store.all_rows``) stored at ``lo_bits``."""
        masks = []
        for seg in store.segments:
            m = torch.zeros(seg.n, dtype=torch.bool)
            for p, idx in zip(seg.k, _part_rows(seg.k, seg.counts), strict=True):
                if self._is_lo(p):
                    m[idx] = True
            masks.append(m)
        return torch.cat(masks).to(store.info.device)

    def _resplit(self, store: LayerStore) -> None:
        layout = self._decode_layout(store)
        if layout is not None:
            self._resplit_layout(store, *layout)
            return
        lo = self.low_mask(store)
        hi = h2o_keep(store, cand=~lo)  # never promote a low-precision row
        to_lo = lo | ~hi
        for i, (seg, m) in enumerate(zip(store.segments, store.split_rows(to_lo), strict=True)):
            store.segments[i] = self._repack(seg, m.cpu(), store.info.dtype, store.info.head_dim)

    def _decode_layout(self, store: LayerStore) -> tuple[Part | None, Dense, Part | None, Dense] | None:
        """``(low K, high K, low V, high V)`` when the store is what :meth:`_repack` leaves plus the folded new rows:
        one segment whose K and V are ``[low part, dense part]`` (or the dense part alone), every head holding the
        same rows of each (``hi_bits=16``). ``None`` for anything else (the general path takes it)."""
        if self.hi_bits != 16 or len(store.segments) != 1:
            return None
        seg = store.segments[0]
        if len(seg.k) != len(seg.v) or len(seg.k) not in (1, 2) or SCORE not in seg.aux:
            return None
        (*lo_k, hi_k), (*lo_v, hi_v) = seg.k, seg.v
        lk, lv = (lo_k[0], lo_v[0]) if lo_k else (None, None)
        if not (isinstance(hi_k, Dense) and isinstance(hi_v, Dense)) or len(set(hi_k.counts)) != 1:
            return None
        if lk is not None and not (self._is_lo(lk) and self._is_lo(lv) and len(set(lk.counts)) == 1):
            return None
        return lk, hi_k, lv, hi_v

    def _resplit_layout(self, store: LayerStore, lk: Part | None, hk: Dense, lv: Part | None, hv: Dense) -> None:
        """:meth:`_resplit` for :meth:`_decode_layout`'s layout, with every count known on the host: the low rows of
        a head are its first ``n_lo``; H2O keeps :func:`~methods.h2o.h2o_kept` of its ``n_hi`` high rows (the recent
        rows are all high: a row is recent from its first step on, so it was never demoted); the others are quantized
        and appended to the low part. Same parts, order and aux as :meth:`_repack`, without a device sync."""
        seg = store.segments[0]
        h, n_lo, n_hi = len(seg.counts), (lk.counts[0] if lk is not None else 0), hk.counts[0]
        n = n_lo + n_hi
        lo = first_rows_mask(seg.counts, (n_lo,) * h, seg.aux[SCORE].device)
        keep = h2o_keep(store, cand=~lo).reshape(h, n)[:, n_lo:].reshape(-1)  # over the high part's rows
        kept = h2o_kept(store, n_hi)
        if kept == n_hi:
            if formats.CHECK_KEPT:
                assert bool(keep.all()), "mikv: every high row kept, but the mask drops some"
            return
        rows_hi, kept_c = kept_rows(keep, hk.counts, (kept,) * h)
        rows_lo, lo_c = kept_rows(~keep, hk.counts, (n_hi - kept,) * h)
        g, dtype = self._group(store.info.head_dim), store.info.dtype
        new = []
        for low, high in ((lk, hk), (lv, hv)):
            demoted = quantize_tokens(high.x[rows_lo].float(), lo_c, self.lo_bits, g, dtype)
            new.append([demoted if low is None else low.cat(demoted), Dense(high.x[rows_hi], kept_c)])
        aux = {}
        for name, a in seg.aux.items():
            a = a.reshape(h, n)
            a_hi = a[:, n_lo:].reshape(-1)
            aux[name] = torch.cat([a[:, :n_lo], a_hi[rows_lo].reshape(h, -1), a_hi[rows_hi].reshape(h, -1)], 1) \
                .reshape(-1)
        store.segments[0] = Segment(new[0], new[1], aux)

    def _repack(self, seg: Segment, to_lo: torch.Tensor, dtype: torch.dtype, d: int) -> Segment:
        """Rebuild a segment as [low part, high part]: demoted rows are quantized, kept packed rows stay as they are."""
        g = self._group(d)
        orders, new = [], []
        for parts in (seg.k, seg.v):
            lo_pieces, hi_pieces = [], []
            for p, idx in zip(parts, _part_rows(parts, seg.counts), strict=True):
                m = to_lo[idx]
                dev = p.x.device if isinstance(p, Dense) else p.words.device
                if self._is_lo(p):
                    lo_pieces.append((p, idx))
                    continue
                if bool(m.any()):
                    q = p.select(m.to(dev))
                    lo_pieces.append((quantize_tokens(q.dequant(), q.counts, self.lo_bits, g, dtype), idx[m]))
                if bool((~m).any()):
                    h = p.select((~m).to(dev))
                    if self.hi_bits == 8 and isinstance(h, Dense):
                        h = quantize_tokens(h.dequant(), h.counts, 8, g, dtype)
                    hi_pieces.append((h, idx[~m]))
            lo_cat, hi_cat = _cat(lo_pieces), _cat(hi_pieces)
            out = [c for c in (lo_cat, hi_cat) if c is not None]
            order = out[0][1]
            for a, b in zip(out, out[1:], strict=False):
                order = head_cat(order, a[0].counts, b[1], b[0].counts)
            orders.append(order)
            new.append([c[0] for c in out])
        assert torch.equal(orders[0], orders[1]), "mikv: K and V parts out of step"
        order = orders[0]
        aux = {name: a[order.to(a.device)] for name, a in seg.aux.items()}
        return Segment(new[0], new[1], aux)

    # -- guard --------------------------------------------------------------------------------------------------------
    def max_rows(self, store: LayerStore) -> int | None:
        """Nothing is dropped: every head holds every token seen (the high-precision set is checked apart)."""
        return store.seen if "budget" in store.state else None

    def check_budget(self, store: LayerStore) -> None:
        super().check_budget(store)
        if "budget" not in store.state:
            return
        layout = self._decode_layout(store)
        if layout is not None:  # the high rows are the dense part's: counted on the host
            hi = torch.tensor(layout[1].counts)
        else:
            lo = self.low_mask(store)
            hi = torch.bincount(store.head_ids()[~lo].cpu(), minlength=store.info.n_kv_heads)
        if int(hi.max()) > store.state["budget"]:
            raise BudgetViolation(f"{self.spec()}: layer {store.info.layer} holds {hi.tolist()} high-precision rows "
                                  f"per head, budget {store.state['budget']}")
        if min(store.counts()) != store.seen:
            raise BudgetViolation(f"{self.spec()}: layer {store.info.layer} dropped tokens: {store.counts()} rows "
                                  f"per head, {store.seen} seen")
