"""PyramidKV: SnapKV scoring with a per-layer ("pyramid") prompt budget."""

from __future__ import annotations

from dataclasses import dataclass, field

from methods.base import SpecError
from methods.registry import register
from methods.snapkv import SnapKV, snap_select
from methods.stats import PrefillStats
from methods.store import LayerStore


def pyramid_budget(c: int, window: int, T: int, n_layers: int, layer: int, beta: int) -> tuple[int, str]:
    """Prompt tokens kept by layer ``layer`` (window included) and the branch taken, as in PyramidKV's code.

    ``pyramidkv/pyramidkv_utils.py`` L197–283 (``PyramidKVCluster.update_kv``)::

        min_num = (C - W) // beta ;  max_num = 2 (C - W) - min_num
        if max_num >= T - W:  max_num = T - W ;  min_num = 2 (C - W) - max_num
        steps = (max_num - min_num) // (L - 1)
        budget_l = max_num - l * steps              (excluding the window)
        T < C: keep all  |  T < 2 (C - W): SnapKV with C  |  else: top budget_l + the last W

    ``L == 1`` (the original divides by zero) uses ``steps = 0``.
    """
    if T < c:
        return T, "all"
    if T < 2 * (c - window):
        return c, "uniform"
    min_num = (c - window) // beta
    max_num = 2 * (c - window) - min_num
    if max_num >= T - window:
        max_num = T - window
        min_num = 2 * (c - window) - max_num
    steps = (max_num - min_num) // (n_layers - 1) if n_layers > 1 else 0
    return max_num - layer * steps + window, "pyramid"


@register
@dataclass
class PyramidKV(SnapKV):
    """PyramidKV (METHODS.md §4.3), faithful to ``PyramidKVCluster.update_kv`` (``pyramidkv/pyramidkv_utils.py``).

    Scoring is SnapKV's (window ``W``, pool1d, top-k per KV head; a GQA group's query heads are summed and ``H_kv``
    heads are stored, where the repository ``repeat_kv``s and stores all query heads). ``budget`` is the average
    per-layer budget ``C`` including the window; layer ``l`` keeps ``budget_l + W`` tokens by
    :func:`pyramid_budget` (lower layers keep more; the sum over layers is about ``L (C - W) + L W``). The guard
    checks each layer against its own budget (``store.state["budget"]``). Prefill only.

    Deviation: the original asserts ``C > W``; with ``C <= W`` the last ``C`` tokens are kept on every layer.

    References
    ----------
    Cai et al., "PyramidKV: Dynamic KV Cache Compression based on Pyramidal Information Funneling"
    (arXiv 2406.02069); code Zefan-Cai/PyramidKV (KVCache-Factory).
    """

    name = "pyramidkv"
    paper = "Cai et al., arXiv 2406.02069"
    beta: int = field(default=20, metadata={"help": "min_num = (C - W) // beta: the top layer's share"})

    def validate(self) -> None:
        super().validate()
        if self.beta < 1:
            raise SpecError(f"{self.name}: beta={self.beta} must be >= 1")

    def on_prefill(self, store: LayerStore, stats: PrefillStats) -> None:
        c = self.resolve(store)
        T = store.seen
        if c <= self.window:
            if T > c:
                snap_select(store, stats, 0, c, self.kernel, self.pooling, self.name)
            return
        kept, branch = pyramid_budget(c, self.window, T, store.info.n_layers, store.info.layer, self.beta)
        store.state["budget"] = kept  # the guard checks this layer's own budget
        store.state["pyramid_branch"] = branch
        if branch != "all":
            snap_select(store, stats, kept - self.window, self.window, self.kernel, self.pooling, self.name)
