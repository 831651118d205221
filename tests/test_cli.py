"""Bad input: one line naming the valid choices, exit code 2, no traceback; nothing already written is lost."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

BAD = [
    (["run", "--methods", "nope"], "choose from"),
    (["run", "--methods", "kivi:bitz=2"], "valid:"),
    (["run", "--methods", "kivi:bits=5"], "expected"),
    (["run", "--methods", "kivi:bits"], "key=value"),
    (["run", "--methods", "streaming:budget=0"], "budget"),
    (["run", "--methods", "streaming:budget=2.5"], "budget"),
    (["run", "--methods", "full+kivi"], "eviction+quantization"),
    (["run", "--tasks", "nope"], "choose from"),
    (["run", "--lengths", "4q"], "4k"),
    (["run", "--samples", "0"], "samples"),
    (["run", "--model", "/nonexistent/model.gguf"], "not found"),
    (["run", "--model", "nobody/no-such-model-xyz"], "not available offline"),
    (["run", "--lengths", "64k"], "window"),
    (["run", "--device", "cuda:7", "--lengths", "1k"], "device"),
    (["frobnicate"], "invalid choice"),
]


def _run(args, cwd=None):
    env = dict(os.environ, HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1")
    return subprocess.run([sys.executable, "-m", "harness", *args], capture_output=True, text=True, env=env,
                          cwd=cwd or os.getcwd(), timeout=300)


@pytest.mark.parametrize("args,needle", BAD, ids=[" ".join(a) for a, _ in BAD])
def test_bad_input_exits_2_with_one_line(args, needle, tmp_path):
    if "--device" in args:
        import torch

        if torch.cuda.is_available():
            pytest.skip("CUDA present")
    p = _run([*args, "--out", str(tmp_path)] if args[0] == "run" else args)
    assert p.returncode == 2, p.stderr
    assert "Traceback" not in p.stderr
    err_lines = [ln for ln in p.stderr.splitlines() if ln.startswith("error")]
    assert len(err_lines) == 1 and needle in err_lines[0], p.stderr


def test_corrupt_results_file_is_reported_and_kept(tmp_path):
    good = {"model": "m", "task": "t", "length": 1, "method": "full", "index": 0, "seed": 0, "query_aware": False}
    body = json.dumps(good) + "\n{not json\n"
    (tmp_path / "results.jsonl").write_text(body)
    p = _run(["run", "--methods", "full", "--out", str(tmp_path)])
    assert p.returncode == 2 and "corrupt at line 2" in p.stderr and "Traceback" not in p.stderr
    assert (tmp_path / "results.jsonl").read_text() == body
    p = _run(["summarize", str(tmp_path)])
    assert p.returncode == 2 and "corrupt" in p.stderr


def test_methods_lists_every_method_with_params():
    import methods

    p = _run(["methods"])
    assert p.returncode == 0
    for row in methods.describe():
        assert row["name"] in p.stdout and row["paper"] in p.stdout
        for prm in row["params"]:
            assert prm["name"] in p.stdout


def test_git_commit_says_dirty_when_the_measured_code_differs(tmp_path, monkeypatch):
    """Records and leaderboard rows name the commit; a working tree with edits to the code must not pass for it."""
    import importlib.util
    import shutil

    monkeypatch.delenv("KVHARNESS_GIT_COMMIT", raising=False)
    (tmp_path / "harness").mkdir()
    (tmp_path / "methods").mkdir()
    shutil.copy(Path(__file__).parent.parent / "harness" / "runner.py", tmp_path / "harness" / "runner.py")
    (tmp_path / "methods" / "m.py").write_text("x = 1\n")
    (tmp_path / "notes.md").write_text("a\n")

    def git(*a):
        subprocess.run(["git", "-c", "user.name=t", "-c", "user.email=t@t", *a], cwd=tmp_path, check=True,
                       capture_output=True)

    git("init", "-q")
    git("add", ".")
    git("commit", "-qm", "c")
    spec = importlib.util.spec_from_file_location("runner_copy", tmp_path / "harness" / "runner.py")
    runner = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(runner)
    head = subprocess.run(["git", "rev-parse", "--short=12", "HEAD"], cwd=tmp_path, capture_output=True,
                          text=True).stdout.strip()
    assert runner.git_commit() == head
    (tmp_path / "notes.md").write_text("b\n")  # not code: still the commit
    assert runner.git_commit() == head
    clean = runner.code_digest(tmp_path)
    (tmp_path / "methods" / "new.py").write_text("y = 1\n")  # a new file in the code, not yet committed
    added = runner.code_digest(tmp_path)
    assert added != clean and runner.git_commit() == f"{head}+dirty:{added}"
    (tmp_path / "methods" / "new.py").unlink()
    assert runner.git_commit() == head and runner.code_digest(tmp_path) == clean
    (tmp_path / "methods" / "m.py").write_text("x = 2\n")
    edited = runner.code_digest(tmp_path)
    assert edited not in (clean, added) and runner.git_commit() == f"{head}+dirty:{edited}"
    # the digest names the code, not the checkout: committing the edit leaves it as it was
    git("commit", "-qam", "d")
    head2 = subprocess.run(["git", "rev-parse", "--short=12", "HEAD"], cwd=tmp_path, capture_output=True,
                           text=True).stdout.strip()
    assert head2 != head and runner.git_commit() == head2 and runner.code_digest(tmp_path) == edited
    (tmp_path / "methods" / "café.py").write_text("z = 1\n")  # a name git quotes without -z
    accented = runner.code_digest(tmp_path)
    (tmp_path / "methods" / "café.py").write_text("z = 2\n")
    assert len({edited, accented, runner.code_digest(tmp_path)}) == 3
