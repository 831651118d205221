"""QAQ storage layout: rows bucketed by bit width into packed segments.

One :class:`~methods.store.Segment` per *key* container width (0, 1, 2, 3, 4, 8 bits, or 16 = dense); its K part is
one part holding all its rows; its V parts are one part per *value* container width, in increasing order. Inside
every KV head the segment's rows are ordered by value width, so row ``i`` of K (per head) is row ``i`` of the V parts
concatenated, as :mod:`methods.store` requires; ``aux`` columns (``"pos"``) follow the same order. Bit widths 5-7
share the 8-bit container (their codes are < 2^7; scale and zero are per row), so a segment holds at most 6 V parts.

A segment is handled as *buckets*: value width -> (K rows, V part, aux) of the rows with that value width; building
and merging segments go through buckets, so appended rows never re-quantize rows already stored.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from methods.base import SpecError
from methods.formats import Dense, Part, counts_of, head_cat, head_offsets
from methods.qaq_quant import DENSE, pack_rows


def rows_to_groups(x: torch.Tensor, counts: tuple[int, ...], level: str) -> torch.Tensor:
    """Head-grouped rows ``[n, d]`` -> groups ``[G, N]``: a row per group (head) or a token across heads (layer)."""
    if level == "head":
        return x
    h, c = len(counts), counts[0]
    return x.reshape(h, c, -1).transpose(0, 1).reshape(c, -1)


def groups_to_rows(g: torch.Tensor, counts: tuple[int, ...], level: str) -> torch.Tensor:
    """Inverse of :func:`rows_to_groups` for ``[G, N]`` group tensors."""
    if level == "head":
        return g
    h, c = len(counts), counts[0]
    return g.reshape(c, h, -1).transpose(0, 1).reshape(h * c, -1)


def group_values_to_rows(v: torch.Tensor, counts: tuple[int, ...], level: str) -> torch.Tensor:
    """One value per group ``[G]`` -> one per row ``[n]`` (replicated over the heads of a layer-level group)."""
    if level == "head":
        return v
    return v.unsqueeze(0).expand(len(counts), -1).reshape(-1)


def row_values_to_groups(v: torch.Tensor, counts: tuple[int, ...], level: str) -> torch.Tensor:
    """One value per row ``[n]`` -> the max over each group's rows ``[G]``."""
    if level == "head":
        return v
    return v.reshape(len(counts), counts[0]).amax(0)


def check_layer_groups(pos: torch.Tensor, counts: tuple[int, ...]) -> None:
    """A layer-level group needs the same tokens, in the same order, in every KV head."""
    if len(set(counts)) > 1 or not bool((pos.reshape(len(counts), -1) == pos[: counts[0]]).all()):
        raise SpecError("qaq level=layer needs the same tokens in every KV head (no per-head eviction); "
                                  "use level=head")


@dataclass
class RowData:
    """Quantized (or dense) rows of one tensor, head-grouped: enough to build a part of any subset of rows."""

    x: torch.Tensor  # [n, d] original rows (cache dtype)
    bits: torch.Tensor  # [n] container width per row (DENSE = keep dense)
    codes: torch.Tensor | None = None  # [n, d] int64
    scale: torch.Tensor | None = None  # [n]
    zero: torch.Tensor | None = None  # [n]
    out: torch.Tensor | None = None  # [n, d] bool


def make_part(rd: RowData, mask: torch.Tensor, bits: int, counts: tuple[int, ...], dtype: torch.dtype) -> Part:
    """The rows of ``rd`` selected by ``mask`` (all of container width ``bits``) as one part."""
    if bits == DENSE:
        return Dense(rd.x[mask].to(dtype), counts)
    return pack_rows(rd.x[mask], rd.codes[mask], rd.scale[mask], rd.zero[mask], rd.out[mask], bits, counts, dtype)


Bucket = tuple[Part, Part, dict]  # (K rows, V part, aux) of the rows of one value width


def build_segments(k: RowData, v: RowData, aux: dict[str, torch.Tensor], counts: tuple[int, ...],
                   dtype: torch.dtype) -> dict[int, dict[int, Bucket]]:
    """Bucket rows by (key width, value width): ``{kb: {vb: bucket}}``."""
    out: dict[int, dict[int, Bucket]] = {}
    for kb in sorted(set(k.bits.tolist())):
        mk = k.bits == kb
        for vb in sorted(set(v.bits[mk].tolist())):
            m = mk & (v.bits == vb)
            c = counts_of(m, counts)
            out.setdefault(kb, {})[vb] = (make_part(k, m, kb, c, dtype), make_part(v, m, vb, c, dtype),
                                          {name: a[m] for name, a in aux.items()})
    return out


def _key(p: Part) -> int:
    return DENSE if isinstance(p, Dense) else p.nbits


def segment_key(seg) -> int:
    return _key(seg.k[0])


def to_buckets(seg) -> dict[int, Bucket]:
    """Split a QAQ segment into its value-width buckets (no re-quantization)."""
    off = head_offsets(seg.counts)
    within = [0] * len(off[:-1])
    out = {}
    n = seg.n
    for vp in seg.v:
        m = torch.zeros(n, dtype=torch.bool, device=seg.aux["pos"].device)
        for h, c in enumerate(vp.counts):
            m[off[h] + within[h]: off[h] + within[h] + c] = True
            within[h] += c
        k_sub = seg.k[0].select(m.to(_device(seg.k[0])))
        out[_key(vp)] = (k_sub, vp, {name: a[m] for name, a in seg.aux.items()})
    return out


def _device(p: Part) -> torch.device:
    return p.x.device if isinstance(p, Dense) else p.words.device


def merge_buckets(a: dict[int, Bucket], b: dict[int, Bucket]) -> dict[int, Bucket]:
    """Append ``b``'s rows after ``a``'s, bucket by bucket and head by head."""
    out = dict(a)
    for vb, (kb_, vp, ax) in b.items():
        if vb not in out:
            out[vb] = (kb_, vp, ax)
            continue
        k0, v0, a0 = out[vb]
        aux = {name: head_cat(a0[name], v0.counts, ax[name], vp.counts) for name in a0}
        out[vb] = (k0.cat(kb_), v0.cat(vp), aux)
    return out


def from_buckets(buckets: dict[int, Bucket]):
    """One segment from value-width buckets: K rows per head in value-width order, one V part per bucket."""
    from methods.store import Segment

    items = [buckets[vb] for vb in sorted(buckets)]
    k, counts = items[0][0], items[0][1].counts
    aux = dict(items[0][2])
    for kp, vp, ax in items[1:]:
        aux = {name: head_cat(aux[name], counts, ax[name], vp.counts) for name in aux}
        k = k.cat(kp)
        counts = k.counts
    seg = Segment([k], [vp for _, vp, _ in items], aux)
    seg.check()
    return seg


def is_dense(seg) -> bool:
    return all(isinstance(p, Dense) for p in seg.k + seg.v)
