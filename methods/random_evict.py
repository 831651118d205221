"""Random eviction: a uniformly random subset plus an optional recent window, seeded per (sample, layer)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

import torch

from methods.eviction import Eviction
from methods.h2o import check_share, layer_seed, resolve_share, select_rows, top_per_head
from methods.registry import register
from methods.store import LayerStore


@register
@dataclass
class RandomEvict(Eviction):
    """Keep a uniformly random ``B - W_recent`` of the older tokens plus the last ``W_recent`` (METHODS.md §4.5).

    No canonical repository; defined as in §4.5:

    * ``recent=0`` is "random incl. recent" (uniform over every token); ``recent=W`` (tokens) or a share of the
      budget is "random from prefix" (uniform over the tokens before the recent window, which is always kept);
    * ``per=layer`` keeps one set for all KV heads of a layer, ``per=head`` draws each head independently;
    * ``every_step=true`` evicts after the prefill and after every step (each step drops uniformly random tokens
      from the candidates, which keeps a uniformly random subset); ``every_step=false`` only at prefill, generated
      tokens then accumulate on top of the budget;
    * the draw is seeded by (``LayerInfo.seed``, layer, tokens seen), hashed with blake2b: deterministic for a
      sample, different per layer and per step, and independent of Python's hash randomisation.

    References
    ----------
    Baseline defined in METHODS.md §4.5 (cf. the random-eviction ablations of H2O, arXiv 2306.14048).
    """

    name = "random"
    paper = "baseline (METHODS.md §4.5)"
    budget: float = field(default=0.25, metadata={"help": "tokens kept per KV head: ratio of the prompt or tokens"})
    recent: float = field(default=0.0,
                          metadata={"help": "always-kept recent window: share of the budget (<= 1) or tokens (> 1)"})
    per: Literal["layer", "head"] = field(default="layer", metadata={"help": "one random set per layer or per KV head"})
    every_step: bool = field(default=True, metadata={"help": "evict at every step (true) or at prefill only (false)"})

    def validate(self) -> None:
        super().validate()
        check_share(self, "recent", self.recent)
        self.decode_evicts = self.every_step  # read by Eviction.max_rows

    def _evict(self, store: LayerStore) -> None:
        b = store.state["budget"]
        if max(store.counts()) <= b:
            return
        recent = resolve_share(self.recent, b)
        pos = store.all_rows("pos").long()
        keep = pos >= store.seen - recent if recent > 0 else torch.zeros_like(pos, dtype=torch.bool)
        gen = torch.Generator().manual_seed(layer_seed(store.info.seed, store.info.layer, store.seen))
        if self.per == "layer":
            uniq, inv = torch.unique(pos, return_inverse=True)
            r = torch.rand(uniq.numel(), generator=gen).to(pos.device)[inv]
        else:
            r = torch.rand(pos.numel(), generator=gen).to(pos.device)
        select_rows(store, top_per_head(store, r, keep, b - recent), self.name)

    def on_prefill(self, store, stats) -> None:
        self.resolve(store)
        self._evict(store)

    def on_append(self, store, stats) -> None:
        if self.every_step:
            self._evict(store)
