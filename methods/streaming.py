"""StreamingLLM: attention sinks plus a recent window."""

from __future__ import annotations

from dataclasses import dataclass, field

from methods.eviction import Eviction
from methods.h2o import select_rows
from methods.registry import register
from methods.store import LayerStore


@register
@dataclass
class Streaming(Eviction):
    """Keep the first ``sinks`` tokens and the most recent ``budget - sinks`` tokens, on every layer and head.

    Faithful to ``StartRecentKVCache`` (``streaming_llm/kv_cache.py``), applied after the prefill and after every
    step, with the tokens' original positions (no pos-shift re-rotation: keys are cached after RoPE; METHODS.md §4.1
    names this variant, equivalent inside the training window).

    References
    ----------
    Xiao et al., "Efficient Streaming Language Models with Attention Sinks", ICLR 2024 (arXiv 2309.17453).
    """

    name = "streaming"
    paper = "Xiao et al., ICLR 2024, arXiv 2309.17453"
    budget: float = field(default=0.25, metadata={"help": "sinks + recent window: ratio of the prompt or tokens"})
    sinks: int = field(default=4, metadata={"help": "attention-sink tokens kept at the start"})

    def validate(self) -> None:
        super().validate()
        if self.sinks < 0:
            from methods.base import SpecError

            raise SpecError(f"streaming: sinks={self.sinks} must be >= 0")

    def _evict(self, store: LayerStore) -> None:
        budget = store.state["budget"]
        sinks = min(self.sinks, budget - 1)
        recent = budget - sinks
        pos = store.all_rows("pos")
        keep = (pos < sinks) | (pos >= store.seen - recent)
        # every head holds all the sinks and the whole recent window, so each keeps `budget` rows once it has more
        select_rows(store, keep, self.name, tuple(min(c, budget) for c in store.counts()))

    def on_prefill(self, store, stats) -> None:
        self.resolve(store)
        self._evict(store)

    def on_append(self, store, stats) -> None:
        self._evict(store)
