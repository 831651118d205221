"""Relaunch compiled Triton / Gluon kernels without the JIT's per-call work.

``kernel[grid](*args, **consts)`` binds and specialises every argument, looks the compiled kernel up and then checks
that every module global the kernel reads (for the Gluon decode kernel: dozens of ``constexpr`` layouts and PTX
strings) still has the value it was compiled with, each through ``constexpr.__ne__``. On the device machine's host
that was most of the ~145-160 µs of host time per eager decode call of one part pair (two launches: attention and
merge). :func:`launch` keeps, per kernel, grid rank, options and argument specialisation, the compiled kernel that the
first JIT launch returned, and later launches it directly (``CompiledKernel.run``, the call the JIT makes itself).

The key is at least as fine as Triton's own specialisation: each tensor's dtype and whether its address is 16-byte
aligned, each integer's width and whether it is 1 or a multiple of 16, bools by value, other scalars by type; so a
compiled kernel is never reused for arguments it was not specialised for (a misaligned view, a 64-bit size). Launch
hooks (profilers) see the same launch metadata as from the JIT, which makes the same call. The JIT path stays in use
under the interpreter (it returns no compiled kernel) and for a kernel whose fast launch failed (a Triton release with
another ``CompiledKernel`` interface: warned once, then the JIT path).
"""

from __future__ import annotations

import os
import warnings

import torch

try:
    from triton import knobs as _knobs
    from triton.runtime import driver as _driver

    def _stream(device: int) -> int:
        return _driver.active.get_current_stream(device)
except ImportError:  # pragma: no cover - a Triton without knobs: every launch through the JIT
    _knobs = None

ENABLED = os.environ.get("KV_FAST_LAUNCH", "1") == "1"  # 0: every launch through the JIT (A/B runs; tests set it)
_CUDA = torch.cuda.is_available()  # without CUDA the kernels run in the interpreter: the JIT path
_CACHE: dict = {}
_BROKEN: set = set()


def _key(args: tuple) -> tuple:
    """The specialisation-relevant part of the runtime arguments (one pass: this runs at every launch)."""
    tensor = torch.Tensor
    out = []
    put = out.append
    for a in args:
        if isinstance(a, tensor):
            put((a.dtype, not a.data_ptr() & 15))
        elif a.__class__ is int:
            put((-2147483648 <= a < 2147483648, a == 1, not a & 15))
        elif a.__class__ is bool:
            put(a)
        else:
            put(a.__class__)
    return tuple(out)


def launch(fn, grid: tuple, args: tuple, consts: dict) -> None:
    """``fn[grid](*args, **consts)`` with ``args`` the kernel's runtime arguments in order (its leading parameters)
    and ``consts`` its constexpr parameters and launch options (``num_warps``, ``maxnreg``, ...), by name."""
    if not (ENABLED and _CUDA) or fn in _BROKEN or _knobs is None:
        fn[grid](*args, **consts)
        return
    device = torch.cuda.current_device()
    key = (fn, len(grid), tuple(consts.items()), _key(args), device)
    hit = _CACHE.get(key)
    if hit is None:
        kernel = fn[grid](*args, **consts)
        if kernel is not None and hasattr(kernel, "function") and hasattr(kernel, "packed_metadata"):
            params = getattr(fn, "params", None)
            if params is None:
                _BROKEN.add(fn)
                return
            # the constexpr and defaulted parameters after the runtime ones, in signature order (the compiled
            # kernel's launcher takes every parameter, as the JIT passes them)
            tail = tuple(consts.get(p.name, p.default) for p in params[len(args):])
            _CACHE[key] = (kernel, tail)
        return
    kernel, tail = hit
    try:
        # what CompiledKernel[grid](*all_args) does (the JIT's own final call), without its closure
        grid3 = (grid[0], grid[1] if len(grid) > 1 else 1, grid[2] if len(grid) > 2 else 1)
        full = args + tail
        stream = _stream(device)
        hooks = _knobs.runtime
        meta = kernel.launch_metadata(grid3, stream, *full)
        kernel.run(*grid3, stream, kernel.function, kernel.packed_metadata, meta, hooks.launch_enter_hook,
                   hooks.launch_exit_hook, *full)
    except Exception as exc:  # noqa: BLE001 - another CompiledKernel interface: the JIT path from now on
        _BROKEN.add(fn)
        warnings.warn(f"fast relaunch of {getattr(fn, '__name__', fn)} failed, using the JIT launch: "
                      f"{type(exc).__name__}: {exc}", stacklevel=2)
        fn[grid](*args, **consts)
