"""The QAQ reference code's memory accounting (``src/quantizer.py`` L275-298; METHODS.md §1.7 and §6).

Per tensor (K or V) over all layers: ``avg_bits = mean_g(bits_g) * (1 - r) + 16 r`` (nominal ``r``, outlier indices
not counted), ``size_per_token = avg_bits * L * H_kv * d + 2 * 16 * G_tok`` with ``G_tok = L`` (level=layer) or
``L * H_kv`` (level=head); a tensor left dense (``target``) costs ``16 * L * H_kv * d``.
``average_size = (key_size + value_size) / 2`` and the paper's compression ratio is ``16 * L * H_kv * d /
average_size``. Our hidden size is ``H_kv * d`` (the heads actually stored; the reference's Llama-2 has H_kv = H).
Bit widths are the logical ones (5-7 bits count as such, not as their 8-bit container).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch


def _bits(states: list[dict], name: str, include_decode: bool) -> torch.Tensor | None:
    parts = [s[f"prefill_{name}_bits"] for s in states]
    if include_decode:
        parts += [s[f"decode_{name}_bits"] for s in states]
    parts = [p for p in parts if p is not None]
    return torch.cat(parts).double() if parts else None


def qaq_reference_accounting(stores: Sequence, include_decode: bool = False) -> dict[str, float]:
    """Reference-convention sizes for the QAQ stores of one sequence (one :class:`LayerStore` per layer).

    Parameters
    ----------
    stores : sequence of LayerStore
        Every layer's store (e.g. ``[layer.store for layer in cache.layers]``), after the prefill.
    include_decode : bool
        Also average the groups quantized at decode time (the reference quantizes the prompt only).

    Returns
    -------
    dict with ``avg_bits_k``, ``avg_bits_v`` (mean data bits incl. the 16 r outlier charge), ``key_size``,
    ``value_size``, ``average_size`` (bits per token), ``bits_per_element`` (``average_size / (L H_kv d)``) and
    ``compression_ratio`` (``16 L H_kv d / average_size``). Empty dict when no store was quantized by QAQ.
    """
    states = [s.state["qaq"] for s in stores if "qaq" in s.state]
    if not states:
        return {}
    s0 = states[0]
    L, elems = len(states), s0["n_kv_heads"] * s0["head_dim"]
    r = float(s0["outliers"])
    g_tok = L * (s0["n_kv_heads"] if s0["level"] == "head" else 1)
    out: dict[str, float] = {}
    for name in ("k", "v"):
        b = _bits(states, name, include_decode)
        if b is None or not b.numel():
            avg, size = 16.0, 16.0 * L * elems
        else:
            avg = float(b.mean()) * (1 - r) + 16 * r
            size = avg * L * elems + s0["params"] * 16 * g_tok
        out[f"avg_bits_{name}"] = avg
        out["key_size" if name == "k" else "value_size"] = size
    avg_size = (out["key_size"] + out["value_size"]) / 2
    out["average_size"] = avg_size
    out["bits_per_element"] = avg_size / (L * elems)
    out["compression_ratio"] = 16 * L * elems / avg_size
    return out
