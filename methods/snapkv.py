"""SnapKV: observation-window attention, pooled, top-k per KV head, once at prefill."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

import torch
import torch.nn.functional as F

from methods.base import SpecError
from methods.eviction import Eviction
from methods.h2o import select_rows
from methods.registry import register
from methods.stats import Needs, PrefillStats
from methods.store import LayerStore


def window_scores(stats: PrefillStats, window: int, kernel: int, pooling: str) -> torch.Tensor:
    """Pooled SnapKV scores ``[H_kv, T - W]`` of the prefix: window queries' attention summed, then pool1d.

    ``stats.last_n [H_kv, g, n, T]`` (n >= W) are causal softmax rows of the last queries over all prompt keys.
    The ``g`` query heads of a KV group are summed (the top-k is the same as for their mean).
    """
    a = stats.last_n[:, :, -window:]
    T = a.shape[-1]
    s = a[..., : T - window].float().sum((1, 2))  # [H_kv, T - W]
    pool = F.avg_pool1d if pooling == "avg" else F.max_pool1d  # avg: count_include_pad=True, as in the original
    return pool(s.unsqueeze(1), kernel_size=kernel, stride=1, padding=kernel // 2).squeeze(1)


def snap_select(store: LayerStore, stats: PrefillStats, n_select: int, window: int, kernel: int, pooling: str,
                who: str) -> None:
    """Keep, per KV head, the top ``n_select`` prefix tokens by pooled window score plus the last ``window`` tokens.

    ``n_select + window`` must not exceed the prompt length. With ``n_select == 0`` only the window is kept.
    """
    T = store.seen
    pos = store.all_rows("pos").long()
    heads = store.head_ids()
    table = torch.zeros(store.info.n_kv_heads, T, dtype=torch.bool, device=pos.device)
    table[:, T - window:] = True
    if n_select > 0:
        idx = torch.topk(window_scores(stats, window, kernel, pooling), n_select, dim=-1).indices
        table.scatter_(1, idx.to(pos.device), True)
    select_rows(store, table[heads, pos], who)


@register
@dataclass
class SnapKV(Eviction):
    """SnapKV (METHODS.md §4.2), faithful to ``snapkv/monkeypatch/snapkv_utils.py`` L38–70, prefill only.

    With ``C`` the resolved budget (per KV head) and ``T`` the prompt length: if ``T <= C`` everything is kept;
    otherwise the causal softmax rows of the last ``window`` queries over all prompt keys (fp32, recomputed next to
    the main SDPA pass) are summed over the window queries for the prefix ``[0, T - W)``, pooled with ``pool1d``
    (kernel ``kernel``, stride 1, padding ``kernel // 2``; ``avg`` counts the padding as the original does), and the
    top ``C - W`` prefix tokens plus the last ``W`` tokens are kept, per KV head. Decoding does not compress:
    generated tokens accumulate on top of ``C`` (``decode_evicts = False``).

    GQA: this is the "cleaner version" of §4.2: the scores of a KV group's query heads are summed and ``H_kv`` heads
    are stored (the repository ``repeat_kv``s and stores all query heads).

    Deviation: the original asserts ``C > W``. With small ratio budgets on short prompts ``C <= W`` happens; then
    the last ``C`` tokens are kept (the window part alone) and the spec says so in this docstring.

    References
    ----------
    Li et al., "SnapKV: LLM Knows What You are Looking for Before Generation", NeurIPS 2024 (arXiv 2404.14469);
    code FasterDecoding/SnapKV.
    """

    name = "snapkv"
    paper = "Li et al., NeurIPS 2024, arXiv 2404.14469"
    decode_evicts = False
    budget: float = field(default=0.25, metadata={"help": "prompt tokens kept per KV head (C, incl. the window)"})
    window: int = field(default=32, metadata={"help": "observation window W (last W queries; last W tokens kept)"})
    kernel: int = field(default=5, metadata={"help": "pooling kernel size (odd)"})
    pooling: Literal["avg", "max"] = field(default="avg", metadata={"help": "pool1d over the scores"})

    def validate(self) -> None:
        super().validate()
        if self.window < 1:
            raise SpecError(f"{self.name}: window={self.window} must be >= 1")
        if self.kernel < 1 or self.kernel % 2 == 0:
            raise SpecError(f"{self.name}: kernel={self.kernel} must be an odd number >= 1")

    def needs(self) -> Needs:
        return Needs(last_n=self.window)

    def on_prefill(self, store: LayerStore, stats: PrefillStats) -> None:
        c = self.resolve(store)
        T = store.seen
        if T <= c:
            return
        if c <= self.window:
            snap_select(store, stats, 0, c, self.kernel, self.pooling, self.name)
        else:
            snap_select(store, stats, c - self.window, self.window, self.kernel, self.pooling, self.name)
