"""The kernel benchmark's fit (kernels/fit.py): marginal bandwidth and fixed cost recovered from rows built from known
values, and bad files rejected with one line and exit code 2 (``python -m kernels.bench --fit``)."""

import csv

import pytest

from kernels import bench
from kernels.fit import COLS, FitError, fit_rows, read_rows, to_markdown


def _write(path, rows):
    with open(path, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=["context", "batch", "method", "time_us", "bytes"])
        w.writeheader()
        w.writerows(rows)


def _rows(method, fixed_us, gbps, contexts=(4096, 32768, 131072), per_token=1000):
    # time = fixed + bytes / rate: bytes in B, rate in GB/s -> 1e-3 us per (B / (GB/s))
    return [dict(context=t, batch=8, method=method, bytes=t * per_token,
                 time_us=fixed_us + t * per_token / gbps * 1e-3) for t in contexts]


def test_fit_recovers_rate_and_fixed_cost(tmp_path):
    rows = _rows("sdpa-fp16", 9.0, 3100.0, per_token=32768) + _rows("kivi-2bit", 13.0, 3000.0, per_token=6144)
    rows += _rows("one-context", 5.0, 100.0, contexts=(32768,))
    rows.append(dict(context=32768, batch=8, method="prefill: x", bytes=1, time_us=1.0))
    _write(tmp_path / "k.csv", rows)
    fits = {f["method"]: f for f in fit_rows(read_rows(tmp_path / "k.csv"))}
    assert set(fits) == {"sdpa-fp16", "kivi-2bit"}  # one context: no line; prefill rows skipped
    k = fits["kivi-2bit"]
    assert k["marginal_gbps"] == pytest.approx(3000.0, abs=0.1)
    assert k["fixed_us"] == pytest.approx(13.0, abs=0.05)
    assert k["marginal_vs_sdpa"] == pytest.approx(3000 / 3100, abs=1e-3)
    t32 = 13.0 + 32768 * 6144 / 3000.0 * 1e-3
    assert k["fixed_share_32k"] == pytest.approx(13.0 / t32, abs=1e-3)
    assert k["max_resid_us"] == pytest.approx(0.0, abs=0.05)
    md = to_markdown(list(fits.values()))
    assert md.splitlines()[0] == "| " + " | ".join(COLS) + " |" and len(md.splitlines()) == 4


def test_fit_bends_show_in_the_residual():
    rows = _rows("a", 10.0, 3000.0, contexts=(4096, 16384, 32768, 65536, 131072))
    rows[2]["time_us"] += 20.0  # a context off the line
    (f,) = fit_rows(rows)
    assert f["max_resid_us"] > 10.0


@pytest.mark.parametrize("content", ["", "a,b\n1,2\n", "context,method,time_us,bytes\n32768,x,fast,12\n"])
def test_fit_bad_file_exits_2(tmp_path, content, capsys):
    p = tmp_path / "bad.csv"
    p.write_text(content)
    with pytest.raises(FitError):
        read_rows(p)
    assert bench.main(["--fit", str(p)]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("kernels.bench: ") and "\n" not in err
    assert bench.main(["--fit", str(tmp_path / "missing.csv")]) == 2


def test_fit_of_the_published_table(capsys):
    assert bench.main(["--fit", "leaderboards/kernels-h100.csv"]) == 0
    out = capsys.readouterr().out
    assert "| kivi-2bit |" in out and "| sdpa-fp16 | 5 |" in out
