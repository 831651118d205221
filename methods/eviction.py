"""Shared machinery of eviction methods: the budget parameter, its resolution and its guard."""

from __future__ import annotations

from dataclasses import dataclass

from methods.base import Method, check_budget_param, resolve_budget
from methods.store import LayerStore


@dataclass
class Eviction(Method):
    """Base of eviction methods. ``budget`` is a ratio in (0, 1] of the prompt or a token count (> 1).

    The budget is resolved once, against the prompt length of the prefill, per KV head (the convention of H2O's
    simulations and of kvpress). Methods that evict at every step keep the store at that size; prefill-only methods
    (``decode_evicts = False``) let generated tokens accumulate on top of it.
    """

    kind = "eviction"
    decode_evicts = True
    budget: float = 0.25

    def validate(self) -> None:
        super().validate()
        check_budget_param(self, self.budget)

    def resolve(self, store: LayerStore) -> int:
        """Resolve and remember the per-head budget for this store (called at prefill)."""
        b = resolve_budget(self.budget, store.seen)
        store.state["budget"] = b
        store.state["prefill_len"] = store.seen
        return b

    def max_rows(self, store: LayerStore) -> int | None:
        if "budget" not in store.state:
            return None
        extra = 0 if self.decode_evicts else store.seen - store.state["prefill_len"]
        return store.state["budget"] + extra

