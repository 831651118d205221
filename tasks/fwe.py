"""Frequent words extraction (RULER's ``freq_words_extraction.py``; Hsieh et al., 2024, arXiv 2404.06654).

Random 6-letter "coded words" are drawn with Zipf frequencies (the ``k``-th ranked word appears
``floor(N * k**-alpha / zeta(alpha))`` times); the top-ranked word is replaced by the noise token ``"..."``, and the
model must name the three most frequent coded words (ranks 2-4).
"""

from __future__ import annotations

import math
import random
import string
from dataclasses import dataclass

from transformers import PreTrainedTokenizerBase

from tasks.base import STRING_MATCH_ALL, Question, Sample, count_tokens, sample_rng
from tasks.fit import LengthError, fit_units, within

INSTRUCTION = (
    "Read the following coded text and track the frequency of each coded word. "
    "Find the three most frequently appeared coded words. "
)
QUERY = (
    "Question: Do not provide any explanation. Please ignore the dots '....'. "
    "What are the three most frequently appeared words in the above coded text?"
)
ANSWER_PREFIX = " Answer: According to the coded text above, the three most frequently appeared words are:"


def zeta(alpha: float, terms: int = 1000) -> float:
    """Riemann zeta function for ``alpha > 1`` (Euler-Maclaurin; replaces ``scipy.special.zeta``)."""
    if alpha <= 1:
        raise ValueError("zeta(alpha) diverges for alpha <= 1")
    head = math.fsum(k**-alpha for k in range(1, terms))
    n = float(terms)
    return head + n ** (1 - alpha) / (alpha - 1) + 0.5 * n**-alpha + alpha * n ** (-alpha - 1) / 12


def _vocab(rng: random.Random, size: int, word_len: int) -> list[str]:
    """``size`` distinct random lowercase words, shuffled, with rank 1 replaced by the noise word ``"..."``."""
    vocab: set[str] = set()
    while len(vocab) < size:
        vocab.add("".join(rng.choices(string.ascii_lowercase, k=word_len)))
    ordered = sorted(vocab)
    rng.shuffle(ordered)
    ordered[0] = "..."
    return ordered


@dataclass(frozen=True)
class FreqWordsTask:
    """RULER's ``fwe`` task.

    Attributes
    ----------
    name : str
        Registered name.
    alpha : float
        Zipf exponent.
    coded_wordlen : int
        Letters per coded word.
    vocab_size : int
        Number of distinct words; ``-1`` uses RULER's ``(length + max_new_tokens) // 50``.
    """

    name: str = "fwe"
    alpha: float = 2.0
    coded_wordlen: int = 6
    vocab_size: int = -1
    metric: str = STRING_MATCH_ALL
    max_new_tokens: int = 50

    def generate(self, tokenizer: PreTrainedTokenizerBase, length: int, index: int, seed: int = 0) -> Sample:
        """Generate one sample of about ``length`` tokens (``context + question``).

        Parameters
        ----------
        tokenizer : PreTrainedTokenizerBase
            The evaluated model's tokenizer, used to fit the number of words.
        length : int
            Target token count of ``context + questions[0].text``.
        index, seed : int
            Sample identity.

        Returns
        -------
        Sample
            Answers are the three most frequent coded words.
        """
        rng = sample_rng(seed, self.name, length, index)
        size = self.vocab_size if self.vocab_size > 0 else max(5, (length + self.max_new_tokens) // 50)
        vocab = _vocab(rng, size, self.coded_wordlen)
        norm = zeta(self.alpha)
        weights = [k**-self.alpha / norm for k in range(1, len(vocab) + 1)]

        def build(n: int) -> str:
            sampled = [word for word, w in zip(vocab, weights, strict=True) for _ in range(int(n * w))]
            sample_rng(seed, self.name, length, index, n).shuffle(sampled)
            return INSTRUCTION + " ".join(sampled) + "\n"

        def measure(n: int) -> int:
            return count_tokens(tokenizer, build(n) + QUERY)

        # Each of the three answers must appear at least once: int(n * k**-alpha / zeta) >= 1 for k = 4.
        lo = math.ceil(norm * 4**self.alpha)
        n, tokens = fit_units(measure, length, lo, max(lo, 4 * length))
        if not within(tokens, length):
            raise LengthError(f"{self.name}: cannot fit {length} tokens (closest: {tokens})")
        return Sample(
            task=self.name,
            length=length,
            index=index,
            seed=seed,
            context=build(n),
            questions=(Question(text=QUERY, answers=tuple(vocab[1:4]), answer_prefix=ANSWER_PREFIX),),
            metric=self.metric,
            max_new_tokens=self.max_new_tokens,
            meta={"num_words": n, "vocab_size": size, "alpha": self.alpha},
        )
