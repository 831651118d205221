"""Fit a haystack size to a token budget.

RULER (Hsieh et al., 2024, arXiv 2404.06654) grows the haystack by a fixed increment until the tokenized input exceeds
the budget, which needs hundreds of tokenizer calls at 128k tokens. Here the token count is nearly affine in the
number of haystack units (words, sentences, needles, list entries), so a secant search on measured counts converges
in a handful of tokenizer calls.
"""

from __future__ import annotations

from collections.abc import Callable

#: Allowed relative deviation from the target length.
TOLERANCE = 0.02
#: Stop searching once the count is at least this fraction of the target (and not above it).
GOOD_ENOUGH = 0.99


class LengthError(ValueError):
    """The requested length cannot be reached (too small for the task's fixed text, or too large for its data)."""


def within(tokens: int, target: int, tolerance: float = TOLERANCE) -> bool:
    """Whether ``tokens`` is within ``tolerance`` (relative) of ``target``."""
    return abs(tokens - target) <= tolerance * target


def fit_units(
    measure: Callable[[int], int],
    target: int,
    lo: int,
    hi: int,
    *,
    max_calls: int = 40,
) -> tuple[int, int]:
    """Largest unit count whose measured token count does not exceed ``target`` (approximately).

    Parameters
    ----------
    measure : callable
        ``measure(n)`` builds the prompt with ``n`` haystack units and returns its token count. Assumed
        non-decreasing up to noise; it is deterministic, and each value is computed once.
    target : int
        Token budget.
    lo, hi : int
        Smallest and largest admissible unit counts.
    max_calls : int
        Safety cap on the number of ``measure`` calls.

    Returns
    -------
    (int, int)
        The chosen unit count and its token count. Preference order: the largest count found with
        ``tokens <= target`` that is within :data:`TOLERANCE`; else the smallest count above ``target`` within
        :data:`TOLERANCE`; else the closest count seen.

    Raises
    ------
    LengthError
        If even ``lo`` units exceed the target by more than :data:`TOLERANCE`.
    """
    cache: dict[int, int] = {}

    def m(n: int) -> int:
        if n not in cache:
            cache[n] = measure(n)
        return cache[n]

    t_lo = m(lo)
    if t_lo > target * (1 + TOLERANCE):
        raise LengthError(f"target length {target} is too small: the shortest prompt has {t_lo} tokens")
    below, above = lo, None  # best n with tokens <= target (if t_lo <= target), smallest n with tokens > target
    if t_lo > target:
        below, above = None, lo

    # Probe a small haystack to estimate the marginal cost of one unit.
    probe = min(hi, lo + max(4, (hi - lo) // 1000, 1))
    n = probe
    while len(cache) < max_calls:
        if n is None or n in cache:
            break
        t = m(n)
        if t <= target:
            if below is None or n > below:
                below = n
        elif above is None or n < above:
            above = n
        if below is not None and m(below) >= GOOD_ENOUGH * target:
            break
        if below is not None and above is not None and above - below <= 1:
            break
        n = _next_guess(cache, target, below, above, lo, hi)
    if below is not None and within(m(below), target):
        return below, m(below)
    if above is not None and within(m(above), target):
        return above, m(above)
    best = min(cache, key=lambda k: (abs(cache[k] - target), k))
    return best, cache[best]


def _next_guess(
    cache: dict[int, int], target: int, below: int | None, above: int | None, lo: int, hi: int
) -> int | None:
    """Secant step towards ``GOOD_ENOUGH``-ish of the target, kept strictly inside the current bracket."""
    aim = target * (1 + GOOD_ENOUGH) / 2
    points = sorted(cache.items())
    # Slope from the two measured points that bracket (or are nearest to) the aim.
    a = below if below is not None else points[0][0]
    b = above if above is not None else max(cache)
    if a == b:
        others = [k for k in cache if k != a]
        if not others:
            return None
        b = max(others, key=lambda k: abs(k - a))
    x0, x1 = sorted((a, b))
    slope = (cache[x1] - cache[x0]) / (x1 - x0)
    if slope <= 0:
        slope = max(1e-3, cache[max(cache)] / max(1, max(cache)))
    base = below if below is not None else a
    guess = round(base + (aim - cache[base]) / slope)
    low_bound = below + 1 if below is not None else lo
    high_bound = above - 1 if above is not None else hi
    if low_bound > high_bound:
        return None
    guess = min(max(guess, low_bound), high_bound)
    if guess in cache:  # fall back to bisection inside the bracket
        guess = (low_bound + high_bound) // 2
        if guess in cache:
            return None
    return guess
