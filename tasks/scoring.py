"""RULER's string-matching metrics (Hsieh et al., 2024, arXiv 2404.06654, ``eval/synthetic/constants.py``).

Scores are returned per sample in ``[0, 1]`` (RULER reports the mean times 100).
"""

from __future__ import annotations

import re
from collections.abc import Sequence

from tasks.base import STRING_MATCH_ALL, STRING_MATCH_PART

_CONTROL_CHARS = re.compile(r"[\x00-\x1f]")


def postprocess(prediction: str | None) -> str:
    """RULER's ``postprocess_pred``: strip, turn control characters into newlines, strip again."""
    if prediction is None:
        return ""
    return _CONTROL_CHARS.sub("\n", prediction.strip()).strip()


def string_match_all(prediction: str, answers: Sequence[str]) -> float:
    """Fraction of gold answers found (case-insensitively) as substrings of the prediction."""
    if not answers:
        raise ValueError("string_match_all needs at least one answer")
    pred = postprocess(prediction).lower()
    return sum(1.0 for answer in answers if answer.lower() in pred) / len(answers)


def string_match_part(prediction: str, answers: Sequence[str]) -> float:
    """1.0 if any gold answer is found (case-insensitively) as a substring of the prediction, else 0.0."""
    if not answers:
        raise ValueError("string_match_part needs at least one answer")
    pred = postprocess(prediction).lower()
    return max(1.0 if answer.lower() in pred else 0.0 for answer in answers)


METRICS = {STRING_MATCH_ALL: string_match_all, STRING_MATCH_PART: string_match_part}


def score(metric: str, prediction: str, answers: Sequence[str]) -> float:
    """Score one prediction with a RULER metric.

    Parameters
    ----------
    metric : str
        ``"string_match_all"`` (mean over answers) or ``"string_match_part"`` (max over answers).
    prediction : str
        The model's generated text.
    answers : sequence of str
        Gold outputs.

    Returns
    -------
    float
        Score in ``[0, 1]``.
    """
    try:
        fn = METRICS[metric]
    except KeyError:
        raise ValueError(f"unknown metric {metric!r}; choose from: {', '.join(METRICS)}") from None
    return fn(prediction, answers)
