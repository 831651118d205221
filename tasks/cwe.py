"""Common words extraction (RULER's ``common_words_extraction.py``; Hsieh et al., 2024, arXiv 2404.06654).

A numbered list of words in which ``num_cw`` common words appear ``freq_cw`` times each and the other words
``freq_ucw`` times; the model must name the ``num_cw`` most common words. As in RULER, a small solved example precedes
the list, and below 4096 total tokens (input plus generation) the frequencies drop to 6/1 (example: 3/1 with 20 words).
"""

from __future__ import annotations

import random
from dataclasses import dataclass

from transformers import PreTrainedTokenizerBase

from tasks import words
from tasks.base import STRING_MATCH_ALL, Question, Sample, count_tokens, sample_rng
from tasks.fit import LengthError, fit_units, within

INSTRUCTION = (
    "Below is a numbered list of words. In these words, some appear more often than others. "
    "Memorize the ones that appear most often.\n"
)
QUERY = "Question: What are the {num_cw} most common words in the above list?"
ANSWER_PREFIX = " Answer: The top {num_cw} words that appear most often in the list are:"
#: RULER switches to lower word frequencies for ``max_seq_length < 4096``.
SHORT_LENGTH = 4096


def numbered(word_list: list[str]) -> str:
    """RULER's list format: ``"1. word 2. word ..."``."""
    return " ".join(f"{i + 1}. {word}" for i, word in enumerate(word_list))


def _example(rng: random.Random, num_words: int, freq_cw: int, freq_ucw: int, num_cw: int) -> tuple[str, list[str]]:
    """Shuffled word list and its ``num_cw`` common words (RULER's ``get_example``).

    Common words are chosen among words that are not substrings of any other listed word, so that substring scoring
    cannot credit an answer for an uncommon word that contains it.
    """
    pool = words.sample_words(rng, num_words)
    common: list[str] = []
    for word in pool:
        if len(common) == num_cw:
            break
        if not any(word in other for other in pool if other != word):
            common.append(word)
    if len(common) < num_cw:  # only possible for tiny pools; fall back to RULER's plain choice
        common = pool[:num_cw]
    chosen = set(common)
    uncommon = [w for w in pool if w not in chosen]
    word_list = common * freq_cw + uncommon * freq_ucw
    rng.shuffle(word_list)
    return numbered(word_list), common


@dataclass(frozen=True)
class CommonWordsTask:
    """RULER's ``cwe`` task.

    Attributes
    ----------
    name : str
        Registered name.
    freq_cw, freq_ucw : int
        Repetitions of each common and uncommon word (for targets of at least 4096 total tokens).
    num_cw : int
        Number of common words to find.
    """

    name: str = "cwe"
    freq_cw: int = 30
    freq_ucw: int = 3
    num_cw: int = 10
    metric: str = STRING_MATCH_ALL
    max_new_tokens: int = 120

    def generate(self, tokenizer: PreTrainedTokenizerBase, length: int, index: int, seed: int = 0) -> Sample:
        """Generate one sample of about ``length`` tokens (``context + question``).

        Parameters
        ----------
        tokenizer : PreTrainedTokenizerBase
            The evaluated model's tokenizer, used to fit the number of distinct words.
        length : int
            Target token count of ``context + questions[0].text``. RULER's short-context frequencies apply when
            ``length + max_new_tokens < 4096``.
        index, seed : int
            Sample identity.

        Returns
        -------
        Sample
            Answers are the ``num_cw`` common words.
        """
        short = length + self.max_new_tokens < SHORT_LENGTH
        example_args = (20, 3, 1) if short else (40, 10, 3)
        freq_cw, freq_ucw = (6, 1) if short else (self.freq_cw, self.freq_ucw)
        question = QUERY.format(num_cw=self.num_cw)
        answer_prefix = ANSWER_PREFIX.format(num_cw=self.num_cw)

        ex_rng = sample_rng(seed, self.name, length, index, "example")
        ex_list, ex_answer = _example(ex_rng, *example_args, self.num_cw)
        # RULER appends the example's answer right after the prefix ("are:1. ..."); a space is added here.
        example = INSTRUCTION + ex_list + "\n" + question + answer_prefix + " " + numbered(ex_answer) + "\n"

        def build(n: int) -> tuple[str, list[str]]:
            rng = sample_rng(seed, self.name, length, index, n)
            word_list, common = _example(rng, n, freq_cw, freq_ucw, self.num_cw)
            return example + INSTRUCTION + word_list + "\n", common

        def measure(n: int) -> int:
            return count_tokens(tokenizer, build(n)[0] + question)

        lo = self.num_cw + 1
        n, tokens = fit_units(measure, length, lo, max(lo, length))
        if not within(tokens, length):
            raise LengthError(f"{self.name}: cannot fit {length} tokens (closest: {tokens})")
        context, common = build(n)
        return Sample(
            task=self.name,
            length=length,
            index=index,
            seed=seed,
            context=context,
            questions=(Question(text=question, answers=tuple(common), answer_prefix=answer_prefix),),
            metric=self.metric,
            max_new_tokens=self.max_new_tokens,
            meta={"num_words": n, "freq_cw": freq_cw, "freq_ucw": freq_ucw},
        )
