"""End to end on the embedded SmolLM2-135M: the protocol answers a real long-context question."""

from __future__ import annotations

import pytest
import torch

import methods
import tasks
from harness.protocol import Session, build_prompt
from harness.results import read_records, summarize


@pytest.mark.slow
def test_full_answers_niah_single_2_at_2k(embedded):
    sample = tasks.TASKS["niah_single_2"].generate(embedded.tokenizer, 2048, 0, 0)
    prompt = build_prompt(embedded.tokenizer, sample.context, [(q.text, q.answer_prefix) for q in sample.questions])
    assert 1900 < len(prompt.context) + len(prompt.questions[0]) < 2200
    s = Session(embedded.model, embedded.tokenizer, methods.parse_spec("full"), torch.float32)
    (ans,) = s.run(prompt, 32)
    assert tasks.score(sample.metric, ans.text, sample.questions[0].answers) == 1.0, ans.text
    assert ans.stats_prefill["kept_rows"] == ans.stats_prefill["seen_rows"]


def test_several_questions_share_one_compressed_context(embedded):
    """The second question sees the same compressed context as the first (snapshot/restore), not the first answer."""
    tok = embedded.tokenizer
    ctx = "The secret code of the blue door is 4417. The secret code of the red door is 9023.\n"
    qs = [("What is the secret code of the red door?", "The code is"),
          ("What is the secret code of the blue door?", "The code is")]
    prompt = build_prompt(tok, ctx, qs)
    s = Session(embedded.model, embedded.tokenizer, methods.parse_spec("kivi:bits=4,group=32,residual=32"),
                torch.float16)
    a = s.run(prompt, 8)
    solo = s.run(build_prompt(tok, ctx, qs[1:]), 8)
    assert a[1].text == solo[0].text
    assert a[1].kv_bytes_prefill == solo[0].kv_bytes_prefill


def test_runner_resumes_without_duplicates(tmp_path):
    from harness import config, runner

    cfg = config.RunConfig(methods=methods.parse_specs("full,streaming:budget=0.5"),
                           tasks=tasks.resolve_tasks("niah_single_1"), lengths=[600], samples=2, out=tmp_path,
                           max_new_tokens=8, progress=False)
    recs = runner.run(cfg)
    assert len(recs) == 4
    again = runner.run(cfg)
    assert len(again) == 4 and len(read_records(tmp_path / "results.jsonl")) == 4
    summ = summarize(again)
    assert set(summ["method"]) == {"full", "streaming:budget=0.5,sinks=4"}
    for r in recs:
        for field in ("score", "kv_bytes_prefill", "kv_bytes_end", "bits_per_element", "compression_ratio",
                      "tokens_kept", "ttft_s", "tpot_s", "timing", "model_hash", "versions", "git_commit",
                      "device", "dtype", "kv_dtype", "method", "seed", "query_aware"):
            assert field in r, field
    full = [r for r in recs if r["method"] == "full"]
    stream = [r for r in recs if r["method"] != "full"]
    assert all(abs(r["compression_ratio"] - 1.0) < 1e-9 for r in full)  # fp16 rows vs fp16
    assert all(1.9 < r["compression_ratio"] < 2.1 and abs(r["tokens_kept"] - 0.5) < 0.01 for r in stream)
    assert (tmp_path / "summary.csv").exists() and (tmp_path / "summary.md").exists()
