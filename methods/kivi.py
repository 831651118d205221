"""KIVI: 2/4-bit asymmetric quantization, keys per channel, values per token, with a full-precision residual."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

import torch

from methods.base import Method, SpecError
from methods.formats import ChannelQuant, Dense, TokenQuant, quantize_channels, quantize_tokens
from methods.registry import register
from methods.store import LayerStore, Segment


@register
@dataclass
class Kivi(Method):
    """KIVI (METHODS.md §2), faithful to ``models/llama_kivi.py`` and ``quant/new_pack.py``.

    * Keys: per-channel min/max quantization in blocks of ``group`` tokens. After the prefill the first
      ``T - T mod residual`` tokens are quantized; the rest stay full precision until ``residual`` of them have
      accumulated, then all ``residual`` are quantized at once.
    * Values: per-token min/max quantization in groups of ``group`` channels; exactly the ``residual`` most recent
      tokens stay full precision, older ones are quantized one by one as they leave the window.
    * ``scale = (max - min) / (2^b - 1)``, ``q = round(clamp((x - min) / scale, 0, 2^b - 1))``; scale and min are kept
      in the cache dtype; codes are packed ``32 / b`` per int32.

    Memory: ``b + 2*16/group`` bits per quantized element plus the full-precision residuals.

    References
    ----------
    Liu et al., "KIVI: A Tuning-Free Asymmetric 2bit Quantization for KV Cache", ICML 2024 (arXiv 2402.02750).
    """

    name = "kivi"
    kind = "quantization"
    per_channel_blocks = True  # keys live in blocks of G tokens: single tokens cannot be evicted from them
    paper = "Liu et al., ICML 2024, arXiv 2402.02750"
    bits: Literal[1, 2, 3, 4, 8] = field(default=2, metadata={"help": "code width for keys and values"})
    group: int = field(default=32, metadata={"help": "group size G (tokens for keys, channels for values)"})
    residual: int = field(default=128, metadata={"help": "full-precision residual length R (R % G == 0)"})

    def validate(self) -> None:
        super().validate()
        if self.group < 1 or self.residual < 1:
            raise SpecError(f"kivi: group={self.group} and residual={self.residual} must be >= 1")
        if self.residual % self.group:
            raise SpecError(f"kivi: residual={self.residual} must be a multiple of group={self.group}")

    def on_prefill(self, store: LayerStore, stats) -> None:
        if store.info.head_dim % self.group:
            raise SpecError(f"kivi: group={self.group} must divide the head dimension {store.info.head_dim}")
        self._pack(store)

    def on_append(self, store: LayerStore, stats) -> None:
        self._pack(store)

    def _pack(self, store: LayerStore) -> None:
        for seg in store.segments:
            self._pack_keys(seg, store.info.dtype)
            self._pack_values(seg, store.info.dtype)

    def _pack_keys(self, seg: Segment, dtype: torch.dtype) -> None:
        tail = seg.k[-1]
        if not isinstance(tail, Dense):
            return
        n_q = tuple(c - c % self.residual for c in tail.counts)  # whole residual blocks leave the fp16 tail
        if not any(n_q):
            return
        first, rest = tail.split_first(n_q)
        packed = quantize_channels(first.x, n_q, self.bits, self.group, dtype)
        head = seg.k[:-1]
        if head and isinstance(head[-1], ChannelQuant):
            head[-1] = head[-1].cat(packed)
        else:
            head.append(packed)
        seg.k[:] = head + [rest]

    def _pack_values(self, seg: Segment, dtype: torch.dtype) -> None:
        tail = seg.v[-1]
        if not isinstance(tail, Dense):
            return
        n_q = tuple(max(0, c - self.residual) for c in tail.counts)  # exactly R values stay fp16
        if not any(n_q):
            return
        first, rest = tail.split_first(n_q)
        packed = quantize_tokens(first.x, n_q, self.bits, self.group, dtype)
        head = seg.v[:-1]
        if head and isinstance(head[-1], TokenQuant):
            head[-1] = head[-1].cat(packed)
        else:
            head.append(packed)
        seg.v[:] = head + [rest]
