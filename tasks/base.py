"""Core data types shared by every task generator.

A :class:`Sample` splits RULER's full input text (Hsieh et al., 2024, "RULER: What's the Real Context Size of Your
Long-Context Language Models?", arXiv 2404.06654) into the compressible ``context`` (instruction + haystack or
documents) and one or more :class:`Question` objects (the query template that follows the context), so a KV-cache
compression method can be applied to the context before the question is seen.
"""

from __future__ import annotations

import random
from dataclasses import dataclass, field
from typing import Any, Protocol, runtime_checkable

from transformers import PreTrainedTokenizerBase

STRING_MATCH_ALL = "string_match_all"
STRING_MATCH_PART = "string_match_part"


def count_tokens(tokenizer: PreTrainedTokenizerBase, text: str) -> int:
    """Number of tokens of ``text`` without special tokens.

    Parameters
    ----------
    tokenizer : PreTrainedTokenizerBase
        The evaluated model's tokenizer.
    text : str
        Text to tokenize.

    Returns
    -------
    int
        ``len(tokenizer(text, add_special_tokens=False).input_ids)``.
    """
    return len(tokenizer(text, add_special_tokens=False, verbose=False)["input_ids"])


def sample_rng(seed: int, task: str, length: int, index: int, *salt: object) -> random.Random:
    """Local random generator for one sample, independent of the global ``random`` state.

    Parameters
    ----------
    seed, task, length, index : int, str, int, int
        The sample's identity; the same values always give the same stream.
    *salt : object
        Extra components that derive an independent sub-stream (e.g. ``"order"``).

    Returns
    -------
    random.Random
        Seeded with a string, which Python hashes with SHA-512 (stable across runs and ``PYTHONHASHSEED``).
    """
    return random.Random("-".join(str(part) for part in (seed, task, length, index, *salt)))


@dataclass(frozen=True)
class Question:
    """The question part of a prompt.

    Attributes
    ----------
    text : str
        Everything after the context: RULER's query template filled in.
    answers : tuple of str
        Gold outputs.
    answer_prefix : str
        RULER's answer prefix, to be placed at the start of the assistant's turn by the caller.
    """

    text: str
    answers: tuple[str, ...]
    answer_prefix: str = ""


@dataclass(frozen=True)
class Sample:
    """One generated evaluation sample.

    Attributes
    ----------
    task : str
        Registered task name.
    length : int
        Requested target length in tokens (of ``context + questions[0].text``).
    index, seed : int
        Sample identity; generation is a pure function of ``(task, tokenizer, length, index, seed)``.
    context : str
        The compressible part: RULER's template up to and including the haystack or documents.
    questions : tuple of Question
        Usually one.
    metric : str
        ``"string_match_all"`` or ``"string_match_part"``.
    max_new_tokens : int
        RULER's ``tokens_to_generate`` for the task.
    meta : dict
        JSON-serialisable details (needle depths, haystack type, number of haystack units, ...).
    """

    task: str
    length: int
    index: int
    seed: int
    context: str
    questions: tuple[Question, ...]
    metric: str
    max_new_tokens: int
    meta: dict[str, Any] = field(default_factory=dict)

    def prompt_tokens(self, tokenizer: PreTrainedTokenizerBase) -> int:
        """Token count of ``context + questions[0].text`` (no special tokens)."""
        return count_tokens(tokenizer, self.context + self.questions[0].text)


@runtime_checkable
class Task(Protocol):
    """A sample generator.

    Attributes
    ----------
    name : str
        Registered name (e.g. ``"niah_single_2"``).
    metric : str
        Scoring function name, see :func:`tasks.scoring.score`.
    max_new_tokens : int
        RULER's ``tokens_to_generate``.
    """

    name: str
    metric: str
    max_new_tokens: int

    def generate(self, tokenizer: PreTrainedTokenizerBase, length: int, index: int, seed: int = 0) -> Sample:
        """Build the ``index``-th sample of about ``length`` tokens with ``tokenizer``."""
        ...
