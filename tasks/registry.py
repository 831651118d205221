"""Registered tasks and task-name resolution.

NVIDIA RULER's 13 tasks with the configurations of its ``synthetic.yaml`` (Hsieh et al., 2024, arXiv 2404.06654),
plus a needle-depth sweep (``needle``).
"""

from __future__ import annotations

from tasks.base import Task
from tasks.cwe import CommonWordsTask
from tasks.fwe import FreqWordsTask
from tasks.niah import NiahTask
from tasks.qa import QATask
from tasks.vt import VariableTrackingTask

#: Depths of the ``needle`` sweep, chosen by ``index % 5`` (0 = start of the haystack, 1 = end).
NEEDLE_DEPTHS = (0.0, 0.25, 0.5, 0.75, 1.0)

_RULER: tuple[Task, ...] = (
    NiahTask("niah_single_1", haystack="repeat", key_type="words", value_type="numbers"),
    NiahTask("niah_single_2", haystack="essay", key_type="words", value_type="numbers"),
    NiahTask("niah_single_3", haystack="essay", key_type="words", value_type="uuids"),
    NiahTask("niah_multikey_1", haystack="essay", key_type="words", value_type="numbers", num_keys=4),
    NiahTask("niah_multikey_2", haystack="needle", key_type="words", value_type="numbers"),
    NiahTask("niah_multikey_3", haystack="needle", key_type="uuids", value_type="uuids"),
    NiahTask("niah_multivalue", haystack="essay", key_type="words", value_type="numbers", num_values=4),
    NiahTask("niah_multiquery", haystack="essay", key_type="words", value_type="numbers", num_queries=4),
    VariableTrackingTask("vt", num_chains=1, num_hops=4),
    CommonWordsTask("cwe", freq_cw=30, freq_ucw=3, num_cw=10),
    FreqWordsTask("fwe", alpha=2.0),
    QATask("qa_1", dataset="squad"),
    QATask("qa_2", dataset="hotpotqa"),
)
_EXTRA: tuple[Task, ...] = (
    NiahTask("needle", haystack="essay", key_type="words", value_type="numbers", depths=NEEDLE_DEPTHS),
)

TASKS: dict[str, Task] = {task.name: task for task in (*_RULER, *_EXTRA)}
GROUPS: dict[str, tuple[str, ...]] = {"ruler": tuple(task.name for task in _RULER)}


class UnknownTaskError(ValueError):
    """A task or group name that is not registered."""


def _choices() -> str:
    return ", ".join((*GROUPS, *TASKS))


def resolve_tasks(spec: str) -> list[Task]:
    """Resolve a comma-separated list of task and group names.

    Parameters
    ----------
    spec : str
        E.g. ``"ruler"`` or ``"niah_single_2,vt"``; whitespace around names is ignored.

    Returns
    -------
    list of Task
        In the order given, groups expanded, duplicates removed (first occurrence kept).

    Raises
    ------
    UnknownTaskError
        For an unknown name (the message lists the valid choices) or an empty spec.
    """
    names: list[str] = []
    for raw in spec.split(","):
        name = raw.strip()
        if not name:
            continue
        if name in GROUPS:
            names.extend(GROUPS[name])
        elif name in TASKS:
            names.append(name)
        else:
            raise UnknownTaskError(f"unknown task {name!r}; choose from: {_choices()}")
    if not names:
        raise UnknownTaskError(f"no task given; choose from: {_choices()}")
    return [TASKS[name] for name in dict.fromkeys(names)]
