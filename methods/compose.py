"""Composition ``evict+quantize``: an eviction method picks the tokens, a quantization method stores them."""

from __future__ import annotations

from dataclasses import dataclass, field

from methods.base import Method
from methods.stats import Needs


@dataclass
class Composite(Method):
    """``a+b``: ``a`` (eviction) runs first at every hook, then ``b`` (quantization) packs what is left."""

    parts: list[Method] = field(default_factory=list)
    kind = "mixed"

    @property
    def name(self) -> str:  # type: ignore[override]
        return "+".join(p.name for p in self.parts)

    @property
    def paper(self) -> str:  # type: ignore[override]
        return "; ".join(p.paper for p in self.parts)

    def validate(self) -> None:
        pass

    def params(self) -> dict:
        return {}

    def spec(self) -> str:
        return "+".join(p.spec() for p in self.parts)

    def needs(self) -> Needs:
        out = Needs()
        for p in self.parts:
            out = out | p.needs()
        return out

    def on_prefill(self, store, stats) -> None:
        for p in self.parts:
            p.on_prefill(store, stats)

    def on_append(self, store, stats) -> None:
        for i, p in enumerate(self.parts):
            # statistics are aligned with the store as it was before the first part changed it
            p.on_append(store, stats if i == 0 else None)

    def max_rows(self, store):
        limits = [m for m in (p.max_rows(store) for p in self.parts) if m is not None]
        return min(limits) if limits else None
