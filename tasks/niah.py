"""Needle-in-a-haystack tasks (RULER's ``niah.py``; Hsieh et al., 2024, arXiv 2404.06654).

Needles read ``"One of the special magic {numbers} for {key} is: {value}."`` and are hidden in one of three haystacks:
``repeat`` (the "The grass is green..." noise repeated), ``essay`` (Paul Graham essays, needles at depths drawn from
40 evenly spaced percentages) or ``needle`` (distractor needles with random keys and values). Keys and values are
``words`` (adjective-noun), 7-digit ``numbers`` or ``uuids``. The question asks for the values of ``num_queries`` of
the ``num_keys`` keys; every value of those keys must be recalled (``string_match_all``).

:class:`NiahTask` also implements the depth sweep (``depths`` set): one needle in the essay, placed at a depth taken
from the sample index.
"""

from __future__ import annotations

import random
import re
from collections.abc import Callable
from dataclasses import dataclass

from transformers import PreTrainedTokenizerBase

from tasks import words
from tasks.base import STRING_MATCH_ALL, Question, Sample, count_tokens, sample_rng
from tasks.data import essay_words
from tasks.fit import LengthError, fit_units, within

NEEDLE = "One of the special magic {type_needle_v} for {key} is: {value}."
REPEAT_NOISE = "The grass is green. The sky is blue. The sun is yellow. Here we go. There and back again."
INSTRUCTION = (
    "Some special magic {type_needle_v} are hidden within the following text. Make sure to memorize it. "
    "I will quiz you about the {type_needle_v} afterwards.\n"
)
QUERY = "What are all the special magic {type_needle_v} for {query} mentioned in the provided text?"
ANSWER_PREFIX = " The special magic {type_needle_v} for {query} mentioned in the provided text are"
#: RULER's candidate needle depths in percent: ``np.round(np.linspace(0, 100, 40))``.
DEPTHS = tuple(round(100 * i / 39) for i in range(40))
HAYSTACKS = ("repeat", "essay", "needle")
_SENTENCE_END = re.compile(r"(?<=[.!?])\s+")
#: Redraws tried per distractor needle when tuning the length of a ``needle`` haystack.
_REDRAWS = 16


def _singular(template: str) -> str:
    """RULER's rewrite of the template when exactly one value is asked for."""
    return template.replace("Some", "A").replace("are all", "is").replace("are", "is").replace("answers", "answer")


def split_sentences(text: str) -> list[str]:
    """Split on whitespace after ``.``, ``!`` or ``?`` (a dependency-free stand-in for NLTK's ``sent_tokenize``)."""
    return [s for s in _SENTENCE_END.split(text.strip()) if s]


@dataclass(frozen=True)
class NiahTask:
    """A RULER needle-in-a-haystack configuration (see ``synthetic.yaml``).

    Attributes
    ----------
    name : str
        Registered name.
    haystack : str
        ``"repeat"``, ``"essay"`` or ``"needle"``.
    key_type, value_type : str
        ``"words"``, ``"numbers"`` or ``"uuids"``.
    num_keys, num_values, num_queries : int
        RULER's ``num_needle_k`` (raised to at least ``num_queries``), ``num_needle_v`` and ``num_needle_q``.
    depths : tuple of float, optional
        Depth sweep: if set, a single needle is placed at ``depths[index % len(depths)]`` (0 = start of the
        haystack, 1 = end) instead of a random depth. Only for the ``essay`` haystack with one needle.
    """

    name: str
    haystack: str = "essay"
    key_type: str = "words"
    value_type: str = "numbers"
    num_keys: int = 1
    num_values: int = 1
    num_queries: int = 1
    depths: tuple[float, ...] | None = None
    metric: str = STRING_MATCH_ALL
    max_new_tokens: int = 128

    def __post_init__(self) -> None:
        if self.haystack not in HAYSTACKS:
            raise ValueError(f"unknown haystack {self.haystack!r}; choose from: {', '.join(HAYSTACKS)}")
        if self.depths is not None and (self.haystack != "essay" or self.num_keys * self.num_values != 1):
            raise ValueError("a depth sweep needs the essay haystack and exactly one needle")

    def generate(self, tokenizer: PreTrainedTokenizerBase, length: int, index: int, seed: int = 0) -> Sample:
        """Generate one sample of about ``length`` tokens (``context + question``).

        Parameters
        ----------
        tokenizer : PreTrainedTokenizerBase
            The evaluated model's tokenizer, used to fit the haystack size.
        length : int
            Target token count of ``context + questions[0].text``.
        index, seed : int
            Sample identity.

        Returns
        -------
        Sample
            Answers are the values of the queried keys.
        """
        rng = sample_rng(seed, self.name, length, index)
        num_keys = max(self.num_keys, self.num_queries)
        keys = _distinct(lambda: words.random_value(rng, self.key_type), num_keys)
        all_values = _distinct(lambda: words.random_value(rng, self.value_type), num_keys * self.num_values)
        values = [all_values[i * self.num_values : (i + 1) * self.num_values] for i in range(num_keys)]
        needles = [
            NEEDLE.format(type_needle_v=self.value_type, key=key, value=value)
            for key, vals in zip(keys, values, strict=True)
            for value in vals
        ]
        rng.shuffle(needles)
        queried = rng.sample(range(num_keys), self.num_queries)
        answers = tuple(v for i in queried for v in values[i])
        query_keys = [keys[i] for i in queried]
        query = ", ".join(query_keys[:-1]) + ", and " + query_keys[-1] if len(query_keys) > 1 else query_keys[0]

        type_v = self.value_type
        instruction, question_t, prefix_t = INSTRUCTION, QUERY, ANSWER_PREFIX
        if self.num_queries * self.num_values == 1:
            instruction, question_t, prefix_t = _singular(instruction), _singular(question_t), _singular(prefix_t)
            type_v = type_v[:-1]
        head = instruction.format(type_needle_v=type_v)
        question = question_t.format(type_needle_v=type_v, query=query)
        answer_prefix = prefix_t.format(type_needle_v=type_v, query=query)

        if self.depths is not None:
            depth = float(self.depths[index % len(self.depths)])
            depth_percents = [depth * 100]
        else:
            depth = None
            depth_percents = [float(d) for d in rng.sample(DEPTHS, len(needles))]
        reserved = set(keys)

        def draw_distractor(sub: random.Random) -> str:
            key = _distinct(lambda: words.random_value(sub, self.key_type), 1, reserved)[0]
            value = words.random_value(sub, self.value_type)
            return NEEDLE.format(type_needle_v=self.value_type, key=key, value=value)

        def units(n: int) -> list[str]:
            """Haystack units without the needles (``repeat`` and ``needle`` haystacks)."""
            if self.haystack == "repeat":
                return [REPEAT_NOISE] * n
            sub = sample_rng(seed, self.name, length, index, "haystack", n)
            return [draw_distractor(sub) for _ in range(n)]

        def build(n: int, haystack_units: list[str] | None = None) -> tuple[str, list[float]]:
            if self.haystack == "essay":
                return _essay_haystack(n, needles, depth_percents)
            lines = list(units(n) if haystack_units is None else haystack_units)
            place = sample_rng(seed, self.name, length, index, "positions", n)
            positions = sorted(place.sample(range(n), len(needles)))
            for pos, needle in zip(reversed(positions), reversed(needles), strict=True):
                lines.insert(pos, needle)
            return "\n".join(lines), [p / n for p in positions]

        def measure(n: int, haystack_units: list[str] | None = None) -> int:
            return count_tokens(tokenizer, head + build(n, haystack_units)[0] + "\n" + question)

        if self.haystack == "essay":
            lo, hi = 1, len(essay_words())
        else:
            lo, hi = len(needles), max(len(needles), length)
        n, tokens = fit_units(measure, length, lo, hi)
        tuned: list[str] | None = None
        if not within(tokens, length) and self.haystack == "needle":
            # A whole distractor needle (~80 tokens for uuids) can exceed 2% of a short target: swap a few distractors
            # for redraws of a suitable token length instead.
            for k in (n, n + 1, n - 1):
                if lo <= k <= hi:
                    candidate = _tune_units(
                        tokenizer,
                        units(k),
                        measure(k),
                        length,
                        draw_distractor,
                        sample_rng(seed, self.name, length, index, "tune", k),
                    )
                    if within(measure(k, candidate), length):
                        n, tuned, tokens = k, candidate, measure(k, candidate)
                        break
        if not within(tokens, length):
            raise LengthError(f"{self.name}: cannot fit {length} tokens (closest: {tokens})")
        haystack, fractions = build(n, tuned)
        meta: dict[str, object] = {
            "haystack": self.haystack,
            "num_units": n,
            "depths": fractions,
            "keys": list(keys),
            "query_keys": query_keys,
        }
        if depth is not None:
            meta["depth"] = depth
        return Sample(
            task=self.name,
            length=length,
            index=index,
            seed=seed,
            context=head + haystack + "\n",
            questions=(Question(text=question, answers=answers, answer_prefix=answer_prefix),),
            metric=self.metric,
            max_new_tokens=self.max_new_tokens,
            meta=meta,
        )


def _distinct(draw: Callable[[], str], k: int, exclude: set[str] | frozenset[str] = frozenset()) -> list[str]:
    """Draw ``k`` distinct values with ``draw()``, skipping any in ``exclude``."""
    out: list[str] = []
    while len(out) < k:
        value = draw()
        if value not in exclude and value not in out:
            out.append(value)
    return out


def _essay_haystack(n: int, needles: list[str], depth_percents: list[float]) -> tuple[str, list[float]]:
    """First ``n`` essay words split into sentences, needles inserted at sentence boundaries (RULER's scheme)."""
    sentences = split_sentences(" ".join(essay_words()[:n]))
    positions = sorted(int(len(sentences) * (d / 100)) for d in depth_percents)
    pieces: list[str] = []
    last = 0
    for pos, needle in zip(positions, needles, strict=True):
        pieces.append(" ".join(sentences[last:pos]))
        pieces.append(needle)
        last = pos
    pieces.append(" ".join(sentences[last:]))
    fractions = [pos / max(1, len(sentences)) for pos in positions]
    return " ".join(p for p in pieces if p), fractions


def _tune_units(
    tokenizer: PreTrainedTokenizerBase,
    units: list[str],
    tokens: int,
    target: int,
    draw: Callable[[random.Random], str],
    rng: random.Random,
) -> list[str]:
    """Swap distractor units for redraws so that the token count moves from ``tokens`` towards ``0.99 * target``.

    Token counts of newline-separated units are nearly additive, so each unit's contribution is measured alone.
    """
    units = list(units)
    deficit = round(0.99 * target) - tokens
    for i, unit in enumerate(units):
        if abs(deficit) <= 0.005 * target:
            break
        old = count_tokens(tokenizer, unit)
        best, best_delta = unit, 0
        for _ in range(_REDRAWS):
            candidate = draw(rng)
            delta = count_tokens(tokenizer, candidate) - old
            if abs(deficit - delta) < abs(deficit - best_delta):
                best, best_delta = candidate, delta
        units[i] = best
        deficit -= best_delta
    return units
