"""The uncompressed baseline."""

from __future__ import annotations

from dataclasses import dataclass

from methods.base import Method
from methods.registry import register


@register
@dataclass
class Full(Method):
    """Full-precision cache: every token kept in the cache dtype (the baseline every table compares against).

    References
    ----------
    The uncompressed KV cache of the model, as in transformers' ``DynamicCache``.
    """

    name = "full"
    kind = "baseline"
    paper = "baseline (uncompressed KV cache)"
