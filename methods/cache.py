"""A transformers ``Cache`` whose layers are compressed stores driven by a method.

``update`` only marks its layer active and returns the fresh key/value states: the registered attention function
(:mod:`methods.attention`) does the work, so models need no patching. Use it with
``model.set_attn_implementation(methods.attention.register())`` and explicit ``position_ids`` (the true positions:
after eviction the cache holds fewer tokens than were seen).
"""

from __future__ import annotations

import torch
from transformers.cache_utils import Cache, CacheLayerMixin

from methods.attention import ACTIVE_LAYER, LayerAttention
from methods.store import LayerInfo, LayerStore


class CompressedLayer(CacheLayerMixin):
    """One layer: a :class:`~methods.store.LayerStore` plus the method's compute for it."""

    is_compileable = False
    is_sliding = False
    is_croppable = False

    def __init__(self, info: LayerInfo, method):
        super().__init__()
        self.info = info
        self.method = method
        self.store = LayerStore(info)
        self.attn = LayerAttention(self.store, method)

    def lazy_initialization(self, key_states, value_states) -> None:  # noqa: D102 - nothing to allocate
        self.is_initialized = True

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args, **kwargs):
        ACTIVE_LAYER.set(self)
        return key_states, value_states

    def compute(self, query, key, value, scale) -> torch.Tensor:
        return self.attn(query, key, value, scale)

    def get_seq_length(self) -> int:
        return self.store.seen

    def get_mask_sizes(self, *args, **kwargs) -> tuple[int, int]:
        q = args[0] if args else kwargs.get("query_length", kwargs.get("cache_position"))
        q = q.shape[0] if isinstance(q, torch.Tensor) else int(q or 0)
        return self.store.seen + q, 0

    def get_max_length(self) -> int:
        return -1

    def set_store(self, store: LayerStore) -> None:
        self.store = store
        self.attn.store = store


class CompressedCache(Cache):
    """The compressed KV cache of one sequence: one :class:`CompressedLayer` per decoder layer."""

    def __init__(self, config, method, dtype: torch.dtype, device, seed: int = 0):
        text = config.get_text_config() if hasattr(config, "get_text_config") else config
        n_layers = text.num_hidden_layers
        hq = text.num_attention_heads
        hk = getattr(text, "num_key_value_heads", None) or hq
        d = getattr(text, "head_dim", None) or text.hidden_size // hq
        layers = [CompressedLayer(LayerInfo(i, n_layers, hk, hq, d, dtype, torch.device(device), seed), method)
                  for i in range(n_layers)]
        super().__init__(layers=layers)
        self.method = method

    # -- measurements -------------------------------------------------------------------------------------------
    def nbytes(self) -> int:
        """Bytes of the real tensors holding keys and values (codes, scales, zeros, outliers, dense rows)."""
        return sum(layer.store.nbytes() for layer in self.layers)

    def aux_bytes(self) -> int:
        """Bytes of per-row bookkeeping (positions, policy scores): reported apart from the KV bytes."""
        return sum(layer.store.aux_bytes() for layer in self.layers)

    def kept_rows(self) -> int:
        """Token rows held, summed over layers and KV heads."""
        return sum(sum(layer.store.counts()) for layer in self.layers)

    def seen_rows(self) -> int:
        """Token rows an uncompressed cache would hold, summed over layers and KV heads."""
        return sum(layer.store.seen * layer.info.n_kv_heads for layer in self.layers)

    def n_outliers(self) -> int:
        return sum(layer.store.n_outliers() for layer in self.layers)

    def head_dim(self) -> int:
        return self.layers[0].info.head_dim

    # -- snapshots (several questions on one compressed context) ----------------------------------------------
    def snapshot(self) -> list[LayerStore]:
        return [layer.store.clone() for layer in self.layers]

    def restore(self, snap: list[LayerStore]) -> None:
        for layer, store in zip(self.layers, snap):
            layer.set_store(store.clone())
