"""Bad input: one line naming the valid choices, exit code 2, no traceback; nothing already written is lost."""

from __future__ import annotations

import json
import os
import subprocess
import sys

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
