"""Composition ``evict+quantize``: an eviction method picks the tokens, a quantization method stores them."""

from __future__ import annotations

from contextlib import ExitStack, contextmanager
from dataclasses import dataclass, field

from methods.base import Method
from methods.stats import Needs, StepStats

_STEP = ("_step_sum", "_step_max", "_step_last")


@dataclass
class Composite(Method):
    """``a+b``: ``a`` (eviction) runs first at every hook, then ``b`` (quantization) packs what is left.

    Each part keeps its own ``store.state`` namespace. The step statistics follow the rows: they are parked in aux
    columns while the eviction part selects rows, so the quantization part sees them aligned with what is left.
    """

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

    @contextmanager
    def _state(self, store, i: int):
        outer = store.state
        spaces = outer.setdefault("parts", [{} for _ in self.parts])
        store.state = spaces[i]
        try:
            yield
        finally:
            store.state = outer

    def on_prefill(self, store, stats) -> None:
        for i, p in enumerate(self.parts):
            with self._state(store, i):
                p.on_prefill(store, stats)

    def on_append(self, store, stats) -> None:
        if stats is not None:
            for seg, *cols in zip(store.segments, stats.sum, stats.max, stats.last):
                for name, col in zip(_STEP, cols):
                    seg.aux[name] = col
        for i, p in enumerate(self.parts):
            step = None
            if stats is not None:
                step = StepStats(*([seg.aux[n] for seg in store.segments] for n in _STEP), stats.n_queries)
                if i == len(self.parts) - 1:  # the last part may regroup rows: take the columns out first
                    for seg in store.segments:
                        for n in _STEP:
                            seg.aux.pop(n)
            with self._state(store, i):
                p.on_append(store, step)

    def max_rows(self, store):
        limits = []
        for i, p in enumerate(self.parts):
            with self._state(store, i):
                limits.append(p.max_rows(store))
        limits = [m for m in limits if m is not None]
        return min(limits) if limits else None

    def check_budget(self, store) -> None:
        for i, p in enumerate(self.parts):
            with self._state(store, i):
                p.check_budget(store)

    def extra_metrics(self, stores) -> dict:
        out = {}
        for i, p in enumerate(self.parts):
            with ExitStack() as stack:
                for s in stores:
                    stack.enter_context(self._state(s, i))
                out.update(p.extra_metrics(stores))
        return out
