"""The method interface: a small dataclass of typed, validated parameters plus two hooks.

A method sees the layer's :class:`~methods.store.LayerStore` and the statistics it declared in :meth:`Method.needs`:

* :meth:`Method.on_prefill` runs right after a layer's prefill; the prompt's rows are in the store as dense rows;
* :meth:`Method.on_append` runs after every later forward step (question chunk, each generated token), with the new
  rows appended densely.

Eviction methods select rows (``store.select``); quantization methods repack rows into packed parts. Methods never
touch model internals. :meth:`Method.check_budget` is called after every hook on every layer: an eviction method
whose store holds more than its budget fails loudly.
"""

from __future__ import annotations

import dataclasses
import typing
from dataclasses import dataclass
from typing import ClassVar

from methods.stats import Needs, PrefillStats, StepStats
from methods.store import LayerStore


class SpecError(ValueError):
    """A malformed or invalid method spec; the message is one line naming the valid choices."""


class BudgetViolation(AssertionError):
    """A store holds more tokens than its method's budget allows."""


@dataclass
class Method:
    """Base class of every method. Subclasses are dataclasses; their fields are the method's parameters.

    Each field may carry ``metadata={"help": ...}``; fields with ``Literal`` types list their choices.
    """

    name: ClassVar[str] = ""
    paper: ClassVar[str] = ""
    kind: ClassVar[str] = ""  # "baseline" | "eviction" | "quantization" | "mixed"
    per_channel_blocks: ClassVar[bool] = False  # stores tokens in blocks that cannot lose single tokens
    decode_evicts: ClassVar[bool] = False  # evicts after the prefill too (at every step)

    def __post_init__(self) -> None:
        self.validate()

    # -- parameters ---------------------------------------------------------------------------------------------
    def validate(self) -> None:
        """Raise :class:`SpecError` on invalid parameters (subclasses extend)."""
        hints = typing.get_type_hints(type(self))
        for f in dataclasses.fields(self):
            choices = literal_choices(hints.get(f.name))
            if choices and getattr(self, f.name) not in choices:
                val = getattr(self, f.name)
                raise SpecError(f"{self.name}: {f.name}={val!r} is not one of {', '.join(map(str, choices))}")

    def params(self) -> dict:
        return {f.name: getattr(self, f.name) for f in dataclasses.fields(self)}

    def spec(self) -> str:
        """Canonical spec with every resolved parameter, e.g. ``kivi:bits=2,group=32,residual=128``."""
        p = self.params()
        return self.name + (":" + ",".join(f"{k}={_fmt(v)}" for k, v in p.items()) if p else "")

    # -- hooks --------------------------------------------------------------------------------------------------
    def needs(self) -> Needs:
        return Needs()

    def on_prefill(self, store: LayerStore, stats: PrefillStats) -> None:
        """Compress the prompt rows just written to ``store`` (default: keep them dense)."""

    def on_append(self, store: LayerStore, stats: StepStats | None) -> None:
        """Handle rows appended after the prefill (default: keep them dense)."""

    def max_rows(self, store: LayerStore) -> int | None:
        """Most rows any KV head of this store may hold now, or None when unbounded."""
        return None

    def check_budget(self, store: LayerStore) -> None:
        limit = self.max_rows(store)
        if limit is None:
            return
        counts = store.counts()
        if max(counts, default=0) > limit:
            raise BudgetViolation(f"{self.spec()}: layer {store.info.layer} holds {counts} rows per head, "
                                  f"budget {limit}")

    def extra_metrics(self, stores: list[LayerStore]) -> dict:
        """Method-specific record fields computed from the layer stores after the prefill (default none)."""
        return {}


def literal_choices(tp) -> tuple | None:
    if typing.get_origin(tp) is typing.Literal:
        return typing.get_args(tp)
    return None


def _fmt(v) -> str:
    if isinstance(v, float) and v.is_integer():
        return str(int(v))
    return str(v).lower() if isinstance(v, bool) else str(v)


def resolve_budget(budget: float, n: int) -> int:
    """A budget as a ratio in (0, 1] of ``n`` tokens or an absolute token count (> 1); at least 1 token."""
    tokens = round(budget * n) if budget <= 1 else int(budget)
    return max(1, min(n, tokens))


def check_budget_param(method: Method, budget: float) -> None:
    if not (budget > 0) or (budget > 1 and not float(budget).is_integer()):
        raise SpecError(f"{method.name}: budget={budget} must be a ratio in (0, 1] or a whole number of tokens > 1")
