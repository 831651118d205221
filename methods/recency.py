"""Recency ("local" / window attention): keep the last B tokens."""

from __future__ import annotations

from dataclasses import dataclass, field

from methods.eviction import Eviction
from methods.h2o import select_rows
from methods.registry import register
from methods.store import LayerStore


@register
@dataclass
class Recency(Eviction):
    """Keep the ``budget`` most recent tokens of every layer and head, after the prefill and after every step.

    METHODS.md §4.5 (no canonical repository): H2O's "local" baseline (``heavy_ratio = 0``, ``h2o_hf/README.md``),
    i.e. StreamingLLM with 0 sinks. Keys keep their original RoPE positions.

    References
    ----------
    The local / sliding-window baseline of Zhang et al., NeurIPS 2023 (H2O, arXiv 2306.14048) and Xiao et al.,
    ICLR 2024 (StreamingLLM, arXiv 2309.17453).
    """

    name = "recency"
    paper = "local baseline (H2O arXiv 2306.14048; StreamingLLM arXiv 2309.17453)"
    budget: float = field(default=0.25, metadata={"help": "recent tokens kept: ratio of the prompt or tokens"})

    def _evict(self, store: LayerStore) -> None:
        b = store.state["budget"]  # every head holds the newest tokens: each keeps `b` once it has more
        select_rows(store, store.all_rows("pos") >= store.seen - b, self.name, tuple(min(c, b) for c in store.counts()))

    def on_prefill(self, store, stats) -> None:
        self.resolve(store)
        self._evict(store)

    def on_append(self, store, stats) -> None:
        self._evict(store)
