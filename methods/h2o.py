"""H2O: heavy hitters (accumulated attention) plus a recent window, per KV head, evicting at every step.

Also holds small helpers shared by the other eviction methods of this family (score accumulation in an aux column,
folding a step's fresh rows back into the layer's segment, selection that turns the per-channel-key-block error into
a :class:`~methods.base.SpecError`).
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, field

import torch

from methods import formats
from methods.base import SpecError
from methods.eviction import Eviction
from methods.formats import Dense
from methods.registry import register
from methods.stats import Needs, StepStats
from methods.store import LayerStore, Segment

SCORE = "score"


# -- shared helpers -------------------------------------------------------------------------------------------------
def check_share(method, key: str, value: float) -> None:
    """A share of the budget in [0, 1] or a whole token count > 1."""
    if value < 0 or (value > 1 and not float(value).is_integer()):
        raise SpecError(f"{method.name}: {key}={value} must be a share of the budget in [0, 1] or a whole number "
                        f"of tokens > 1")


def resolve_share(share: float, budget: int) -> int:
    """Tokens of ``budget`` given to a share (ratio <= 1 rounds; a count > 1 is capped at the budget)."""
    return min(budget, round(share * budget) if share <= 1 else int(share))


def _is_fresh(seg: Segment) -> bool:
    """A segment made by ``LayerStore.append`` this step: one dense K part, one dense V part, same rows per head."""
    return (len(seg.k) == 1 and len(seg.v) == 1 and isinstance(seg.k[0], Dense) and isinstance(seg.v[0], Dense)
            and len(set(seg.counts)) == 1)


def fold_fresh(store: LayerStore) -> None:
    """Fold trailing freshly appended dense segments into the previous segment (same aux columns).

    ``LayerStore.append`` opens a new segment when the last one carries policy columns (e.g. ``score``) that the new
    rows lack. Once the policy has filled those columns, folding keeps one segment per layer, so attention does not
    walk one extra segment per generated token.
    """
    while len(store.segments) >= 2:
        prev, last = store.segments[-2], store.segments[-1]
        if not _is_fresh(last) or set(prev.aux) != set(last.aux):
            return
        h, L = len(last.counts), last.counts[0]
        d = last.k[0].x.shape[-1]
        aux = {name: a.reshape(h, L) for name, a in last.aux.items()}
        prev.append_dense(last.k[0].x.reshape(h, L, d), last.v[0].x.reshape(h, L, d), aux)
        store.segments.pop()


def accumulate_scores(store: LayerStore, stats: StepStats | None, who: str) -> None:
    """Add the step's attention (``stats.sum``) to every row's ``score``; fresh rows start with theirs; then fold."""
    if stats is None or len(stats.sum) != len(store.segments):
        raise SpecError(f"{who}: needs the attention statistics of every step aligned with the store; it cannot be the "
                        f"second part of a composition (write eviction+quantization, the scoring part first)")
    for seg, s in zip(store.segments, stats.sum, strict=True):
        s = s.to(torch.float32)
        seg.aux[SCORE] = seg.aux[SCORE] + s if SCORE in seg.aux else s
    fold_fresh(store)


def top_per_head(store: LayerStore, score: torch.Tensor, keep: torch.Tensor, k: int,
                 cand: torch.Tensor | None = None) -> torch.Tensor:
    """Mask: rows flagged in ``keep`` plus, per KV head, the top-``k`` other rows (among ``cand``) by ``score``.

    Scores must not be ``-inf`` (attention sums are >= 0). When every head holds the same number of rows, one
    ``topk`` over the ``[heads, rows]`` view does all heads at once, without a device sync; otherwise one per head.
    """
    final = keep.clone()
    other = ~keep if cand is None else (cand & ~keep)
    if k <= 0:
        return final
    counts = store.counts()
    if len(store.segments) == 1 and len(set(counts)) == 1 and counts[0]:
        h, n = len(counts), counts[0]
        masked = torch.where(other, score.float(), float("-inf")).reshape(h, n)
        top = torch.topk(masked, min(k, n), dim=1).indices
        chosen = torch.zeros_like(masked, dtype=torch.bool).scatter_(1, top, True).reshape(-1)
        return final | (chosen & other)  # rows of a head with fewer than k others: the -inf picks drop out here
    heads = store.head_ids()
    for h in range(store.info.n_kv_heads):
        idx = ((heads == h) & other).nonzero().squeeze(-1)
        if idx.numel():
            top = torch.topk(score[idx], min(k, idx.numel())).indices
            final[idx[top]] = True
    return final


def select_rows(store: LayerStore, keep: torch.Tensor, who: str, kept: tuple[int, ...] | None = None) -> None:
    """``store.select`` over all rows; per-channel key blocks that would lose single tokens become a SpecError.

    ``kept``: the rows ``keep`` keeps per head, where the policy knows them; with one segment the selection then
    needs no device sync (:func:`~methods.formats.kept_rows`).
    """
    if kept is not None and len(store.segments) == 1:
        if tuple(kept) == store.counts():
            if formats.CHECK_KEPT and not bool(keep.all()):
                raise AssertionError(f"{who}: kept counts {tuple(kept)} say every row stays, the mask drops some")
            return
        per_segment = [tuple(kept)]
    else:
        if bool(keep.all()):
            return
        per_segment = None
    try:
        store.select(store.split_rows(keep), per_segment)
    except NotImplementedError as e:
        raise SpecError(f"{who} evicts single tokens after the prefill, but the quantizer keeps keys in per-channel "
                        f"blocks of tokens (kivi), which cannot lose one token; compose kivi with a prefill-only "
                        f"eviction (snapkv, pyramidkv, random:every_step=false) or use a per-token quantizer") from e


def by_position(store: LayerStore, values: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Sum per-row ``values`` over rows of the same token. Returns (positions, sums, row -> position index)."""
    pos = store.all_rows("pos").long()
    uniq, inv = torch.unique(pos, return_inverse=True)
    sums = torch.zeros(uniq.numel(), dtype=torch.float32, device=values.device).index_add_(0, inv, values.float())
    return uniq, sums, inv


def layer_seed(seed: int, layer: int, *extra: int) -> int:
    """A stable 63-bit seed from (sample seed, layer, ...): independent of Python's hash randomisation."""
    text = ":".join(str(int(x)) for x in (seed, layer, *extra))
    return int.from_bytes(hashlib.blake2b(text.encode(), digest_size=8).digest(), "little") & ((1 << 63) - 1)


# -- the method -----------------------------------------------------------------------------------------------------
@register
@dataclass
class H2O(Eviction):
    """H2O (METHODS.md §3): keep the ``recent`` newest tokens plus the top heavy hitters by accumulated attention.

    Reproduces the real-drop code path ``utils_real_drop/modify_llama.py`` (L258–326), not the masking simulations:

    * score of a cached token = the attention it received from every query so far: the causal column sums of the
      prefill (computed in query chunks by the attention function) plus, at every later step, the attention paid by
      that step's queries (new tokens start with the attention they receive from the step's own queries);
    * per KV head: the scores of a GQA group's query heads are summed and only ``H_kv`` heads are stored (the
      original has no GQA support; KVCache-Factory ``repeat_kv``s and stores all query heads);
    * after the prefill and after every step, if a head holds more than ``heavy + recent`` rows: keep the ``recent``
      newest tokens plus the top ``heavy`` scores among the older ones, independently per head; the scores of
      evicted tokens are dropped. Keys keep their original RoPE positions.

    Budget: ``budget`` is the total per head (ratio of the prompt or tokens, resolved at prefill); ``recent`` is the
    recent window's share of it (ratio <= 1) or a token count (> 1); the rest is heavy hitters. The simulations'
    ``heavy_ratio = recent_ratio = 0.1`` is ``budget=0.2,recent=0.5``; real drop's ``hh_size = recent_size = 1024``
    is ``budget=2048,recent=1024``; the "local" baseline is ``recent=1``. Scores are kept per row in the aux column
    ``score`` (float32), reported by ``aux_bytes`` as H2O's extra buffer (METHODS.md §6 iii).

    References
    ----------
    Zhang et al., "H2O: Heavy-Hitter Oracle for Efficient Generative Inference of Large Language Models",
    NeurIPS 2023 (arXiv 2306.14048); code FMInference/H2O.
    """

    name = "h2o"
    paper = "Zhang et al., NeurIPS 2023, arXiv 2306.14048"
    budget: float = field(default=0.25,
                          metadata={"help": "heavy + recent tokens per KV head: ratio of the prompt or tokens"})
    recent: float = field(default=0.5, metadata={"help": "recent window: share of the budget (<= 1) or tokens (> 1)"})

    def validate(self) -> None:
        super().validate()
        check_share(self, "recent", self.recent)

    def needs(self) -> Needs:
        return Needs(colsum=True, step=True)

    def on_prefill(self, store: LayerStore, stats) -> None:
        b = self.resolve(store)
        store.state["recent"] = resolve_share(self.recent, b)
        store.state["heavy"] = b - store.state["recent"]
        (seg,) = store.segments
        seg.aux[SCORE] = stats.colsum.reshape(-1).to(torch.float32)  # [H_kv, T] -> head-major rows
        self._evict(store)

    def on_append(self, store: LayerStore, stats) -> None:
        accumulate_scores(store, stats, self.name)
        self._evict(store)

    def _evict(self, store: LayerStore) -> None:
        counts = store.counts()
        if max(counts) <= store.state["budget"]:
            return
        select_rows(store, h2o_keep(store), self.name, tuple(h2o_kept(store, c) for c in counts))


def h2o_kept(store: LayerStore, held: int) -> int:
    """How many of a head's ``held`` candidate rows :func:`h2o_keep` keeps: the recent window is all among them (it is
    never evicted, nor demoted by MiKV), so those plus up to ``heavy`` others."""
    return min(held, min(store.state["recent"], store.seen) + store.state["heavy"])


def h2o_keep(store: LayerStore, cand: torch.Tensor | None = None) -> torch.Tensor:
    """H2O's kept rows: the ``recent`` newest positions plus, per head, the top ``heavy`` others by ``score``."""
    recent, heavy = store.state["recent"], store.state["heavy"]
    pos = store.all_rows("pos")
    keep = pos >= store.seen - recent if recent > 0 else torch.zeros_like(pos, dtype=torch.bool)
    if cand is not None:
        keep &= cand
    return top_per_head(store, store.all_rows(SCORE), keep, heavy, cand)
