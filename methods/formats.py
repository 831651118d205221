"""Storage formats of one tensor (K or V) for a set of cached tokens: real, packed tensors.

A *part* holds rows (tokens) of one KV tensor in one format, grouped by KV head: the first ``counts[0]`` rows belong
to head 0, the next ``counts[1]`` to head 1, and so on. Ragged per-head counts are first-class. ``nbytes()`` is the
sum of the part's real tensors; it is what the memory columns report.

Formats
-------
Dense        rows in the cache dtype.
TokenQuant   per-token groups of channels (values; KIVI and QAQ): one (scale, zero) per ``group`` channels of a row,
             codes packed along channels; optional sparse outliers (flat int32 index + value in the cache dtype).
ChannelQuant per-channel groups of tokens (KIVI keys): blocks of ``group`` tokens of one head, one (scale, zero) per
             channel and block, codes packed along the tokens of the block.
Every quantized format dequantizes as ``code * scale + zero``; a quantizer with another grid (QAQ's mean-centred
one) maps its grid onto that affine form when it packs.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass

import torch

from kernels import reference as ref


def head_offsets(counts: tuple[int, ...]) -> list[int]:
    """Exclusive prefix sums: ``[0, c0, c0+c1, ...]``."""
    out = [0]
    for c in counts:
        out.append(out[-1] + c)
    return out


def head_cat_shifts(ca: tuple[int, ...], cb: tuple[int, ...], device) -> tuple[torch.Tensor, torch.Tensor]:
    """Per head, how far ``a``'s rows and ``b``'s rows move when ``b`` is appended after ``a`` head by head.

    An ``a`` row of head ``h`` moves past ``b``'s rows of the heads before ``h``; a ``b`` row of head ``h`` moves past
    ``a``'s rows of heads ``<= h``.
    """
    sa = [sum(cb[:h]) for h in range(len(ca))]
    sb = [sum(ca[:h + 1]) for h in range(len(ca))]
    return torch.tensor(sa, device=device), torch.tensor(sb, device=device)


def row_heads(rows: torch.Tensor, counts: tuple[int, ...]) -> torch.Tensor:
    """KV-head index of each row index of a head-grouped tensor."""
    ends = torch.tensor(head_offsets(counts)[1:], device=rows.device)
    return torch.searchsorted(ends, rows, right=True)


def head_cat(a: torch.Tensor, ca: tuple[int, ...], b: torch.Tensor, cb: tuple[int, ...]) -> torch.Tensor:
    """Concatenate two head-grouped tensors along dim 0, head by head (``a``'s rows of a head before ``b``'s)."""
    b = b.to(a.dtype)
    if not any(cb):
        return a
    if not any(ca):
        return b
    h = len(ca)
    if len(set(ca)) == 1 and len(set(cb)) == 1:  # equal counts per head: one strided copy
        return torch.cat([a.reshape(h, ca[0], *a.shape[1:]), b.reshape(h, cb[0], *b.shape[1:])], 1) \
            .reshape(a.shape[0] + b.shape[0], *a.shape[1:])
    oa, ob = head_offsets(ca), head_offsets(cb)
    pieces = []
    for i in range(h):
        pieces += [a[oa[i]:oa[i + 1]], b[ob[i]:ob[i + 1]]]
    return torch.cat(pieces)


def counts_of(keep: torch.Tensor, counts: tuple[int, ...]) -> tuple[int, ...]:
    """Per-head number of True rows of a head-grouped mask."""
    if not counts:
        return ()
    sums = torch.segment_reduce(keep.to(torch.float32), "sum", lengths=torch.tensor(counts, device=keep.device))
    return tuple(int(x) for x in sums.round().tolist())


CHECK_KEPT = False  # tests switch this on: every selection given its kept counts verifies them (costs a device sync)


def kept_rows(keep: torch.Tensor, counts: tuple[int, ...], kept: tuple[int, ...] | None = None,
              rows: torch.Tensor | None = None) -> tuple[torch.Tensor, tuple[int, ...]]:
    """What selects ``keep``'s rows, and the kept rows per head.

    Without ``kept`` (the per-head counts of True rows) this is the mask and its counts, read back from the device. A
    caller that knows ``kept`` on the host gets the rows' indices by ``nonzero_static`` instead: no device sync, so
    a decode step's eviction does not stall the host (on a GPU, a boolean selection waits for the device to count).
    ``rows``: those indices, where the caller has them already (a segment selects its K part, V part and aux
    columns with one computation).
    """
    if kept is not None and rows is not None:
        return rows, tuple(kept)
    if kept is None:
        return keep, counts_of(keep, counts)
    if CHECK_KEPT and counts_of(keep, counts) != tuple(kept):
        raise AssertionError(f"kept counts {tuple(kept)} given, the mask keeps {counts_of(keep, counts)}")
    return torch.nonzero_static(keep, size=sum(kept)).squeeze(-1), tuple(kept)


class Part(ABC):
    """Rows of one KV tensor in one storage format, grouped by KV head."""

    counts: tuple[int, ...]

    @property
    def n(self) -> int:
        return sum(self.counts)

    @abstractmethod
    def dequant(self) -> torch.Tensor:
        """Rows as float32 ``[n, d]``."""

    @abstractmethod
    def nbytes(self) -> int:
        """Bytes of the real tensors."""

    @abstractmethod
    def select(self, keep: torch.Tensor, kept: tuple[int, ...] | None = None,
               rows: torch.Tensor | None = None) -> Part:
        """Keep the rows where ``keep`` (bool ``[n]``) is True, in order; ``kept``: their number per head, and
        ``rows``: their indices, where the caller knows them (see :func:`kept_rows`)."""

    @abstractmethod
    def cat(self, other: Part) -> Part:
        """Append ``other``'s rows after this part's, head by head (same format and parameters)."""

    @property
    @abstractmethod
    def bits(self) -> int:
        """Code width (16/32 for dense)."""

    def describe(self) -> str:
        return f"{type(self).__name__}[{self.bits}b]"


def _tensor_bytes(*ts: torch.Tensor | None) -> int:
    return sum(t.numel() * t.element_size() for t in ts if t is not None)


@dataclass
class Dense(Part):
    """Rows kept in the cache dtype."""

    x: torch.Tensor  # [n, d]
    counts: tuple[int, ...]

    @property
    def bits(self) -> int:
        return self.x.element_size() * 8

    def dequant(self) -> torch.Tensor:
        return self.x.float()

    def nbytes(self) -> int:
        return _tensor_bytes(self.x)

    def select(self, keep: torch.Tensor, kept: tuple[int, ...] | None = None,
               rows: torch.Tensor | None = None) -> Dense:
        rows, kept = kept_rows(keep, self.counts, kept, rows)
        return Dense(self.x[rows], kept)

    def cat(self, other: Part) -> Dense:
        x = other.x if isinstance(other, Dense) else other.dequant()
        return Dense(head_cat(self.x, self.counts, x, other.counts), _add(self.counts, other.counts))

    def split_first(self, n_first: tuple[int, ...]) -> tuple[Dense, Dense]:
        """The first ``n_first[h]`` rows of every head ``h`` and the rest, both head-grouped: what ``select`` of
        :func:`first_rows_mask` and of its complement give, by slicing with the counts the host knows (no device
        sync: a boolean mask's selection waits for the device to count its rows). Both are tensors of their own,
        never views of this part's storage (which would keep it alive unaccounted)."""
        rest = tuple(c - f for c, f in zip(self.counts, n_first, strict=True))
        if any(f < 0 or r < 0 for f, r in zip(n_first, rest)):
            raise ValueError(f"split_first: {n_first} rows of heads holding {self.counts}")
        h, x = len(self.counts), self.x
        if h and len(set(self.counts)) == 1 and len(set(n_first)) == 1:  # equal heads: two strided copies
            xs = x.reshape(h, self.counts[0], *x.shape[1:])
            first = xs[:, :n_first[0]].reshape(-1, *x.shape[1:])
            tail = xs[:, n_first[0]:].reshape(-1, *x.shape[1:])
        else:
            off = head_offsets(self.counts)
            pieces_f = [x[off[i]:off[i] + n_first[i]] for i in range(h)]
            pieces_t = [x[off[i] + n_first[i]:off[i + 1]] for i in range(h)]
            first = torch.cat(pieces_f) if pieces_f else x[:0]
            tail = torch.cat(pieces_t) if pieces_t else x[:0]
        return Dense(_own(first, x), tuple(n_first)), Dense(_own(tail, x), rest)


def _own(t: torch.Tensor, base: torch.Tensor) -> torch.Tensor:
    """``t`` as a tensor of its own: a copy when it is a view into ``base``'s storage (an empty one: a fresh empty)."""
    if t.numel() == 0:
        return base.new_empty(t.shape)
    if t.untyped_storage().data_ptr() == base.untyped_storage().data_ptr():
        return t.clone()
    return t


def _add(a: tuple[int, ...], b: tuple[int, ...]) -> tuple[int, ...]:
    return tuple(x + y for x, y in zip(a, b))


@dataclass
class TokenQuant(Part):
    """Per-token groups of ``group`` channels, ``nbits``-bit codes packed along channels, optional sparse outliers.

    ``nbits == 0`` stores no codes: every element of a group dequantizes to its ``zero`` (QAQ's 0-bit case).
    Outliers are stored exactly: ``out_idx`` is the flat index ``row * d + channel`` (int32), ``out_val`` the value.
    """

    words: torch.Tensor  # [n, W] int32
    scale: torch.Tensor  # [n, d // group] (empty second axis when nbits == 0)
    zero: torch.Tensor  # [n, d // group]
    nbits: int
    group: int
    d: int
    counts: tuple[int, ...]
    out_idx: torch.Tensor | None = None  # [m] int32
    out_val: torch.Tensor | None = None  # [m]

    @property
    def bits(self) -> int:
        return self.nbits

    def dequant(self) -> torch.Tensor:
        n = self.words.shape[0]
        if self.nbits == 0:
            x = self.zero.float().repeat_interleave(self.group, dim=-1)
        else:
            codes = ref.unpack(self.words, self.nbits, self.d, torch.float32)
            x = ref.affine_dequantize(codes, self.scale, self.zero, self.group)
        if self.out_idx is not None and self.out_idx.numel():
            x = x.reshape(-1)
            x[self.out_idx.long()] = self.out_val.float()
            x = x.reshape(n, self.d)
        return x

    def nbytes(self) -> int:
        return _tensor_bytes(self.words, self.scale if self.nbits else None, self.zero, self.out_idx, self.out_val)

    def n_outliers(self) -> int:
        return 0 if self.out_idx is None else self.out_idx.numel()

    def _outliers_select(self, keep: torch.Tensor):
        if self.out_idx is None:
            return None, None
        new_row = torch.cumsum(keep.long(), 0) - 1
        rows = self.out_idx.long() // self.d
        cols = self.out_idx.long() % self.d
        m = keep[rows]
        idx = (new_row[rows[m]] * self.d + cols[m]).to(torch.int32)
        return idx, self.out_val[m]

    def select(self, keep: torch.Tensor, kept: tuple[int, ...] | None = None,
               rows: torch.Tensor | None = None) -> TokenQuant:
        idx, val = self._outliers_select(keep)
        rows, kept = kept_rows(keep, self.counts, kept, rows)
        return TokenQuant(self.words[rows], self.scale[rows], self.zero[rows], self.nbits, self.group, self.d, kept,
                          idx, val)

    def cat(self, other: Part) -> TokenQuant:
        assert isinstance(other, TokenQuant) and other.nbits == self.nbits and other.group == self.group
        idx = val = None
        if self.out_idx is not None or other.out_idx is not None:
            shifts = head_cat_shifts(self.counts, other.counts, self.words.device)
            parts_i, parts_v = [], []
            for part, shift in zip((self, other), shifts):
                if part.out_idx is not None:
                    flat = part.out_idx.long()
                    moved = shift[row_heads(flat // self.d, part.counts)] * self.d
                    parts_i.append((flat + moved).to(torch.int32))
                    parts_v.append(part.out_val)
            idx, val = torch.cat(parts_i), torch.cat(parts_v)
        return TokenQuant(head_cat(self.words, self.counts, other.words, other.counts),
                          head_cat(self.scale, self.counts, other.scale, other.counts),
                          head_cat(self.zero, self.counts, other.zero, other.counts),
                          self.nbits, self.group, self.d, _add(self.counts, other.counts), idx, val)


@dataclass
class ChannelQuant(Part):
    """Per-channel groups of ``group`` tokens (KIVI keys): blocks of ``group`` consecutive tokens of one head.

    ``words[b, c]`` packs the codes of channel ``c`` for the block's tokens; ``scale/zero[b, c]`` are that channel's
    parameters in that block. ``counts`` are rows (tokens) per head, each a multiple of ``group``.
    """

    words: torch.Tensor  # [nb, d, W] int32
    scale: torch.Tensor  # [nb, d]
    zero: torch.Tensor  # [nb, d]
    nbits: int
    group: int
    counts: tuple[int, ...]

    @property
    def bits(self) -> int:
        return self.nbits

    def dequant(self) -> torch.Tensor:
        nb, d, _ = self.words.shape
        codes = ref.unpack(self.words, self.nbits, self.group, torch.float32)  # [nb, d, G]
        x = codes * self.scale.float().unsqueeze(-1) + self.zero.float().unsqueeze(-1)
        return x.transpose(1, 2).reshape(nb * self.group, d)

    def nbytes(self) -> int:
        return _tensor_bytes(self.words, self.scale, self.zero)

    def _block_counts(self) -> tuple[int, ...]:
        return tuple(c // self.group for c in self.counts)

    def select(self, keep: torch.Tensor, kept: tuple[int, ...] | None = None,
               rows: torch.Tensor | None = None) -> ChannelQuant:
        blocks = keep.reshape(-1, self.group)
        whole = blocks.all(-1)
        if not torch.equal(whole, blocks.any(-1)):
            raise NotImplementedError(
                "per-channel key blocks cannot lose single tokens; evict before quantizing (prefill-time eviction) "
                "or use a per-token quantizer")
        return ChannelQuant(self.words[whole], self.scale[whole], self.zero[whole], self.nbits, self.group,
                            tuple(c * self.group for c in counts_of(whole, self._block_counts())))

    def cat(self, other: Part) -> ChannelQuant:
        assert isinstance(other, ChannelQuant) and other.nbits == self.nbits and other.group == self.group
        ca, cb = self._block_counts(), other._block_counts()
        return ChannelQuant(head_cat(self.words, ca, other.words, cb), head_cat(self.scale, ca, other.scale, cb),
                            head_cat(self.zero, ca, other.zero, cb), self.nbits, self.group,
                            _add(self.counts, other.counts))


def _triton_quant(x: torch.Tensor, bits: int):
    """:mod:`kernels.triton_quant` when the attention kernels run on ``x``'s device (CUDA, or ``--kernels triton``) and
    it takes ``bits``: one launch instead of a dozen torch ops per call (a decode step quantizes a row per layer),
    and bit-identical to the reference run on CPU (IEEE division; torch on CUDA multiplies by the reciprocal)."""
    if bits not in (1, 2, 3, 4, 8) or x.numel() == 0:
        return None
    from methods.attention import use_triton

    if not use_triton(x.device):
        return None
    from kernels import triton_quant

    return triton_quant


def quantize_tokens(x: torch.Tensor, counts: tuple[int, ...], bits: int, group: int, dtype: torch.dtype) -> TokenQuant:
    """Per-token min/max quantization of rows ``x [n, d]`` (KIVI values) into a :class:`TokenQuant`."""
    tq = _triton_quant(x, bits)
    if tq is not None and x.shape[-1] % group == 0:
        words, scale, zero = tq.quantize_tokens(x, bits, group, dtype)
        return TokenQuant(words, scale, zero, bits, group, x.shape[-1], counts)
    codes, scale, zero = ref.minmax_quantize(x, bits, group)
    return TokenQuant(ref.pack(codes, bits), scale.to(dtype), zero.to(dtype), bits, group, x.shape[-1], counts)


def quantize_channels(x: torch.Tensor, counts: tuple[int, ...], bits: int, group: int,
                      dtype: torch.dtype) -> ChannelQuant:
    """Per-channel min/max quantization of rows ``x [n, d]`` in blocks of ``group`` tokens (KIVI keys)."""
    n, d = x.shape
    if any(c % group for c in counts):
        raise ValueError(f"per-head token counts {counts} must be multiples of the group size {group}")
    tq = _triton_quant(x, bits)
    if tq is not None:
        words, scale, zero = tq.quantize_channels(x, bits, group, dtype)
        return ChannelQuant(words, scale, zero, bits, group, counts)
    blocks = x.reshape(n // group, group, d).transpose(1, 2)  # [nb, d, G]
    codes, scale, zero = ref.minmax_quantize(blocks, bits, group)
    return ChannelQuant(ref.pack(codes, bits), scale[..., 0].to(dtype), zero[..., 0].to(dtype), bits, group, counts)


def first_rows_mask(counts: tuple[int, ...], n_first: tuple[int, ...], device) -> torch.Tensor:
    """Head-grouped mask selecting the first ``n_first[h]`` rows of every head ``h``."""
    if counts and len(set(counts)) == 1 and len(set(n_first)) == 1:  # equal heads: one comparison, repeated
        return (torch.arange(counts[0], device=device) < n_first[0]).repeat(len(counts))
    parts = [torch.arange(c, device=device) < f for c, f in zip(counts, n_first)]
    return torch.cat(parts) if parts else torch.zeros(0, dtype=torch.bool, device=device)
