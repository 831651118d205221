"""kernels.fast_launch: the relaunch cache's key and argument order, with a stand-in for a JIT kernel (no GPU); the
GPU test (tests/test_kernels.py::test_fast_relaunch_matches_jit) checks real kernels against the JIT launch."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch

pytest.importorskip("triton", reason="triton is not installed")

from kernels import fast_launch  # noqa: E402


class _Compiled:
    """A compiled kernel's launch interface, as the JIT itself calls it."""

    function, packed_metadata = object(), object()

    def __init__(self, log):
        self.log = log

    def launch_metadata(self, grid, stream, *args):
        return None

    def run(self, gx, gy, gz, stream, function, packed, meta, enter, leave, *args):
        assert function is self.function and packed is self.packed_metadata and stream == 1234
        self.log.append(("fast", (gx, gy, gz), args))


class _Jit:
    """A JIT kernel ``f(a, b, n, C: constexpr, D: constexpr = 7)``: ``[grid](...)`` logs and returns a compiled
    kernel (or None, as the interpreter does)."""

    def __init__(self, compiled=True):
        self.log, self.compiles = [], 0
        self.params = [SimpleNamespace(name=n, default=dv) for n, dv in
                       (("a", None), ("b", None), ("n", None), ("C", None), ("D", 7))]
        self.compiled = compiled

    def __getitem__(self, grid):
        def run(*args, **kw):
            self.log.append(("jit", grid, args, kw))
            self.compiles += 1
            return _Compiled(self.log) if self.compiled else None
        return run


@pytest.fixture(autouse=True)
def _fresh(monkeypatch):
    monkeypatch.setattr(fast_launch, "_CACHE", {})
    monkeypatch.setattr(fast_launch, "_BROKEN", set())
    monkeypatch.setattr(fast_launch, "ENABLED", True)
    monkeypatch.setattr(fast_launch, "_CUDA", True)
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 0)
    monkeypatch.setattr(fast_launch, "_stream", lambda device: 1234)


def test_relaunch_passes_every_parameter_in_order():
    fn = _Jit()
    a, b = torch.zeros(8), torch.zeros(8)
    fast_launch.launch(fn, (4, 2), (a, b, 100), {"C": 3, "num_warps": 1})
    fast_launch.launch(fn, (4, 2), (b, a, 101), {"C": 3, "num_warps": 1})
    assert fn.log[0] == ("jit", (4, 2), (a, b, 100), {"C": 3, "num_warps": 1})
    kind, grid, args = fn.log[1]
    assert kind == "fast" and grid == (4, 2, 1) and args[:3] == (b, a, 101) and args[3:] == (3, 7)


@pytest.mark.parametrize("change", ["misaligned", "int64", "one", "div16", "const", "option", "dtype", "rank"])
def test_key_separates_what_triton_specialises(change):
    """A different specialisation goes back through the JIT (which compiles for it) instead of reusing a kernel."""
    fn = _Jit()
    buf = torch.zeros(64)
    base = ((buf[:8], buf[8:16], 100), {"C": 3, "num_warps": 1}, (4,))
    fast_launch.launch(fn, base[2], *base[:2])
    args, consts, grid = list(base[0]), dict(base[1]), base[2]
    if change == "misaligned":
        args[0] = buf[1:9]
    elif change == "int64":
        args[2] = 2 ** 33
    elif change == "one":
        args[2] = 1
    elif change == "div16":
        args[2] = 96
    elif change == "const":
        consts["C"] = 4
    elif change == "option":
        consts["num_warps"] = 2
    elif change == "dtype":
        args[1] = buf[8:16].half()
    elif change == "rank":
        grid = (4, 1)
    fast_launch.launch(fn, grid, tuple(args), consts)
    assert fn.compiles == 2 and fn.log[-1][0] == "jit"
    fast_launch.launch(fn, base[2], *base[:2])  # the first specialisation is still cached
    assert fn.compiles == 2 and fn.log[-1][0] == "fast"


def test_same_specialisation_reuses_the_kernel():
    fn = _Jit()
    buf = torch.zeros(64)
    fast_launch.launch(fn, (4,), (buf[:8], buf[8:16], 100), {"C": 3})
    fast_launch.launch(fn, (9,), (buf[16:24], buf[4:12], 5), {"C": 3})
    assert fn.compiles == 1 and fn.log[-1][:2] == ("fast", (9, 1, 1))


def test_jit_path_without_compiled_kernel_or_when_off(monkeypatch):
    fn = _Jit(compiled=False)  # the interpreter returns no compiled kernel: never cached
    for _ in range(3):
        fast_launch.launch(fn, (4,), (torch.zeros(8), torch.zeros(8), 3), {"C": 1})
    assert fn.compiles == 3 and not fast_launch._CACHE
    fn = _Jit()
    monkeypatch.setattr(fast_launch, "ENABLED", False)
    for _ in range(2):
        fast_launch.launch(fn, (4,), (torch.zeros(8), torch.zeros(8), 3), {"C": 1})
    assert fn.compiles == 2


def test_failed_relaunch_falls_back_to_jit_for_good():
    fn = _Jit()

    class _Bad(_Compiled):
        def run(self, *args):
            raise TypeError("another interface")

    fn.__class__ = type("_JitBad", (_Jit,), {"__getitem__": lambda self, grid: (
        lambda *a, **kw: (self.log.append(("jit", grid, a, kw)), _Bad(self.log))[1])})
    args = (torch.zeros(8), torch.zeros(8), 3)
    fast_launch.launch(fn, (4,), args, {"C": 1})
    with pytest.warns(UserWarning, match="fast relaunch"):
        fast_launch.launch(fn, (4,), args, {"C": 1})
    fast_launch.launch(fn, (4,), args, {"C": 1})
    assert [e[0] for e in fn.log] == ["jit", "jit", "jit"] and fn in fast_launch._BROKEN
