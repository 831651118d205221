"""What a policy may ask to see, and the statistics the attention function hands it.

Policies declare :class:`Needs`; the attention function computes only what is declared, next to (not instead of)
the fast attention of the main pass: at prefill it recomputes softmax rows only for the last ``n`` queries, and the
accumulated column sums (H2O) in query chunks, never a full T x T matrix for all heads at once.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class Needs:
    """Statistics a method needs.

    Attributes
    ----------
    last_n : int
        Prefill: softmax rows of the last ``n`` queries over all prompt keys (SnapKV window, QAQ window, TOVA 1).
    colsum : bool
        Prefill: attention each key receives, summed over every causal query and the KV group's query heads (H2O).
    qnorm : bool
        Prefill: squared L2 norms of the queries (QAQ ``q_norm=measured``).
    step : bool
        After prefill: attention the new queries pay to every cached row (H2O, TOVA, QAQ decode).
    """

    last_n: int = 0
    colsum: bool = False
    qnorm: bool = False
    step: bool = False

    def __or__(self, other: Needs) -> Needs:
        return Needs(max(self.last_n, other.last_n), self.colsum or other.colsum, self.qnorm or other.qnorm,
                     self.step or other.step)


@dataclass
class PrefillStats:
    """Statistics of a prefill of ``T`` tokens; key axes follow the prefill's rows (head-major, position order).

    Attributes
    ----------
    last_n : Tensor[H_kv, g, n, T] or None
        Softmax probabilities of the last ``n`` queries (``g`` query heads per KV head), causal.
    colsum : Tensor[H_kv, T] or None
        Column sums of the causal softmax over all ``T`` queries and the ``g`` query heads of each KV head.
    qnorm2 : Tensor[H_q, T] or None
        Squared query norms.
    """

    last_n: torch.Tensor | None = None
    colsum: torch.Tensor | None = None
    qnorm2: torch.Tensor | None = None


@dataclass
class StepStats:
    """Attention paid by the queries of one forward step (``n_queries`` tokens) to every row of every segment.

    One tensor per segment of the store (after the new rows were appended), aligned with the segment's rows:
    ``sum`` over the KV group's query heads and the step's queries; ``max`` over the same; ``last`` summed over the
    group's heads at the step's last query only.
    """

    sum: list[torch.Tensor]
    max: list[torch.Tensor]
    last: list[torch.Tensor]
    n_queries: int
