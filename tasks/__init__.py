"""Long-context evaluation tasks.

Generators for NVIDIA RULER's 13 synthetic tasks (Hsieh et al., 2024, "RULER: What's the Real Context Size of Your
Long-Context Language Models?", arXiv 2404.06654) and a needle-depth sweep, built for any target length with the
evaluated model's tokenizer, plus RULER's string-matching scorers.
"""

from tasks.base import Question, Sample, Task
from tasks.fit import LengthError
from tasks.registry import GROUPS, TASKS, UnknownTaskError, resolve_tasks
from tasks.scoring import score

__all__ = [
    "GROUPS",
    "TASKS",
    "LengthError",
    "Question",
    "Sample",
    "Task",
    "UnknownTaskError",
    "resolve_tasks",
    "score",
]
