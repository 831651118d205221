"""QAQ: Quality Adaptive Quantization for the KV cache (Dong et al., arXiv 2403.04643; METHODS.md §1)."""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from functools import reduce
from typing import Literal

import torch

from methods.base import Method, SpecError
from methods.formats import Dense, head_cat
from methods.qaq_accounting import qaq_reference_accounting
from methods.qaq_layout import (
    RowData,
    build_segments,
    check_layer_groups,
    from_buckets,
    group_values_to_rows,
    groups_to_rows,
    is_dense,
    merge_buckets,
    row_values_to_groups,
    rows_to_groups,
    segment_key,
    to_buckets,
)
from methods.qaq_quant import (
    DENSE,
    bits_from_bound,
    group_stats,
    key_bound,
    outlier_mask,
    quantize_groups,
    value_bound,
)
from methods.registry import register
from methods.stats import Needs, PrefillStats, StepStats
from methods.store import LayerStore, Segment

OBS, AMAX = "qaq_obs", "qaq_amax"  # aux columns of the dense residual (decode rule)
MERGE_ROWS = 64  # decode-time rows per head collected in a small segment before merging into the large one


@register
@dataclass
class Qaq(Method):
    """QAQ mixed-precision KV quantization (METHODS.md §1), the released code's rules on a real packed store.

    Prefill (per layer, right after its prefill; faithful to ``src/quantizer.py``):

    * groups: ``level=head`` = (token, layer, KV head), ``level=layer`` = (token, layer) across all KV heads;
      ``level=token`` spans all layers and cannot run in an online per-layer cache (``SpecError``).
    * outliers: per-group ``kthvalue`` thresholds (``ceil(r/2 N)``-th smallest inclusive, ``floor((1-r/2) N)``-th
      exclusive), stored exactly as sparse (int32 index, value) pairs; mean/min/max over the non-outliers.
    * bits (``attention=true``): keys ``M = sqrt(12/q_norm ln(T^3/(T-1) E^2 + 1))``; values ``M_g = sqrt(12/T) E/a_g``
      with ``a_g`` the max prefill attention of the last ``n`` queries (and the KV group's query heads; and all KV
      heads at ``level=layer``); ``bits = clamp(ceil(log2(R_g/(2M) + 1)), n_min, n_max)`` in the cache dtype; the
      last ``n-1`` prompt tokens get ``n_max`` (K and V); ``T = 1`` gives ``n_max``. ``attention=false``: ``bits``.
    * quantizer: ``mode=faithful`` is the code's mean-centred clamped grid (step ``R/2^n``, 1 bit = {mu-R/2, mu},
      0 bits = ``mu - R/2``); ``mode=fixed`` the asymmetric min/scale grid (levels ``min + k R/(2^n-1)``; 0 bits =
      mean). Both are stored as ``code*scale + zero`` in :class:`~methods.formats.TokenQuant` parts, one
      ``(scale, zero)`` per (token, head) row in the cache dtype. At ``level=layer`` the group's scale and zero are
      replicated in each head's row: the real bytes count them ``H_kv`` times.
    * storage: one segment per key bit width, one V part per value bit width (see :mod:`methods.qaq_layout`);
      5-7 bit codes are stored in the 8-bit container (real bytes 8 bits/element; the reference accounting charges
      the logical width).

    Decode (``decode=quantize``; our rule, not in the released code): a new row stays dense (cache dtype) until it
    has been seen by ``n`` queries (aux ``qaq_obs``), tracking the running max of the attention it receives (aux
    ``qaq_amax``, from ``StepStats.max``: max over the KV group's query heads and the step's queries; max over heads
    at ``level=layer``). Then it is quantized once with the same rules at the current ``T``: key bound with current
    ``T``, value bound with the observed max (no forced ``n_max``). Without step statistics (e.g. second part of a
    composite) the value bound uses ``a = 1``, the largest possible attention (the most bits). With
    ``attention=false`` new rows are ready at once. Ready rows are packed in batches of ``decode_batch`` per head
    (packing one row per step costs more than the step's attention on CPU); a ready row waiting for its batch keeps
    accumulating its running max, and ``decode_batch=1`` packs every row as soon as it is ready. Differences from the
    paper's §4.2 loop: stored rows are never re-quantized (up or down) as ``T`` and attention change, and no fp16
    master copy is kept in CPU memory; the dense residual holds at most ``n + decode_batch - 1`` rows per head.
    Quantized decode rows collect in a small segment per key width, merged into the large one every ``MERGE_ROWS``
    (64) rows.
    ``decode=dense`` keeps every generated token dense, as the reference protocol (prompt KV only) does.

    Accounting: ``store.nbytes()`` counts the real tensors (codes, per-row scale/zero, outlier values + int32
    indices, the dense residual). :func:`methods.qaq_accounting.qaq_reference_accounting` gives the reference code's
    convention (§1.7) from the per-group bit widths recorded in ``store.state["qaq"]``.

    References
    ----------
    Dong, Cheng, Qin, Wang, "QAQ: Quality Adaptive Quantization for LLM KV Cache", arXiv 2403.04643 (2024);
    reference code ``src/quantizer.py``; METHODS.md §1 (spec, golden values §1.10) and §6 (accounting).
    """

    name = "qaq"
    kind = "quantization"
    paper = "Dong et al., arXiv 2403.04643"
    err: float = field(default=3.0, metadata={"help": "target error E (grid 1, 3, 10, 30)"})
    n: int = field(default=5, metadata={"help": "attention window: last n prefill queries (grid 1, 5)"})
    n_min: int = field(default=0, metadata={"help": "fewest bits per group (grid 0, 1, 2)"})
    n_max: int = field(default=4, metadata={"help": "most bits per group (grid 2, 3, 4; at most 8)"})
    outliers: float = field(default=0.01, metadata={"help": "outlier ratio r kept exact (grid 0, 0.01)"})
    q_norm: str = field(default="300", metadata={"help": "squared query norm for the key bound, or 'measured' "
                                                         "(90th percentile of this layer's prefill queries)"})
    level: Literal["head", "layer", "token"] = field(default="head", metadata={"help": "quantization group"})
    mode: Literal["faithful", "fixed"] = field(default="faithful", metadata={"help": "quantizer grid"})
    attention: bool = field(default=True, metadata={"help": "attention-aware bits (false: uniform bits)"})
    bits: int = field(default=2, metadata={"help": "uniform bits when attention=false (0..8)"})
    target: Literal["kv", "k", "v"] = field(default="kv", metadata={"help": "tensors quantized (others dense)"})
    decode: Literal["quantize", "dense"] = field(default="quantize", metadata={"help": "generated tokens' rule"})
    decode_batch: int = field(default=8, metadata={"help": "ready generated rows packed together, per head"})

    reference_accounting = staticmethod(qaq_reference_accounting)

    def extra_metrics(self, stores) -> dict:
        """The reference code's accounting (METHODS.md §1.7), prefixed ``qaq_ref_``, beside the real bytes."""
        return {f"qaq_ref_{k}": v for k, v in qaq_reference_accounting(stores).items()}

    # -- parameters ---------------------------------------------------------------------------------------------
    def validate(self) -> None:
        super().validate()
        if self.level == "token":
            raise SpecError("qaq: level=token groups a token across all layers, which needs the whole forward pass "
                            "before any layer is compressed; an online per-layer cache cannot do it: use level=layer "
                            "or level=head")
        if isinstance(self.q_norm, (int, float)):
            self.q_norm = str(self.q_norm)
        if self.q_norm != "measured":
            try:
                qn = float(self.q_norm)
            except ValueError:
                qn = -1.0
            if not (qn > 0 and math.isfinite(qn)):
                raise SpecError(f"qaq: q_norm={self.q_norm!r} must be a positive number or 'measured'")
            self.q_norm = str(int(qn)) if qn.is_integer() else str(qn)
        if not (self.err > 0 and math.isfinite(self.err)):
            raise SpecError(f"qaq: err={self.err} must be a positive number")
        if self.n < 1:
            raise SpecError(f"qaq: n={self.n} must be >= 1")
        if self.decode_batch < 1:
            raise SpecError(f"qaq: decode_batch={self.decode_batch} must be >= 1")
        if not 0 <= self.n_min <= self.n_max <= 8:
            raise SpecError(f"qaq: need 0 <= n_min ({self.n_min}) <= n_max ({self.n_max}) <= 8")
        if not 0 <= self.bits <= 8:
            raise SpecError(f"qaq: bits={self.bits} must be in 0..8")
        if not 0 <= self.outliers < 0.5:
            raise SpecError(f"qaq: outliers={self.outliers} must be a ratio in [0, 0.5)")

    def needs(self) -> Needs:
        att = self.attention
        return Needs(last_n=self.n if att else 0, qnorm=att and self.q_norm == "measured",
                     step=att and self.decode == "quantize")

    # -- hooks --------------------------------------------------------------------------------------------------
    def on_prefill(self, store: LayerStore, stats: PrefillStats | None) -> None:
        if not store.segments:
            return
        st = self._state(store)
        T = store.seen
        st["T"] = T
        st["q_norm"] = self._q_norm(stats)
        dense = [s for s in store.segments if is_dense(s)]
        keep = [s for s in store.segments if not is_dense(s)]
        seg = _merge_dense(dense)
        pos = seg.aux["pos"].long()
        a_row = None
        if self.attention and stats is not None and stats.last_n is not None:
            a = stats.last_n[:, :, -self.n:, :].amax((1, 2))  # [H_kv, T_prefill]
            heads = torch.repeat_interleave(torch.arange(len(seg.counts)), torch.tensor(seg.counts)).to(a.device)
            a_row = a[heads, (pos - (T - a.shape[-1])).to(a.device)].float()
        force = pos >= T - self.n + 1
        buckets = self._quantize(seg, store, T, a_row, force, "prefill")
        store.segments = self._merge_into(keep, buckets, "prefill")
        st["seen"] = store.seen

    def on_append(self, store: LayerStore, stats: StepStats | None) -> None:
        if self.decode == "dense" or not store.segments:
            return
        st = self._state(store)
        T = store.seen
        lq = T - st.get("seen", T)
        st["seen"] = T
        dense = []
        for i, seg in enumerate(store.segments):
            if not is_dense(seg):
                continue
            dev = seg.aux["pos"].device
            seg.aux.setdefault(OBS, torch.zeros(seg.n, dtype=torch.int32, device=dev))
            seg.aux.setdefault(AMAX, torch.full((seg.n,), -1.0, device=dev))  # -1: never observed
            seen_by = (T - seg.aux["pos"].long()).clamp(max=lq).clamp(min=0)
            seg.aux[OBS] = seg.aux[OBS] + seen_by.to(torch.int32)
            if stats is not None and self.attention:
                seg.aux[AMAX] = torch.maximum(seg.aux[AMAX], stats.max[i].float().to(dev))
            dense.append(seg)
        if not dense:
            return
        quant = [s for s in store.segments if not is_dense(s)]
        resid = _merge_dense(dense)
        ready = resid.aux[OBS] >= self.n if self.attention else torch.ones_like(resid.aux[OBS], dtype=torch.bool)
        if int(ready.sum()) < self.decode_batch * store.info.n_kv_heads:
            store.segments = quant + [resid]
            return
        sub, rest = resid.select(ready), resid.select(~ready)
        amax = sub.aux[AMAX]
        a_row = torch.where(amax < 0, torch.ones_like(amax), amax)  # no step stats: a = 1, the most bits
        for name in (OBS, AMAX):
            sub.aux.pop(name)
        buckets = self._quantize(sub, store, T, a_row, torch.zeros_like(a_row, dtype=torch.bool), "decode")
        store.segments = self._merge_into(quant, buckets, "decode") + ([rest] if rest is not None else [])

    # -- internals ----------------------------------------------------------------------------------------------
    def _state(self, store: LayerStore) -> dict:
        info = store.info
        return store.state.setdefault("qaq", {
            "level": self.level, "target": self.target, "outliers": self.outliers, "n_kv_heads": info.n_kv_heads,
            "head_dim": info.head_dim, "n_layers": info.n_layers, "params": 2,
            "prefill_k_bits": None, "prefill_v_bits": None, "decode_k_bits": None, "decode_v_bits": None})

    def _q_norm(self, stats: PrefillStats | None) -> float:
        if self.q_norm != "measured":
            return float(self.q_norm)
        if stats is None or stats.qnorm2 is None:
            raise RuntimeError("qaq: q_norm=measured needs PrefillStats.qnorm2 (Needs(qnorm=True))")
        x = stats.qnorm2.float().reshape(-1)
        return float(torch.kthvalue(x.cpu(), max(1, math.ceil(0.9 * x.numel()))).values)  # nearest-rank p90

    def _bits(self, g: torch.Tensor, T: int, M: torch.Tensor | float, force: torch.Tensor,
              stats: tuple[torch.Tensor, ...]) -> torch.Tensor:
        """Logical bits per group of ``g [G, N]`` for the bound ``M``; ``stats``: the groups' outlier mask, mean,
        min and max."""
        if not self.attention:
            return torch.full((g.shape[0],), self.bits, dtype=torch.int64, device=g.device)
        _, _, mn, mx = stats
        b = bits_from_bound(mx - mn, M, self.n_min, self.n_max)
        if T <= 1:
            b = torch.full_like(b, self.n_max)
        return torch.where(force.to(b.device), self.n_max, b)

    def _quantize(self, seg: Segment, store: LayerStore, T: int, a_row: torch.Tensor | None,
                  force_row: torch.Tensor, phase: str) -> dict:
        """Bits, codes and buckets ``{k_width: {v_width: bucket}}`` for the dense rows of ``seg``."""
        info, st = store.info, store.state["qaq"]
        counts, lvl = seg.counts, self.level
        if lvl == "layer":
            check_layer_groups(seg.aux["pos"], counts)
        k, v = _dense_rows(seg.k), _dense_rows(seg.v)
        force = row_values_to_groups(force_row.to(torch.int32), counts, lvl) > 0
        rows = {}
        for name, x in (("k", k), ("v", v)):
            if name not in self.target:
                rows[name] = RowData(x, torch.full((x.shape[0],), DENSE, dtype=torch.int64, device=x.device))
                continue
            g = rows_to_groups(x, counts, lvl)
            if name == "k":
                M = key_bound(T, self.err, st["q_norm"])
            else:
                a = torch.ones(seg.n) if a_row is None else a_row
                M = value_bound(T, self.err, row_values_to_groups(a.to(x.device), counts, lvl), x.dtype)
            out = outlier_mask(g, self.outliers)
            stats = (out, *group_stats(g, out))
            bits = self._bits(g, T, M, force, stats)
            q = quantize_groups(g, bits, self.outliers, self.mode, stats)
            cont = torch.where((bits >= 5) & (bits <= 7), 8, bits)
            rows[name] = RowData(x, group_values_to_rows(cont, counts, lvl),
                                 groups_to_rows(q.codes, counts, lvl), group_values_to_rows(q.scale, counts, lvl),
                                 group_values_to_rows(q.zero, counts, lvl), groups_to_rows(q.outliers, counts, lvl))
            key = f"{phase}_{name}_bits"
            b8 = bits.to(torch.int8).cpu()
            st[key] = b8 if st[key] is None else torch.cat([st[key], b8])
        return build_segments(rows["k"], rows["v"], dict(seg.aux), counts, info.dtype)

    @staticmethod
    def _merge_into(segments: list[Segment], buckets: dict, phase: str) -> list[Segment]:
        """Merge new buckets into the QAQ segments of the same key width; segments sorted by key width.

        Prefill rows go into the (single) segment of their key width. Decode rows go into a second, small segment
        of that width, which is merged into the large one once it holds ``MERGE_ROWS`` rows in some head: a step
        copies O(MERGE_ROWS) packed rows, and the large segment is copied once every ``MERGE_ROWS`` quantized rows.
        """
        by_key: dict[int, list[Segment]] = {}
        for s in segments:
            by_key.setdefault(segment_key(s), []).append(s)
        for kb, bk in buckets.items():
            segs = sorted(by_key.get(kb, []), key=lambda s: -s.n)
            if not segs:
                segs = [from_buckets(bk)]
            elif phase == "prefill":
                segs = [from_buckets(merge_buckets(to_buckets(segs[0]), bk))] + segs[1:]
            elif len(segs) == 1:
                segs = [segs[0], from_buckets(bk)]
            else:
                segs = [segs[0], from_buckets(merge_buckets(to_buckets(segs[1]), bk))]
            if len(segs) == 2 and max(segs[1].counts) >= MERGE_ROWS:
                segs = [from_buckets(merge_buckets(to_buckets(segs[0]), to_buckets(segs[1])))]
            by_key[kb] = segs
        return [s for kb in sorted(by_key) for s in sorted(by_key[kb], key=lambda s: -s.n)]


def _dense_rows(parts: list) -> torch.Tensor:
    return reduce(lambda a, b: a.cat(b), parts).x


def _merge_dense(segs: list[Segment]) -> Segment:
    """One dense segment holding the rows of ``segs`` (head by head, in order), with their common aux columns."""
    names = set.intersection(*(set(s.aux) for s in segs))
    k, v, aux, counts = Dense(_dense_rows(segs[0].k), segs[0].counts), None, None, segs[0].counts
    v = Dense(_dense_rows(segs[0].v), counts)
    aux = {n: segs[0].aux[n] for n in names}
    for s in segs[1:]:
        aux = {n: head_cat(aux[n], counts, s.aux[n], s.counts) for n in names}
        k, v = k.cat(Dense(_dense_rows(s.k), s.counts)), v.cat(Dense(_dense_rows(s.v), s.counts))
        counts = k.counts
    return Segment([k], [v], aux)
