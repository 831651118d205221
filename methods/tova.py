"""TOVA: token omission via attention: the last query's head-averaged attention, one set per layer."""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from methods import formats
from methods.eviction import Eviction
from methods.h2o import by_position, select_rows
from methods.registry import register
from methods.stats import Needs, PrefillStats, StepStats
from methods.store import LayerStore


@register
@dataclass
class TOVA(Eviction):
    """TOVA (METHODS.md §4.4), faithful to ``src/tova_cache.py`` L31–51, called after every forward incl. prefill.

    When a layer holds more than ``cache_size`` (the resolved ``budget``) tokens, score each token by the attention
    the step's *last* query pays it, averaged over *all* query heads of the layer (``H_q``, i.e. every KV group's
    heads), keep the top ``cache_size`` tokens; the same tokens are kept for every head of the layer. No sink or
    recent protection. Prefill uses the last prompt query's row (``Needs(last_n=1)``), so the prompt is cut to
    ``cache_size`` at once; then exactly one token is evicted per generated token. Keys keep their original RoPE
    positions.

    Decode: ``StepStats.last`` holds, per stored row, the last query's attention summed over the KV group's query
    heads; rows of different KV heads are the same tokens, matched by their ``pos``, summed and divided by ``H_q``.

    References
    ----------
    Oren et al., "Transformers are Multi-State RNNs", EMNLP 2024 (arXiv 2401.06104); code schwartz-lab-NLP/TOVA.
    """

    name = "tova"
    paper = "Oren et al., EMNLP 2024, arXiv 2401.06104"
    budget: float = field(default=0.25, metadata={"help": "cache_size per layer: ratio of the prompt or tokens"})

    def needs(self) -> Needs:
        return Needs(last_n=1, step=True)

    def on_prefill(self, store: LayerStore, stats: PrefillStats) -> None:
        b = self.resolve(store)
        if store.seen <= b:
            return
        last = stats.last_n[:, :, -1, :]  # [H_kv, g, T]: the last prompt query
        score = last.float().sum((0, 1)) / store.info.n_q_heads  # [T], mean over all query heads
        pos = store.all_rows("pos").long()
        chosen = torch.zeros(store.seen, dtype=torch.bool, device=pos.device)
        chosen[torch.topk(score, b).indices.to(pos.device)] = True
        select_rows(store, chosen[pos], self.name)

    def on_append(self, store: LayerStore, stats: StepStats | None) -> None:
        b = store.state["budget"]
        if max(store.counts()) <= b:
            return
        if stats is None:
            raise RuntimeError("tova: needs the step's attention statistics (Needs(step=True))")
        h = store.info.n_kv_heads
        if _aligned(store):  # one part per side, every head the same tokens in the same order: no device sync
            score = stats.last[0].float().reshape(h, -1).sum(0)  # per token, summed over the KV heads
            rows_of, kept = (lambda c: c.repeat(h)), (min(b, score.numel()),) * h
        else:
            _, score, inv = by_position(store, torch.cat(stats.last))
            rows_of, kept = (lambda c: c[inv]), None
        top = torch.topk(score / store.info.n_q_heads, min(b, score.numel())).indices
        chosen = torch.zeros(score.numel(), dtype=torch.bool, device=score.device).scatter_(0, top, True)
        select_rows(store, rows_of(chosen), self.name, kept)


def _aligned(store: LayerStore) -> bool:
    """Whether row ``i`` of every head is the same token: TOVA keeps the same tokens on every head and appends each
    new one to every head, so a store of one segment with one part per side and equal heads is (checked in tests)."""
    if len(store.segments) != 1 or len(set(store.counts())) != 1:
        return False
    seg = store.segments[0]
    if len(seg.k) != 1 or len(seg.v) != 1:
        return False
    if formats.CHECK_KEPT:
        pos = seg.aux["pos"].reshape(store.info.n_kv_heads, -1)
        if not bool((pos == pos[:1]).all()):
            raise AssertionError("tova: heads hold different tokens at the same row")
    return True
