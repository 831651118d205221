"""The compressed KV store of one layer of one sequence: a list of segments.

A :class:`Segment` is a set of tokens whose keys and values are held as lists of :class:`~methods.formats.Part`.
Rows are grouped by KV head; inside a head, the rows of the K parts and of the V parts are concatenated part by part
and row ``i`` of K is the same token as row ``i`` of V. Keys are cached after RoPE, so token order inside a segment
does not matter for attention: a method may regroup tokens by format freely. Every segment carries per-row
bookkeeping in ``aux`` (at least ``"pos"``, the token's true position); policies keep their own per-row state there
(e.g. H2O's accumulated attention), and it follows the rows through selection and regrouping.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from methods.formats import Dense, Part, _add, head_cat, head_offsets, kept_rows


@dataclass
class LayerInfo:
    """Static facts about the layer a store belongs to."""

    layer: int
    n_layers: int
    n_kv_heads: int
    n_q_heads: int
    head_dim: int
    dtype: torch.dtype  # dtype of dense rows and of quantization parameters
    device: torch.device
    seed: int = 0

    @property
    def group_size(self) -> int:
        return self.n_q_heads // self.n_kv_heads


def _part_counts(parts: list[Part], n_heads: int) -> tuple[int, ...]:
    c = (0,) * n_heads
    for p in parts:
        c = _add(c, p.counts)
    return c


def _concat_by_head(parts: list[Part], n_heads: int) -> torch.Tensor:
    """Dequantize parts and interleave them head by head into one ``[n, d]`` float32 tensor."""
    x, c = parts[0].dequant(), parts[0].counts
    for p in parts[1:]:
        x, c = head_cat(x, c, p.dequant(), p.counts), _add(c, p.counts)
    return x


def _part_row_index(parts: list[Part], counts: tuple[int, ...]) -> list[torch.Tensor]:
    """For each part, the segment-row index of each of its rows."""
    off = head_offsets(counts)
    within = [0] * len(counts)
    out = []
    for p in parts:
        idx = [torch.arange(off[h] + within[h], off[h] + within[h] + c) for h, c in enumerate(p.counts)]
        out.append(torch.cat(idx) if idx else torch.zeros(0, dtype=torch.int64))
        within = [w + c for w, c in zip(within, p.counts)]
    return out


@dataclass
class Segment:
    """Tokens with keys in ``k`` parts and values in ``v`` parts (see module docstring)."""

    k: list[Part]
    v: list[Part]
    aux: dict[str, torch.Tensor] = field(default_factory=dict)

    @property
    def counts(self) -> tuple[int, ...]:
        return _part_counts(self.k, len(self.k[0].counts))

    @property
    def n(self) -> int:
        return sum(self.counts)

    def check(self) -> None:
        """Invariants: K and V hold the same per-head counts, aux rows match."""
        nh = len(self.k[0].counts)
        ck, cv = _part_counts(self.k, nh), _part_counts(self.v, nh)
        assert ck == cv, f"K counts {ck} != V counts {cv}"
        for name, a in self.aux.items():
            assert a.shape[0] == sum(ck), f"aux {name} has {a.shape[0]} rows, segment has {sum(ck)}"

    def dequant(self) -> tuple[torch.Tensor, torch.Tensor]:
        nh = len(self.k[0].counts)
        return _concat_by_head(self.k, nh), _concat_by_head(self.v, nh)

    def nbytes(self) -> int:
        return sum(p.nbytes() for p in self.k) + sum(p.nbytes() for p in self.v)

    def aux_bytes(self) -> int:
        return sum(a.numel() * a.element_size() for a in self.aux.values())

    def select(self, keep: torch.Tensor, kept: tuple[int, ...] | None = None) -> Segment | None:
        """Keep the rows where ``keep`` is True; ``None`` if nothing is left. ``kept``: the kept rows per head where
        the caller knows them; with one part per side the selection then needs no device sync."""
        if len(self.k) == 1 and len(self.v) == 1 and kept is not None:
            if not sum(kept):
                return None
            rows, kept = kept_rows(keep, self.counts, kept)
            return Segment([self.k[0].select(keep, kept, rows)], [self.v[0].select(keep, kept, rows)],
                           {k: a[rows] for k, a in self.aux.items()})
        if not bool(keep.any()):
            return None
        counts = self.counts
        out = []
        for parts in (self.k, self.v):
            new = []
            for p, idx in zip(parts, _part_row_index(parts, counts)):
                q = p.select(keep[idx.to(keep.device)])
                if q.n:
                    new.append(q)
            out.append(new)
        return Segment(out[0], out[1], {k: a[keep] for k, a in self.aux.items()})

    def append_dense(self, k: torch.Tensor, v: torch.Tensor, aux: dict[str, torch.Tensor]) -> None:
        """Append ``k, v`` of shape ``[H_kv, L, d]`` (cache dtype) and aux ``[H_kv, L]`` to the last parts."""
        h, L, d = k.shape
        counts_new = (L,) * h
        old = self.counts
        for parts, x in ((self.k, k), (self.v, v)):
            rows = Dense(x.reshape(h * L, d), counts_new)
            if isinstance(parts[-1], Dense):
                parts[-1] = parts[-1].cat(rows)
            else:
                parts.append(rows)
        for name, a in aux.items():
            self.aux[name] = head_cat(self.aux[name], old, a.reshape(h * L).to(self.aux[name].dtype), counts_new)

    def describe(self) -> str:
        return "K[" + ",".join(p.describe() for p in self.k) + "] V[" + ",".join(p.describe() for p in self.v) + "]"


def dense_segment(k: torch.Tensor, v: torch.Tensor, pos: torch.Tensor) -> Segment:
    """A segment of dense rows from ``k, v [H_kv, L, d]`` and positions ``pos [L]`` shared by all heads."""
    h, L, d = k.shape
    counts = (L,) * h
    return Segment([Dense(k.reshape(h * L, d), counts)], [Dense(v.reshape(h * L, d), counts)],
                   {"pos": pos.to(torch.int32).repeat(h)})


@dataclass
class LayerStore:
    """All segments of one layer, plus per-method state that is not per row."""

    info: LayerInfo
    segments: list[Segment] = field(default_factory=list)
    seen: int = 0  # tokens that ever entered this layer's cache
    state: dict = field(default_factory=dict)

    def nbytes(self) -> int:
        return sum(s.nbytes() for s in self.segments)

    def aux_bytes(self) -> int:
        return sum(s.aux_bytes() for s in self.segments)

    def counts(self) -> tuple[int, ...]:
        c = (0,) * self.info.n_kv_heads
        for s in self.segments:
            c = _add(c, s.counts)
        return c

    def n_outliers(self) -> int:
        return sum(getattr(p, "n_outliers", lambda: 0)() for s in self.segments for p in s.k + s.v)

    def append(self, k: torch.Tensor, v: torch.Tensor, pos: torch.Tensor, aux: dict | None = None) -> None:
        """Append new tokens as dense rows to the last segment (or a new one); ``k, v: [H_kv, L, d]``."""
        h, L, _ = k.shape
        rows = {"pos": pos.to(torch.int32).unsqueeze(0).expand(h, L)}
        for name, a in (aux or {}).items():
            rows[name] = a
        self.seen += L
        last = self.segments[-1] if self.segments else None
        if last is not None and isinstance(last.k[-1], Dense) and isinstance(last.v[-1], Dense) \
                and set(rows) == set(last.aux):
            self.segments[-1].append_dense(k, v, rows)
        else:
            seg = dense_segment(k, v, pos)
            for name, a in rows.items():
                seg.aux[name] = a.reshape(-1)
            self.segments.append(seg)

    def select(self, keeps: list[torch.Tensor], kept: list[tuple[int, ...]] | None = None) -> None:
        """Apply one keep-mask per segment; drops empty segments. ``kept``: per segment, the kept rows per head,
        where the caller knows them (see :meth:`Segment.select`)."""
        kept = kept or [None] * len(self.segments)
        self.segments = [s for s in (seg.select(m, c) for seg, m, c in zip(self.segments, keeps, kept, strict=True))
                         if s is not None]

    def all_rows(self, name: str) -> torch.Tensor:
        """Concatenation over segments of one aux column."""
        return torch.cat([s.aux[name] for s in self.segments]) if self.segments else torch.zeros(0)

    def head_ids(self) -> torch.Tensor:
        """KV-head id of every row, concatenated over segments (matches :meth:`all_rows`)."""
        ids = [torch.repeat_interleave(torch.arange(len(s.counts)), torch.tensor(s.counts)) for s in self.segments]
        return torch.cat(ids).to(self.info.device) if ids else torch.zeros(0, dtype=torch.int64)

    def split_rows(self, mask: torch.Tensor) -> list[torch.Tensor]:
        """Split a mask over :meth:`all_rows` back into one mask per segment."""
        return list(torch.split(mask, [s.n for s in self.segments]))

    def clone(self) -> LayerStore:
        """Deep copy (used to share one compressed context across several questions)."""
        import copy

        return LayerStore(self.info, copy.deepcopy(self.segments), self.seen, copy.deepcopy(self.state))
