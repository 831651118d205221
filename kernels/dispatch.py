"""Backend dispatch for attention over packed part-pairs: Triton on CUDA, plain torch elsewhere.

Formats are duck-typed (``x`` -> Dense; ``words`` with 3 dims -> ChannelQuant; otherwise TokenQuant), so this module
never imports :mod:`methods`. ``BACKEND`` (``"auto"``, ``"triton"`` or ``"reference"``) is the module-wide default;
:func:`set_backend` changes it (the harness maps ``--kernels reference`` onto it) and every entry point also takes a
``backend`` argument.

Batches: a batch of sequences is a batch of "heads". Concatenate the sequences' parts head-major (sequence b's head h
is head ``b * H_kv + h``), stack their grouped queries along the first axis, and pass per-head row ranges; ragged
lengths are per-head counts. No padding is needed anywhere.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from kernels import reference as ref

BACKEND = "auto"
_BACKENDS = ("auto", "triton", "reference")


def set_backend(name: str) -> None:
    """Set the module-wide default backend (``auto``: Triton for CUDA tensors, reference otherwise)."""
    global BACKEND
    if name not in _BACKENDS:
        raise ValueError(f"backend must be one of {_BACKENDS}, got {name!r}")
    BACKEND = name


def use_triton(device: torch.device, backend: str | None = None) -> bool:
    """Whether the Triton path serves tensors on ``device`` under ``backend`` (default :data:`BACKEND`)."""
    b = backend or BACKEND
    if b not in _BACKENDS:
        raise ValueError(f"backend must be one of {_BACKENDS}, got {b!r}")
    if b == "reference":
        return False
    if b == "triton":
        return True
    return device.type == "cuda"


def _offsets(counts: Sequence[int]) -> list[int]:
    out = [0]
    for c in counts:
        out.append(out[-1] + int(c))
    return out


def _ints(x) -> list[int]:
    return [int(v) for v in (x.tolist() if isinstance(x, torch.Tensor) else x)]


def is_dense(part) -> bool:
    return hasattr(part, "x")


def is_channel(part) -> bool:
    return not is_dense(part) and part.words.dim() == 3


def part_dim(part) -> int:
    if is_dense(part):
        return part.x.shape[1]
    return part.words.shape[1] if is_channel(part) else int(part.d)


def dequant_reference(part) -> torch.Tensor:
    """Float32 rows ``[n, d]`` of a part with the plain-torch reference (duck-typed)."""
    if is_dense(part):
        return part.x.float()
    if is_channel(part):
        nb, d, _ = part.words.shape
        codes = ref.unpack(part.words, part.nbits, part.group)
        x = codes.float() * part.scale.float().unsqueeze(-1) + part.zero.float().unsqueeze(-1)
        return x.transpose(1, 2).reshape(nb * part.group, d)
    n, d = part.words.shape[0], int(part.d)
    if part.nbits == 0:
        x = part.zero.float().repeat_interleave(part.group, dim=-1)
    else:
        x = ref.affine_dequantize(ref.unpack(part.words, part.nbits, d), part.scale, part.zero, part.group)
    idx = getattr(part, "out_idx", None)
    if idx is not None and idx.numel():
        x = x.reshape(-1).clone()
        x[idx.long()] = part.out_val.float()
        x = x.reshape(n, d)
    return x


def _outlier_deltas(part, sidx: torch.Tensor, sval: torch.Tensor, d: int) -> torch.Tensor:
    """float32 ``value - dequantized code`` at each outlier position (what the attention kernel adds to the scores and
    to the output instead of patching the tile)."""
    row, col = (sidx.long() // d), (sidx.long() % d)
    grp = col // int(part.group)
    base = part.zero[row, grp].float()
    if part.nbits:
        per = ref.codes_per_word(part.nbits)
        codes = ref.unpack(part.words[row, col // per].unsqueeze(-1), part.nbits, per)  # the word's codes [m, per]
        code = codes.gather(-1, (col % per).unsqueeze(-1)).squeeze(-1)
        base = base + code.float() * part.scale[row, grp].float()
    return (sval.float() - base).contiguous()


def outlier_csr(part) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor] | None:
    """Outliers of a TokenQuant part sorted by flat index with a per-row pointer ``[n+1]`` and each outlier's float32
    difference to the dequantized code at its position (cached on the part).

    Built once per outlier tensor (a sort of the ``m`` outliers); later calls reuse it while ``out_idx`` is the same
    tensor object.
    """
    idx = getattr(part, "out_idx", None)
    if idx is None or idx.numel() == 0 or is_dense(part) or is_channel(part):
        return None
    cached = getattr(part, "_kernel_csr", None)
    if cached is not None and cached[0] is idx:
        return cached[1]
    n, d = part.words.shape[0], int(part.d)
    order = torch.argsort(idx.long())
    sidx = idx[order].to(torch.int32).contiguous()
    sval = part.out_val[order].contiguous()
    bounds = torch.arange(n + 1, device=idx.device, dtype=torch.int64) * d
    ptr = torch.searchsorted(sidx.long(), bounds).to(torch.int32)
    csr = (sidx, sval, ptr, _outlier_deltas(part, sidx, sval, d))
    try:
        object.__setattr__(part, "_kernel_csr", (idx, csr))
    except (AttributeError, TypeError):
        pass
    return csr


def _reference_parts(q, k_part, v_part, scale, starts, counts, want_scores):
    H, M, d = q.shape
    kf, vf = dequant_reference(k_part), dequant_reference(v_part)
    ko, vo = _offsets(k_part.counts), _offsets(v_part.counts)
    nmax = max(counts) if counts else 0
    ar = torch.arange(nmax, device=q.device)
    valid = ar[None, :] < torch.tensor(counts, device=q.device)[:, None]
    kidx = (torch.tensor([ko[h] + starts[h] for h in range(H)], device=q.device)[:, None] + ar).clamp(
        max=max(kf.shape[0] - 1, 0))
    vidx = (torch.tensor([vo[h] + starts[h] for h in range(H)], device=q.device)[:, None] + ar).clamp(
        max=max(vf.shape[0] - 1, 0))
    if kf.shape[0] == 0:
        kp = torch.zeros(H, nmax, d, device=q.device)
        vp = torch.zeros(H, nmax, d, device=q.device)
    else:
        kp = kf[kidx] * valid.unsqueeze(-1)
        vp = vf[vidx] * valid.unsqueeze(-1)
    out, lse, s = ref.partial_attention(q, kp, vp, scale, valid.unsqueeze(1))
    return out, lse, (s if want_scores else None)


def make_plan(k_part, v_part, row_start, row_count, device: torch.device, nsplit: int | None = None):
    """A :class:`kernels.triton_attention.PairPlan` for one part-pair (reusable across decode steps).

    ``row_start`` is per head, relative to the head's first row in each part (the same in K and V).
    """
    from kernels.triton_attention import PairPlan
    from kernels.triton_tiles import PartSpec

    starts, counts = _ints(row_start), _ints(row_count)
    ko, vo = _offsets(k_part.counts), _offsets(v_part.counts)
    H = len(counts)
    return PairPlan(PartSpec(k_part, outlier_csr(k_part)), PartSpec(v_part, outlier_csr(v_part)),
                    [ko[h] + starts[h] for h in range(H)], [vo[h] + starts[h] for h in range(H)], counts,
                    nsplit=nsplit, device=device)


def partial_attention_parts(q: torch.Tensor, k_part, v_part, scale: float, row_start, row_count,
                            want_scores: bool = False, backend: str | None = None):
    """Partial attention of grouped queries over one K part and one V part holding the same rows.

    Parameters
    ----------
    q : Tensor[H, M, d]
        Queries grouped by KV head (``M`` = query heads per KV head x query tokens), cache dtype or float32.
    k_part, v_part : Dense | TokenQuant | ChannelQuant
        Parts with ``len(counts) == H``. Row ``row_start[h] + i`` of head ``h`` in ``k_part`` is the same token as
        row ``row_start[h] + i`` of head ``h`` in ``v_part``.
    scale : float
        Softmax scale.
    row_start, row_count : sequence of int or Tensor[H]
        Per-head contiguous row range (relative to the head's first row in each part). ChannelQuant ranges may
        start and end mid-block.
    want_scores : bool
        Also return the scaled scores ``[H, M, max(row_count)]`` (float32, ``-inf`` beyond a head's count).
    backend : "auto" | "triton" | "reference" | None
        None uses the module default :data:`BACKEND`.

    Returns
    -------
    out : Tensor[H, M, d] float32, normalised (zeros where a head has no rows)
    lse : Tensor[H, M] float32, natural log-sum-exp of the scaled scores (-inf where a head has no rows)
    scores : Tensor[H, M, max(row_count)] float32 or None
    """
    starts, counts = _ints(row_start), _ints(row_count)
    if len(starts) != q.shape[0] or len(counts) != q.shape[0]:
        raise ValueError("row_start/row_count need one entry per head of q")
    if not use_triton(q.device, backend):
        return _reference_parts(q, k_part, v_part, scale, starts, counts, want_scores)
    from kernels.triton_attention import attend_pairs

    plan = make_plan(k_part, v_part, starts, counts, q.device)
    scores = None
    if want_scores:
        scores = torch.full((q.shape[0], q.shape[1], plan.max_cnt), float("-inf"), device=q.device)
    out, lse = attend_pairs(q, [plan], scale, scores)
    return out, lse, scores


def merge(outs: list[torch.Tensor], lses: list[torch.Tensor], backend: str | None = None
          ) -> tuple[torch.Tensor, torch.Tensor]:
    """Flash-decoding merge of partial outputs by their log-sum-exps (Triton on CUDA)."""
    if not use_triton(outs[0].device, backend):
        return ref.merge_partials([o.float() for o in outs], [x.float() for x in lses])
    from kernels.triton_attention import merge as tmerge

    return tmerge(outs, lses)


def reduce_scores(scores: torch.Tensor, lse_total: torch.Tensor, g: int, lq: int
                  ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Statistics of the final probabilities ``p = exp(scores - lse_total)`` over ``[H, g*lq, N]`` scores.

    Returns ``(sum over the M queries, max over M, the last query token's sum over the group's heads)``, each
    ``[H, N]`` (padding columns come out 0).
    """
    p = torch.exp(scores - lse_total.unsqueeze(-1))
    p4 = p.reshape(p.shape[0], g, lq, p.shape[-1])
    return p4.sum((1, 2)), p4.amax((1, 2)), p4[:, :, -1].sum(1)
