"""Question answering with distractor documents (RULER's ``qa.py``; Hsieh et al., 2024, arXiv 2404.06654).

The gold paragraph(s) of a SQuAD v2 (``qa_1``) or HotpotQA (``qa_2``) question are shuffled among distractor
paragraphs, preferring ones from the same source (the other paragraphs of the SQuAD article, the HotpotQA
distractor paragraphs), then random paragraphs of the dataset, until the target length is reached.
"""

from __future__ import annotations

import random
from collections.abc import Iterator
from dataclasses import dataclass
from functools import lru_cache

from transformers import PreTrainedTokenizerBase

from tasks.base import STRING_MATCH_PART, Question, Sample, count_tokens, sample_rng
from tasks.data import QADataset, qa_dataset
from tasks.fit import GOOD_ENOUGH, LengthError, within

INSTRUCTION = (
    "Answer the question based on the given documents. Only give me the answer and do not output any other words."
)
DOCUMENT = "Document {i}:\n{document}"
ANSWER_PREFIX = " Answer:"
#: Approximate token overhead of a document beyond its text ("Document 12:\n" and the blank line).
_DOC_OVERHEAD = 8
#: Candidates tokenized per batch when costing distractors.
_BATCH = 64
#: How many candidates may be skipped (too long for the remaining budget) before the fill stops.
_MAX_SKIPS = 128


def render_context(docs: list[str]) -> str:
    """RULER's prompt up to and including the documents (plus the blank line before the repeated instruction)."""
    body = "\n\n".join(DOCUMENT.format(i=i + 1, document=d) for i, d in enumerate(docs))
    return INSTRUCTION + "\n\nThe following are given documents.\n\n" + body + "\n\n"


def render_question(query: str) -> str:
    """The question part of RULER's QA template."""
    return INSTRUCTION + "\n\nQuestion: " + query


@lru_cache(maxsize=16)
def _question_order(task: str, seed: int, count: int) -> tuple[int, ...]:
    order = list(range(count))
    random.Random(f"{seed}-{task}-questions").shuffle(order)
    return tuple(order)


class _Candidates:
    """Lazily drawn distractor stream (related documents first, then random ones) with token costs."""

    def __init__(
        self,
        dataset: QADataset,
        gold: tuple[int, ...],
        related: tuple[int, ...],
        rng: random.Random,
        tokenizer: PreTrainedTokenizerBase,
    ) -> None:
        self.dataset, self.tokenizer = dataset, tokenizer
        first = list(related)
        rng.shuffle(first)
        self.ids: list[int] = []
        self.costs: list[int] = []
        self._pending = first
        self._used = set(gold) | set(related)
        self._rng = rng
        self._stream = self._draw()

    def _draw(self) -> Iterator[int]:
        yield from self._pending
        total = len(self.dataset.docs)
        while len(self._used) < total:
            i = self._rng.randrange(total)
            if i not in self._used:
                self._used.add(i)
                yield i

    def __iter__(self) -> Iterator[tuple[int, int]]:
        pos = 0
        while True:
            if pos == len(self.ids):
                batch = [i for _, i in zip(range(_BATCH), self._stream, strict=False)]
                if not batch:
                    return
                encoded = self.tokenizer([self.dataset.docs[i] for i in batch], add_special_tokens=False, verbose=False)
                self.ids += batch
                self.costs += [len(ids) + _DOC_OVERHEAD for ids in encoded["input_ids"]]
            yield self.ids[pos], self.costs[pos]
            pos += 1


@dataclass(frozen=True)
class QATask:
    """RULER's ``qa_1`` (``dataset="squad"``) and ``qa_2`` (``dataset="hotpotqa"``) tasks.

    Attributes
    ----------
    name : str
        Registered name.
    dataset : str
        ``"squad"`` or ``"hotpotqa"``.
    """

    name: str
    dataset: str
    metric: str = STRING_MATCH_PART
    max_new_tokens: int = 32

    def generate(self, tokenizer: PreTrainedTokenizerBase, length: int, index: int, seed: int = 0) -> Sample:
        """Generate one sample of about ``length`` tokens (``context + question``).

        Parameters
        ----------
        tokenizer : PreTrainedTokenizerBase
            The evaluated model's tokenizer, used to choose distractors that fill the budget.
        length : int
            Target token count of ``context + questions[0].text``.
        index, seed : int
            Sample identity: the question is the ``index``-th of a ``seed``-dependent permutation (the same at every
            length); if its gold documents alone exceed ``length``, the next question that fits is used.

        Returns
        -------
        Sample
            ``meta`` holds ``qa_index`` (into :func:`tasks.data.qa_dataset`) and ``gold_docs`` (1-based document
            numbers of the gold paragraphs in the prompt).
        """
        data = qa_dataset(self.dataset)
        order = _question_order(self.name, seed, len(data.items))
        rng = sample_rng(seed, self.name, length, index)
        for step in range(len(order)):
            qa_index = order[(index + step) % len(order)]
            item = data.items[qa_index]
            question = render_question(item.query)
            gold_docs = [data.docs[i] for i in item.gold]
            base = count_tokens(tokenizer, render_context(gold_docs) + question)
            if base <= length * GOOD_ENOUGH:
                break
        else:
            raise LengthError(f"{self.name}: target length {length} is too small for any question")

        candidates = _Candidates(data, item.gold, item.related, rng, tokenizer)

        def build(selected: list[int]) -> tuple[str, list[int]]:
            ids = list(item.gold) + selected
            sample_rng(seed, self.name, length, index, "order", len(ids)).shuffle(ids)
            gold_positions = sorted(ids.index(g) + 1 for g in item.gold)
            return render_context([data.docs[i] for i in ids]), gold_positions

        aim = length - max(1, int(length * (1 - GOOD_ENOUGH) / 2))
        slack = max(1, int(length * (1 - GOOD_ENOUGH) / 2))
        budget, selected, tokens = aim - base, [], base
        for _ in range(8):
            selected, estimate = _fill(candidates, budget, slack)
            tokens = count_tokens(tokenizer, build(selected)[0] + question)
            if GOOD_ENOUGH * length <= tokens <= length:
                break
            # Correct the budget by the measured estimation error (document numbering, token merges).
            budget = aim - base - (tokens - base - estimate)
        if not within(tokens, length):
            raise LengthError(f"{self.name}: cannot fit {length} tokens (closest: {tokens})")
        context, gold_positions = build(selected)
        return Sample(
            task=self.name,
            length=length,
            index=index,
            seed=seed,
            context=context,
            questions=(Question(text=question, answers=item.outputs, answer_prefix=ANSWER_PREFIX),),
            metric=self.metric,
            max_new_tokens=self.max_new_tokens,
            meta={
                "dataset": self.dataset,
                "qa_index": qa_index,
                "num_docs": len(item.gold) + len(selected),
                "gold_docs": gold_positions,
            },
        )


def _fill(candidates: _Candidates, budget: int, slack: int) -> tuple[list[int], int]:
    """Select distractors whose estimated costs sum to within ``[budget - slack, budget]`` if possible.

    First-fit over the candidate stream (related documents first), then, if the remaining gap is still larger than
    ``slack``, one selected document is swapped for a skipped one whose cost closes the gap.

    Returns
    -------
    (list of int, int)
        Selected document ids (in stream order) and their summed estimated cost.
    """
    selected: list[tuple[int, int]] = []
    skipped: dict[int, int] = {}  # cost -> first skipped document with that cost
    total = skips = 0
    for doc_id, cost in candidates:
        if budget - total <= slack or skips >= _MAX_SKIPS:
            break
        if total + cost <= budget:
            selected.append((doc_id, cost))
            total += cost
        else:
            skipped.setdefault(cost, doc_id)
            skips += 1
    gap = budget - total
    if gap > slack:
        for pos in range(len(selected) - 1, -1, -1):
            _, old_cost = selected[pos]
            match = next((c for c in range(old_cost + gap, old_cost + gap - slack - 1, -1) if c in skipped), None)
            if match is not None:
                selected[pos] = (skipped[match], match)
                total += match - old_cost
                break
    return [doc_id for doc_id, _ in selected], total
