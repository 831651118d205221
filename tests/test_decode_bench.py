"""``python -m harness bench decode``: a model's decode time and KV memory per method, random weights (CPU, tiny)."""

from __future__ import annotations

import csv

import pytest
import torch

from harness import cli, decode_bench


def _rows(path):
    with path.open() as f:
        return list(csv.DictReader(f))


def test_named_shapes_are_the_published_models():
    """The named shapes build the published models' parameter counts (on the meta device: nothing allocated)."""
    from transformers import AutoModelForCausalLM

    want = {"llama-3.1-8b": 8_030_261_248, "smollm2-135m": 134_515_008}
    for name, n in want.items():
        with torch.device("meta"):
            model = AutoModelForCausalLM.from_config(decode_bench.model_config(name))
        assert sum(p.numel() for p in model.parameters()) == n, name
    cfg = decode_bench.model_config("llama-3.1-8b")
    assert (cfg.num_key_value_heads, cfg.head_dim, cfg.num_hidden_layers) == (8, 128, 32)


def test_measures_every_method_and_appends_rows(tmp_path):
    """A stock row (DynamicCache + SDPA, float32 on CPU) and one row per method with its real bytes: the full cache
    holds exactly layers x KV heads x tokens x head dim x (K, V) fp16 values, KIVI 2-bit and SnapKV at half the
    budget hold less, times are positive; the CSV gets one row per run and a second run appends to it."""
    out = tmp_path / "decode.csv"
    args = ["--shape", "tiny", "--methods", "full,kivi:bits=2,snapkv:budget=0.5", "--context", "200",
            "--new-tokens", "3", "--csv", str(out)]
    rows = decode_bench.run(args)
    assert [r["method"].split(":")[0] for r in rows] == ["stock", "full", "kivi", "snapkv"]
    shape = decode_bench.SHAPES["tiny"]
    stock, full = rows[0], rows[1]
    # the stock path holds the same tokens in the model's dtype (float32 on CPU): twice the fp16 bytes
    assert stock["method"] == decode_bench.STOCK and stock["kv_bytes_prefill"] == 2 * full["kv_bytes_prefill"]
    assert stock["kv_bytes_end"] == 2 * full["kv_bytes_end"] and stock["compression_ratio"] == pytest.approx(0.5)
    assert full["kv_bytes_prefill"] == shape["num_hidden_layers"] * shape["num_key_value_heads"] * 200 * \
        shape["head_dim"] * 2 * 2
    assert full["kv_bytes_end"] == full["kv_bytes_prefill"] * 203 // 200
    assert full["compression_ratio"] == pytest.approx(1.0)
    kivi, snap = rows[2], rows[3]
    # KIVI keeps its last 128 tokens (and those beyond whole key blocks) in fp16: at 200 tokens 59% of the full bytes
    assert kivi["kv_bytes_prefill"] < 0.7 * full["kv_bytes_prefill"] and kivi["compression_ratio"] > 1.4
    assert snap["kv_bytes_prefill"] <= full["kv_bytes_prefill"] * 0.5 + 1e-9
    for r in rows:
        assert r["prefill_s"] > 0 and 0 < r["tpot_ms"] <= r["tpot_p90_ms"]
        assert r["weights"] == "random" and r["timing"] == "wall_clock" and r["peak_mem_bytes"] is None
    written = _rows(out)
    assert [r["method"] for r in written] == [r["method"] for r in rows]
    assert int(written[1]["kv_bytes_end"]) == full["kv_bytes_end"]
    assert cli.main(["bench", "decode", *args[:3], "full", *args[4:], "--no-stock"]) == 0
    assert len(_rows(out)) == 5


def test_local_config_folder(tmp_path):
    """``--shape`` also takes a local model folder (or its config.json): the model is built from that config."""
    from transformers import LlamaConfig

    cfg = dict(decode_bench.SHAPES["tiny"], num_hidden_layers=3)
    LlamaConfig(**cfg).save_pretrained(tmp_path)
    for shape in (tmp_path, tmp_path / "config.json"):
        (row,) = decode_bench.run(["--shape", str(shape), "--methods", "full", "--context", "64", "--new-tokens", "2",
                                   "--no-stock"])
        assert row["kv_bytes_prefill"] == 3 * 2 * 64 * 32 * 2 * 2


def test_p90_is_the_nearest_rank():
    assert decode_bench.nearest_rank(list(range(1, 11)), 0.9) == 9
    assert decode_bench.nearest_rank([1.0, 2.0], 0.9) == 2.0 and decode_bench.nearest_rank([5.0], 0.9) == 5.0
    assert decode_bench.nearest_rank(list(range(100)), 0.9) == 89


@pytest.mark.parametrize("args,msg", [
    (["--seed", "99999999999999999999999"], "--seed"),
    (["--shape", "llama-9b"], "choose from: llama-3.1-8b"),
    (["--context", "5000"], "choose --context up to"),
    (["--methods", "foo"], "choose from:"),
    (["--methods", "kivi:bits=5"], "kivi"),
    (["--new-tokens", "1"], "at least 2"),
    (["--context", "1k,2k"], "one length"),
    (["--context", "0"], "bad length"),
    (["--device", "tpu"], "choose cpu, cuda"),
    (["--dtype", "half"], "invalid choice"),
])
def test_bad_input_is_one_line_and_exit_2(args, msg, capsys):
    try:
        rc = cli.main(["bench", "decode", *args])
    except SystemExit as e:  # argparse's own errors (the parser prints one line and exits 2)
        rc = e.code
    assert rc == 2
    err = capsys.readouterr().err
    assert msg in err and len(err.strip().splitlines()) == 1 and "Traceback" not in err


def test_triton_kernels_without_cuda_are_a_user_error(capsys, monkeypatch):
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)  # (CPU test runs set it for the kernel tests)
    assert cli.main(["bench", "decode", "--kernels", "triton"]) == 2
    assert "needs a CUDA device" in capsys.readouterr().err


def test_cuda_unavailable_is_a_user_error(capsys, monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert cli.main(["bench", "decode", "--device", "cuda"]) == 2
    assert "CUDA is not available" in capsys.readouterr().err


def test_csv_of_other_columns_is_left_alone(tmp_path, capsys):
    """An existing CSV with other columns is an error before anything runs, and the file is unchanged."""
    out = tmp_path / "other.csv"
    out.write_text("a,b\n1,2\n")
    assert cli.main(["bench", "decode", "--methods", "full", "--context", "32", "--csv", str(out)]) == 2
    assert "other columns" in capsys.readouterr().err
    assert out.read_text() == "a,b\n1,2\n"


def test_overflowing_random_model_is_refused(monkeypatch, capsys):
    """Logits that are not finite (a random model overflowing its dtype) stop the run with one line: a method's
    data-dependent choices would otherwise be timed on garbage."""
    build = decode_bench.random_model

    def nan_model(*a, **k):
        model = build(*a, **k)
        with torch.no_grad():
            model.lm_head.weight.fill_(float("nan"))
        return model

    monkeypatch.setattr(decode_bench, "random_model", nan_model)
    assert cli.main(["bench", "decode", "--methods", "full", "--context", "32", "--no-stock"]) == 2
    assert "not finite" in capsys.readouterr().err


def _saved(tmp_path, name, cfg):
    folder = tmp_path / name
    cfg.save_pretrained(folder)
    return str(folder)


def test_configs_it_cannot_measure_are_refused(tmp_path, capsys):
    """Local configs the compressed cache cannot run fairly or at all: one line and exit 2 each (a sliding window,
    which the stock cache would honour and the compressed cache not; an encoder-decoder; a model that is no causal
    LM)."""
    from transformers import MistralConfig, T5Config, ViTConfig

    small = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                 num_key_value_heads=2, vocab_size=128)
    cases = [(_saved(tmp_path, "mistral", MistralConfig(**small, sliding_window=16)), "sliding-window"),
             (_saved(tmp_path, "t5", T5Config(d_model=64, d_ff=128, num_layers=1, num_heads=2, vocab_size=128)),
              "encoder-decoder"),
             (_saved(tmp_path, "vit", ViTConfig(hidden_size=64, num_hidden_layers=1, num_attention_heads=2,
                                                 intermediate_size=128)), "causal LM")]
    for shape, msg in cases:
        assert cli.main(["bench", "decode", "--shape", shape, "--methods", "full", "--context", "32"]) == 2, shape
        err = capsys.readouterr().err
        assert msg in err and len(err.strip().splitlines()) == 1, err


def test_csv_paths_it_cannot_append_to(tmp_path, capsys):
    """A directory, or a path under a file, as ``--csv``: one line and exit 2 before anything runs."""
    blocker = tmp_path / "file"
    blocker.write_text("x")
    for path in (tmp_path, blocker / "out.csv"):
        assert cli.main(["bench", "decode", "--methods", "full", "--context", "32", "--csv", str(path)]) == 2
        assert "--csv" in capsys.readouterr().err
    assert blocker.read_text() == "x"


def test_rows_never_join_a_last_line_without_newline(tmp_path):
    out = tmp_path / "d.csv"
    out.write_text(",".join(decode_bench.COLS))  # a header without its newline
    decode_bench.run(["--methods", "full", "--context", "32", "--new-tokens", "2", "--no-stock", "--csv", str(out)])
    (row,) = _rows(out)
    assert row["method"] == "full" and row["context"] == "32"


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_gpu_time_of_a_step_on_cuda():
    from harness.decode_bench import kernel_time

    x = torch.randn(1024, 1024, device="cuda")
    ms, n = kernel_time(lambda: (x @ x).sum())
    assert n >= 2 and 0 < ms < 1000
