"""Gluon decode attention for packed fp16 / bf16 pairs: per-channel (KIVI) or per-token (QAQ, MiKV) keys +
per-token values, dequantized in registers straight into the tensor-core operand layout (no dequantized tile goes
through shared memory; only the sparse outliers' deltas do).

Why a second kernel: the Triton kernel (:mod:`kernels.triton_attention`) expands codes in a blocked layout and lets the
compiler move the fp16 tile into the ``mma`` operand layout through shared memory; on the H100 that conversion, the
register moves around it and 255 registers per thread set its speed, not the bytes (kernels/NOTES.md). Gluon states
layouts explicitly, so here every lane loads exactly the packed words whose codes it holds in the ``mma.m16n8k16``
operand fragments and dequantizes them in place.

The formulation (one warp per program), tokens as the MMA's M so the queries pad only to N = 8:

* ``S^T [16 tokens, 8 queries] = K_chunk [16, 128] @ Q^T [128, 8]`` and
  ``O^T [128 channels, 8 queries] += V^T_chunk [128, 16] @ P^T [16, 8]``; ``P^T`` goes from the accumulator layout to
  the B-operand layout with two ``movmatrix.trans`` per chunk.
* A tile is 128 tokens in 8 chunks of 16, walked in two halves of 4 chunks. For 2-bit keys, row ``m`` of chunk
  ``i`` of half ``w`` is physical token ``8 w + 16 (m % 8) + 2 i + m // 8`` of the tile, so the lane that holds row
  ``r = m % 8`` holds tokens ``16 r .. 16 r + 15`` of every channel it owns: one word of a per-channel key block, of
  which a half tile uses one half. For 4-bit keys it is token ``64 w + 8 (m % 8) + 2 i + m // 8``: each half tile
  uses one 8-token word per lane and channel, and the two halves are the tile's two 64-token halves.
* TokenQuant keys (per-token groups of channels, codes packed along channels: QAQ's and MiKV's format) use the
  4-bit token order above, and a channel order of their own (:func:`tok_key_channel`; the queries are loaded in it):
  lane ``a`` holds channels ``32 a .. 32 a + 31`` of its tokens, i.e. its own 2 (2-bit) or 4 (4-bit) words of each
  token in one vector load and one scale group of 32 channels, and each fp16 pair is codes ``j`` and ``j + 16 /
  bits`` of one word, which sit 16 bits apart: one rotation serves the pair, no ``prmt``. Scale and zero are one per
  token and lane, prepared like the values'.
* For the values, output row ``m`` is physical channel ``16 (m % 8) + m // 8``: the lane holding row ``m % 8`` holds
  channels ``16 r .. 16 r + 15``, one 2-bit word (two 4-bit words) per token.
* A fragment register holds two fp16 values: two adjacent channels (keys) or two tokens (values). Their two words
  are merged with ``prmt`` (low halves / high halves); then each pair is three instructions: a rotation puts the code
  on the top mantissa bits (``10 - bits`` and up), a ``lop3`` ors it into the fp16 magic ``2^(bits + 2)`` (whose
  mantissa step there is 4: the half is ``2^(bits + 2) + 4 code``, exact), and one ``fma.rn.f16x2`` with the
  prepared scale ``s / 4`` and bias ``z - 2^bits s`` gives ``code s + z`` (no int-to-float conversion, no
  subtraction; :func:`dequant_constants`). The prepared scale stays a normal fp16 down to ``s = 2^-12`` (a group
  range of 7e-4 at 2 bits), so values keep fp16 precision (session 5's magic 1024 with ``s 2^(bits - 10)`` lost it
  below ``s = 2^-6`` / ``2^-8``). The bias overflows only for a group whose values come within ``2^bits s`` of the
  fp16 limit.
* 2-bit keys are staged: each tile's key words, scales and zeros are copied to shared memory with ``cp.async`` one
  tile ahead (16-byte copies of the contiguous tile, an XOR swizzle against bank conflicts) and read from there in the
  register layout. Values and 4-bit keys load straight into registers (a token's two 4-bit value words per lane in
  one 64-bit load).
* KIVI 2-bit (2-bit ChannelQuant keys in blocks of 32-128 tokens, 2-bit values in groups of 32 or 64, fp16, at most
  4 query rows per KV head: :func:`raw_channel_keys`) skips the key dequantization: the codes are the A operand as
  fp16 subnormals, each key block's scales ride on the queries (the B operand's columns 0-3 for lane rows 0-3, 4-7
  for lane rows 4-7: two softmax streams per query, merged at the end), and each half tile's keys and values are
  staged in shared memory one unit ahead (section "raw ChannelQuant keys" below).
* QAQ's rows without outliers (2/4-bit TokenQuant keys and raw values, one scale per row, fp16:
  :func:`staged_rows`) stage each half tile too: its key and value words and its row scales and zeros are copied to
  shared memory one unit ahead (:func:`_ts_issue`, :func:`_ts_layouts`; the scales as words of two rows, so a stage
  starts at an even row and a head at an odd row starts one row early) and read back in the register layouts.
* Registers are capped at 168 per thread, so 3 one-warp programs fit per scheduler (12 per SM).
* The part pairs of one call (QAQ's bit widths), captured into a CUDA graph, launch as one chain of programmatic
  dependent launches on the caller's stream (:func:`chained`): each launch's programs start as the previous one's
  tail frees SMs, and no program ends before the launch before it has.
* Launch: as many one-warp programs as fit on the GPU at once (:func:`resident_programs`, from the compiled kernel's
  registers and shared memory), so a launch is one wave; ``PairPlan`` sizes the splits per head from it.
* Dynamic schedule (:func:`dynamic_enabled`): the programs of a head take its units (half tiles; whole tiles for
  staged keys) from a per-head counter instead of equal static ranges. The warps sharing an SM progress at rates
  that differ by several percent (the schedulers do not serve them equally), so with static ranges the kernel waited
  for the slowest; now slower programs do fewer units. Each processed unit draws one ticket, so a launch draws
  tickets 0 .. units - 1, and ``atom.inc`` bounded by the last one wraps the counter back to 0 with the final draw
  (:func:`counters`: one zeroed buffer per plan, no memset per launch). Run-to-run results then differ in rounding;
  ``torch.use_deterministic_algorithms(True)`` (or ``KV_GLUON_DYNAMIC=0``), read at each launch, gives the static
  ranges. The half-tile staged kernels (KIVI 2-bit, QAQ's rows) draw a unit's successor at the unit's start and
  issue its copies after the unit's scores (:data:`DRAW_LATE`), so that a program holds one unit beyond the one it
  computes and a head's programs end closer together.
* Token and channel permutations are free: the softmax sums over tokens, scores are stored at their physical
  columns and the output at its physical channels.

bf16 caches (bf16 queries, scales and zeros) run the same kernel with bf16 operands: the magic sits at mantissa bits
``7 - bits`` and up, and the magic is subtracted before the ``fma`` (exact), whose bias is then the zero itself, so
``code s + z`` is rounded once (4 instructions per pair; with only 8 mantissa bits the fp16 form's bias
``z - 2^bits s`` lost up to several bf16 steps).

Sparse outliers (QAQ keeps each row's extremes exact; TokenQuant keys and values, at most 16 per row): each part's
outliers are laid out once as fixed slots per row (:func:`outlier_slots`). A key outlier adds ``q'[m, c] delta`` to
its token's scores, which the lane holding the score row computes from the scaled queries kept in shared memory. A
value outlier adds ``delta p[t, m]`` to output channel ``c``, which another lane holds: each chunk's deltas are
written into a ``[128 accumulator rows, 16 tokens]`` fp16 tile in shared memory, read back as an A operand and
multiplied by the chunk's ``P^T`` (section "sparse outliers" below).

3-bit parts (10 codes per word, 13 words per row) with one scale per row, as QAQ and MiKV store them, take the same
kernel with their own word-to-lane maps (section "3-bit parts" below); 1-bit values merge half words by ``prmt``; 0-bit
values (a zero per row, QAQ's most common value width at its default bounds) add ``sum_t p[t, m] z_t`` to every
output row instead of value tiles.

Scope (:func:`supports`): fp16 or bf16 queries matching the cache's scales, ``d = 128``, at most 8 query rows per KV
head; keys of 2 or 4 bits: ChannelQuant keys in blocks of 16, 32, 64 or 128 tokens (no outliers) or TokenQuant keys in
groups of 32, 64 or 128 channels; TokenQuant keys of 3 bits in groups of 128; TokenQuant values of 0, 1, 2 or 4 bits in
groups of a multiple of 16 channels up to 128, or of 3 bits in groups of 128; with TokenQuant keys, up to 16 outliers
per row in either part. Everything else (0/1/8-bit keys, 8-bit values, 3 bits in smaller groups, more outliers per
row, d != 128) runs on :mod:`kernels.triton_attention`.
"""

from __future__ import annotations

import functools
import os
import struct
import warnings

import torch
from triton.experimental import gluon
from triton.experimental.gluon import language as gl
from triton.experimental.gluon.language.nvidia.ampere import async_copy, mma_v2

from kernels import fast_launch
from kernels.value_exponent import exponent as value_exponent_of

ENABLED = os.environ.get("KV_GLUON", "1") == "1"
# programs per SM (splits per head follow from it): by default as many as fit at once (the compiled kernel's
# registers decide), so every program of a launch is resident in one wave; the env var forces a number
PROGRAMS_PER_SM = int(os.environ.get("KV_GLUON_PROGRAMS_PER_SM", 0))
# register cap per thread: 168 lets 3 one-warp programs share each scheduler (12 per SM); 0 removes the cap
MAXNREG = int(os.environ.get("KV_GLUON_MAXNREG", 168)) or None
# 2-bit ChannelQuant keys: stage each tile's key words and scales in shared memory with cp.async one tile ahead
# (0: load them per half tile)
STAGE_K = os.environ.get("KV_GLUON_STAGE", "1") == "1"
# units of work (half tiles; tiles for staged keys) taken from a per-head counter, so that programs that run slower
# do fewer, instead of equal static ranges (0: static ranges)
DYNAMIC = os.environ.get("KV_GLUON_DYNAMIC", "1") == "1"
# TokenQuant keys with one scale per row (QAQ's rows), fp16: the A operand is the codes themselves (fp16 subnormals,
# one ``and`` per pair), the scale and zero are applied to the scores (0: dequantize each pair as the other formats)
RAW_K = os.environ.get("KV_GLUON_RAWK", "1") == "1"
RAW_K_BITS = (2, 3)  # the key widths that take it (raw_keys)
# values the same way (one scale per row): codes as the A operand, P^T times each token's scale as the B operand, the
# zeros' term per query apart (0: dequantize each pair)
RAW_V = os.environ.get("KV_GLUON_RAWV", "1") == "1"
# ... also next to value outliers (QAQ's rows): each slot's delta is stored in its accumulator row's units
# (raw_values, outlier_slots; 0: values with outliers dequantize each pair)
RAW_VOUT = os.environ.get("KV_GLUON_RAWVOUT", "1") == "1"
# ... and of 3 bits (one scale per row; 0: dequantize each pair)
RAW_V3 = os.environ.get("KV_GLUON_RAWV3", "1") == "1"
# staged 2-bit ChannelQuant keys (KIVI's) with at most 4 query rows per KV head, fp16: the codes as the A operand and
# each key block's scales on the queries, two softmax streams per query (section "raw ChannelQuant keys"; 0: pairs)
RAW_C = os.environ.get("KV_GLUON_RAWC", "1") == "1"
# TokenQuant rows of 2 or 4 bits with raw values (QAQ's rows without outliers), fp16: each half tile's key and value
# words, scales and zeros staged in shared memory one unit ahead (section "staged rows"; 0: loaded into registers)
TSTAGE = os.environ.get("KV_GLUON_TSTAGE", "1") == "1"
# half-tile staged kernels (KIVI 2-bit, QAQ's rows) with the dynamic schedule: draw the next unit's ticket at the
# start of a unit and issue its copies after the unit's scores, so that a program holds one unit beyond the one it
# computes instead of two (0: the copies of the next unit at the unit's start, its successor's ticket drawn then)
DRAW_LATE = os.environ.get("KV_GLUON_DRAW_LATE", "1") == "1"
# the part pairs of one call (QAQ's bit widths) as one chain of programmatic dependent launches on the caller's stream
# (:func:`chained`; 0: one after another, or on side streams while a CUDA graph is captured)
CHAIN = os.environ.get("KV_GLUON_CHAIN", "1") == "1"

MMA: gl.constexpr = gl.constexpr(gl.NVMMADistributedLayout(version=[2, 0], warps_per_cta=[1, 1], instr_shape=[16, 8]))
A_L: gl.constexpr = gl.constexpr(gl.DotOperandLayout(0, MMA, 2))
B_L: gl.constexpr = gl.constexpr(gl.DotOperandLayout(1, MMA, 2))
# key chunk [2 h, 8 r, 16 f, 4 a, 2 e]: token row 8h + r, channel 8f + 2a + e (registers e, h, f; lanes a, r),
# i.e. the A operand [16, 128]
K5: gl.constexpr = gl.constexpr(gl.DistributedLinearLayout(
    reg_bases=[[0, 0, 0, 0, 1], [1, 0, 0, 0, 0], [0, 0, 1, 0, 0], [0, 0, 2, 0, 0], [0, 0, 4, 0, 0], [0, 0, 8, 0, 0]],
    lane_bases=[[0, 0, 0, 1, 0], [0, 0, 0, 2, 0], [0, 1, 0, 0, 0], [0, 2, 0, 0, 0], [0, 4, 0, 0, 0]],
    warp_bases=[], block_bases=[], shape=[2, 8, 16, 4, 2]))
# value chunk [16 t, 8 r, 2 h, 4 a, 2 e]: channel row 8t + r, token column 8h + 2a + e (registers e, t, h),
# i.e. the A operand [128, 16]
V5: gl.constexpr = gl.constexpr(gl.DistributedLinearLayout(
    reg_bases=[[0, 0, 0, 0, 1], [1, 0, 0, 0, 0], [0, 0, 1, 0, 0], [2, 0, 0, 0, 0], [4, 0, 0, 0, 0], [8, 0, 0, 0, 0]],
    lane_bases=[[0, 0, 0, 1, 0], [0, 0, 0, 2, 0], [0, 1, 0, 0, 0], [0, 2, 0, 0, 0], [0, 4, 0, 0, 0]],
    warp_bases=[], block_bases=[], shape=[16, 8, 2, 4, 2]))
# a lane's two 4-bit value words of a token: V4 with the word pair as the first register axis (one 64-bit load)
VW5: gl.constexpr = gl.constexpr(gl.DistributedLinearLayout(
    reg_bases=[[0, 0, 0, 0, 1], [0, 0, 0, 1, 0], [0, 1, 0, 0, 0]],
    lane_bases=[[0, 0, 1, 0, 0], [0, 0, 2, 0, 0], [1, 0, 0, 0, 0], [2, 0, 0, 0, 0], [4, 0, 0, 0, 0]],
    warp_bases=[], block_bases=[], shape=[8, 2, 4, 2, 2]))
K4: gl.constexpr = gl.constexpr(gl.SliceLayout(0, K5))  # [8 r, 16 f, 4 a, 2 e]: per (lane's token run, channel)
V4: gl.constexpr = gl.constexpr(gl.SliceLayout(0, V5))  # [8 r, 2 h, 4 a, 2 e]: per (lane's channel run, token)
K3: gl.constexpr = gl.constexpr(gl.SliceLayout(3, K4))  # merged words [8 r, 16 f, 4 a]
V3: gl.constexpr = gl.constexpr(gl.SliceLayout(3, V4))  # merged words [8 r, 2 h, 4 a]
ROW_L: gl.constexpr = gl.constexpr(gl.SliceLayout(1, MMA))  # token / channel rows of the accumulators
COL_L: gl.constexpr = gl.constexpr(gl.SliceLayout(0, MMA))  # query columns


def _merge_asm() -> str:
    # two words (e = 0, 1) -> (low halves, high halves): their codes at the same bit position now sit 16 bits apart
    return "prmt.b32 $0, $2, $3, 0x5410;\nprmt.b32 $1, $2, $3, 0x7632;"


def _mant(bf16: bool) -> int:
    """Mantissa bits of the 16-bit format: 10 for fp16, 7 for bf16."""
    return 7 if bf16 else 10


def dequant_constants(bits: int, bf16: bool = False) -> tuple[int, float, float]:
    """(magic bits, prepared-scale factor, bias factor) of the pair dequantization in fp16 (or bf16): a code rotated
    to mantissa bits ``10 - bits`` (bf16: ``7 - bits``) and up and ored into the magic ``2^(bits + 2)`` reads
    ``2^(bits + 2) + 4 code``; times the prepared scale ``s / 4`` plus the bias ``z - 2^(bits + 2) (s / 4)`` that is
    ``code s + z``. The factor 1/4 (not session 5's ``2^(bits - 10)``) keeps the prepared scale a normal fp16 down to
    ``s = 2^-12`` with session 5's instructions (one ``mul`` by a constant and one ``fma`` per scale pair) and, on the
    H100, its speed; an unscaled variant (magic ``2^bits``, no ``mul``: 24 fewer instructions per 2-bit half tile)
    got another ptxas schedule at the register cap and ran 2-bit 11% slower. bf16 does not use the bias: it subtracts
    the magic first (exact) and adds the zero, so ``code s + z`` is rounded once (:func:`_deq_asm`)."""
    e = bits + 2  # 2^e: fp16 0x4C00 / 0x5400, bf16 0x4180 / 0x4280 for 16.0 / 64.0
    magic = (e + 127) << 7 if bf16 else (e + 15) << 10
    return magic, 0.25, -float(1 << e)


def _f16_bits(x: float, bf16: bool = False) -> int:
    """The 16 bits of ``x`` (exact in the format) as fp16 or bf16."""
    if bf16:
        return struct.unpack("<I", struct.pack("<f", x))[0] >> 16
    return struct.unpack("<H", struct.pack("<e", x))[0]


def _deq_asm(bits: int, key: bool, bf16: bool = False) -> str:
    """Per fragment register: ``$0`` fp16x2 (bf16x2) out; ``$1, $2`` the merged word (twice); ``$3, $4`` the rotation
    (twice); then the prepared scale and bias pairs (:func:`_prep_asm`): int32 words ``$5, $6`` / ``$7, $8`` (keys)
    or packed 16-bit pairs ``$5`` / ``$6`` (values).

    Three instructions per pair: a rotation brings each half's code to mantissa bits ``10 - bits`` (bf16:
    ``7 - bits``) and up, ``lop3`` ors it into the magic (:func:`dequant_constants`), and one ``fma`` with the
    prepared scale and bias gives ``code * s + z``; bf16 subtracts the magic between them (four)."""
    mask = ((1 << bits) - 1) << (_mant(bf16) - bits)
    magic = dequant_constants(bits, bf16)[0]
    sc, zr = ("$5", "$7") if key else ("$5", "$6")
    # bf16 subtracts the magic first (exact: 4 code) and adds the zero itself, one more instruction per pair: with 8
    # mantissa bits a bias z - 2^bits s rounded to bf16 cost up to 2^-9 |z - 2^bits s|, several times the rounding
    # of the value (relative output errors near 2e-2 against the Triton kernel on the H100)
    sub = ["sub.rn.bf16x2 t, t, k;"] if bf16 else []
    fma = "fma.rn.bf16x2" if bf16 else "fma.rn.f16x2"
    return "\n".join([
        "{", ".reg .b32 t, k, m;", f"mov.b32 k, {magic | magic << 16};", f"mov.b32 m, {mask | mask << 16};",
        "shf.l.wrap.b32 t, $1, $1, $3;", "lop3.b32 t, t, m, k, 0xEA;", *sub, f"{fma} $0, t, {sc}, {zr};", "}"])


def _prep_asm(bits: int, bf16: bool = False) -> str:
    """Key scale / zero pairs (int32 words of two fp16 or bf16) -> ``$0`` = prepared scale, ``$1`` = bias
    (:func:`dequant_constants`; one rounding each: the products are exact)."""
    _, fs, fb = dequant_constants(bits, bf16)
    f, n = _f16_bits(fs, bf16), _f16_bits(fb, bf16)
    if bf16:  # the magic is subtracted before the fma (:func:`_deq_asm`): the bias is the zero itself
        return "\n".join(["{", ".reg .b32 f;", f"mov.b32 f, {f | f << 16:#x};", "mul.rn.bf16x2 $0, $2, f;",
                          "mov.b32 $1, $3;", "}"])
    return "\n".join(["{", ".reg .b32 f, n;", f"mov.b32 f, {f | f << 16:#x};", f"mov.b32 n, {n | n << 16:#x};",
                      "mul.rn.f16x2 $0, $2, f;", "fma.rn.f16x2 $1, $0, n, $3;", "}"])


MERGE: gl.constexpr = gl.constexpr(_merge_asm())
# the value path's prepared-scale factor and bias magnitude (keys take them through _prep_asm)
V_FS2: gl.constexpr = gl.constexpr(dequant_constants(2)[1])
V_FB2: gl.constexpr = gl.constexpr(-dequant_constants(2)[2])
V_FS4: gl.constexpr = gl.constexpr(dequant_constants(4)[1])
V_FB4: gl.constexpr = gl.constexpr(-dequant_constants(4)[2])
V_FS1: gl.constexpr = gl.constexpr(dequant_constants(1)[1])
V_FB1: gl.constexpr = gl.constexpr(-dequant_constants(1)[2])
V_FS3: gl.constexpr = gl.constexpr(dequant_constants(3)[1])
V_FB3: gl.constexpr = gl.constexpr(-dequant_constants(3)[2])
# 3-bit value words: bytes 1-2 of each of the two tokens' words (bits 8-23), so code 5 (bits 15-17, across the
# halves) sits at bits 7-9 of each half: the fp16 position of a 3-bit code, no rotation needed
MERGE_MID: gl.constexpr = gl.constexpr("prmt.b32 $0, $2, $3, 0x6521;\nmov.b32 $1, $0;")
MERGE_SEL: gl.constexpr = gl.constexpr("prmt.b32 $0, $2, $3, $4;\nmov.b32 $1, $0;")
DEQK2: gl.constexpr = gl.constexpr(_deq_asm(2, True))
DEQK4: gl.constexpr = gl.constexpr(_deq_asm(4, True))
DEQV2: gl.constexpr = gl.constexpr(_deq_asm(2, False))
DEQV4: gl.constexpr = gl.constexpr(_deq_asm(4, False))
DEQV1: gl.constexpr = gl.constexpr(_deq_asm(1, False))
DEQV1B: gl.constexpr = gl.constexpr(_deq_asm(1, False, True))
DEQV3: gl.constexpr = gl.constexpr(_deq_asm(3, False))
DEQV3B: gl.constexpr = gl.constexpr(_deq_asm(3, False, True))
PREP2: gl.constexpr = gl.constexpr(_prep_asm(2))
PREP4: gl.constexpr = gl.constexpr(_prep_asm(4))
DEQK2B: gl.constexpr = gl.constexpr(_deq_asm(2, True, True))
DEQK4B: gl.constexpr = gl.constexpr(_deq_asm(4, True, True))
DEQV2B: gl.constexpr = gl.constexpr(_deq_asm(2, False, True))
DEQV4B: gl.constexpr = gl.constexpr(_deq_asm(4, False, True))
PREP2B: gl.constexpr = gl.constexpr(_prep_asm(2, True))
PREP4B: gl.constexpr = gl.constexpr(_prep_asm(4, True))
# raw key codes: the pair's two codes (16 bits apart, at mantissa bits 0-9 of their halves) masked out of the word:
# two fp16 subnormals, code x 2^(pos - 24), exact
RAW_AND: gl.constexpr = gl.constexpr("and.b32 $0, $1, $3;")
RAW_EXP: gl.constexpr = gl.constexpr(2)  # raw keys: the queries' factor 2^(RAW_EXP - pos) (raw_qfac)
RAW_ROW: gl.constexpr = gl.constexpr(float(2 ** (24 - RAW_EXP.value)))  # raw keys: a score row's factor over its scale
TRANS: gl.constexpr = gl.constexpr("movmatrix.sync.aligned.m8n8.trans.b16 $0, $1;")
# an int32 word as its two 16-bit halves (pack=2: the element pair's first input; the second is the same word)
HALVES: gl.constexpr = gl.constexpr("mov.b32 $0, $1;")
# the value a lane's register holds in lane ``lane ^ 2``: query column c <-> c + 4 of the accumulator layouts
BFLY2: gl.constexpr = gl.constexpr("shfl.sync.bfly.b32 $0, $1, 2, 0x1f, 0xffffffff;")
# the dynamic schedule's counter draw in two parts, so the atomic's latency is not waited for where it is issued:
# lane 0 draws (GRAB: atom.inc, which returns the old value and wraps the counter to 0 once it reaches the launch's
# final ticket), and later the drawn ticket is broadcast to the warp (TICKET)
GRAB: gl.constexpr = gl.constexpr("\n".join([
    "{", ".reg .pred p;", ".reg .b32 l;", "mov.u32 l, %laneid;", "setp.eq.u32 p, l, 0;", "mov.u32 $0, 0;",
    "@p atom.global.inc.u32 $0, [$1], $2;", "}"]))
TICKET: gl.constexpr = gl.constexpr("shfl.sync.idx.b32 $0, $1, 0, 0x1f, 0xffffffff;")
# the address of the kernel's shared memory, where the outliers' buffers are the only allocation (checked at build:
# _check_smem)
SMEM_BASE: gl.constexpr = gl.constexpr("mov.b32 $0, global_smem;")
# a value outlier's delta (or a zero) into the chunk's delta tile: the 16 bits of $3 at shared address $1, when the
# slot word $2 is not empty
ST_DELTA: gl.constexpr = gl.constexpr("\n".join([
    "{", ".reg .pred p;", ".reg .b16 h;", "setp.ne.s32 p, $2, 0;", "cvt.u16.u32 h, $3;", "@p st.shared.b16 [$1], h;",
    "mov.b32 $0, 0;", "}"]))
# a query pair (two consecutive registers of SLOT_L, adjacent in shared memory) in one load
LDS_F32X2: gl.constexpr = gl.constexpr("ld.shared.v2.f32 {$0, $1}, [$2];")
# programmatic dependent launch (a chain of part pairs, :func:`launch`'s ``chain``): let the next launch of the stream
# start its programs as this one's end (at the program's start), and end no program before the previous launch has
# ended (at its end: so the last launch of a chain ends after all of them); both are no-ops in a launch without PDL
GDC_LAUNCH: gl.constexpr = gl.constexpr("griddepcontrol.launch_dependents;\nmov.b32 $0, $1;")
GDC_WAIT: gl.constexpr = gl.constexpr("griddepcontrol.wait;\nmov.b32 $0, $1;")


# ---- shared-memory staging of key tiles (cp.async one tile ahead) ------------------------------------------------
# A 128-token key tile of a ChannelQuant part whose blocks divide 128 is one contiguous run of words in memory
# (blocks [b, 128 channels, words per channel]), so it is copied flat, 16 bytes per cp.async. Each lane then reads its
# own words from a second view of the same bytes, indexed like the register layout (run r, channel 8f + 2a + e).
# An XOR swizzle moves lane bits that would fall outside the bank bits (offset bits 0-4)
# onto free bank bits >= 2 (bits 0-1 stay put, so each 16-byte copy stays contiguous).


@gluon.constexpr_function
def _swizzle_pairs(lane_pos: list) -> list:
    """XOR pairs ``(source bit, target bit)`` giving lane bits at word offsets >= 5 a free bank bit in 2..4."""
    used = {p for p in lane_pos if p < 5}
    pairs = []
    for p in lane_pos:
        free = [t for t in range(2, 5) if t not in used]
        if p >= 5 and free:
            pairs.append((p, free[0]))
            used.add(free[0])
    return pairs


@gluon.constexpr_function
def _swz(g: int, pairs: list) -> int:
    """The swizzle (an involution: sources are never targets)."""
    for src, dst in pairs:
        if g >> src & 1:
            g ^= 1 << dst
    return g


@gluon.constexpr_function
def _key_word_maps(kg: int) -> tuple:
    """Offset bases of one stage's flat view ``[1024]`` and of the read view ``[8 r, 16 f, 4 a, 2 e]`` of a 2-bit key
    tile's words. Word ``g`` of a tile is ``(b * 128 + c) * WPB + j`` (block b, channel c, word j of the block's WPB
    = kg / 16 per channel); it holds tokens ``16 u .. 16 u + 15`` of the tile, ``u = b WPB + j`` = the lane row r."""
    wpb = kg // 16
    jb = wpb.bit_length() - 1

    def upos(ub):  # word-offset bit of bit ub of u
        return ub if ub < jb else ub + 7

    pairs = _swizzle_pairs([upos(0), upos(1), upos(2), jb + 1, jb + 2])

    def coords(g):
        j, c, b = g & (wpb - 1), (g >> jb) & 127, g >> (jb + 7)
        return [b * wpb + j, c >> 3, (c >> 1) & 3, c & 1]

    gs = [_swz(1 << k, pairs) for k in range(10)]
    return [[g] for g in gs], [coords(g) for g in gs]


@gluon.constexpr_function
def _key_meta_maps() -> tuple:
    """Offset bases of one stage's flat view ``[8 r, 64 p]`` and of the read view ``[8 r, 16 f, 4 a]`` of a tile's
    key scales (or zeros) as int32 channel pairs ``p = 4 f + a``, copied once per lane row (word ``64 r + p``)."""
    pairs = _swizzle_pairs([0, 1, 6, 7, 8])
    gs = [_swz(1 << k, pairs) for k in range(9)]
    return [[g >> 6, g & 63] for g in gs], [[g >> 6, (g & 63) >> 2, g & 3] for g in gs]


@gluon.constexpr_function
def _kwords_layout(kg, read):
    flat, rd = _key_word_maps(kg)
    return gl.SharedLinearLayout(rd if read else flat)


@gluon.constexpr_function
def _kmeta_layout(read):
    flat, rd = _key_meta_maps()
    return gl.SharedLinearLayout(rd if read else flat)


# Triton 3.6 and later releases name these differently
_REINTERPRET = getattr(gl.shared_memory_descriptor, "reinterpret", None) or gl.shared_memory_descriptor._reinterpret
_CP_ASYNC = getattr(async_copy, "async_load", None) or async_copy.async_copy_global_to_shared
_BARRIER = getattr(gl, "thread_barrier", None) or gl.barrier


@gluon.jit
def _view(smem, shape: gl.constexpr, layout: gl.constexpr):
    """The same int32 shared memory as ``shape`` with ``layout``."""
    return _REINTERPRET(smem, gl.int32, shape, layout)


CP1: gl.constexpr = gl.constexpr(gl.BlockedLayout([4], [32], [1], [0]))  # flat copies, 16 bytes per lane
CP2: gl.constexpr = gl.constexpr(gl.BlockedLayout([1, 4], [2, 16], [1, 1], [1, 0]))  # [8 r, 64 p] meta copies


@gluon.jit
def _idx4(L4: gl.constexpr, S0: gl.constexpr, S1: gl.constexpr, S2: gl.constexpr, S3: gl.constexpr):
    """The four coordinate tensors of shape ``[S0, S1, S2, S3]`` (int32, layout ``L4``)."""
    i0 = gl.arange(0, S0, layout=gl.SliceLayout(1, gl.SliceLayout(2, gl.SliceLayout(3, L4))))
    i1 = gl.arange(0, S1, layout=gl.SliceLayout(0, gl.SliceLayout(2, gl.SliceLayout(3, L4))))
    i2 = gl.arange(0, S2, layout=gl.SliceLayout(0, gl.SliceLayout(1, gl.SliceLayout(3, L4))))
    i3 = gl.arange(0, S3, layout=gl.SliceLayout(0, gl.SliceLayout(1, gl.SliceLayout(2, L4))))
    z = gl.full([S0, S1, S2, S3], 0, gl.int32, layout=L4)
    c0 = gl.expand_dims(gl.expand_dims(gl.expand_dims(i0, 1), 2), 3) + z
    c1 = gl.expand_dims(gl.expand_dims(gl.expand_dims(i1, 0), 2), 3) + z
    c2 = gl.expand_dims(gl.expand_dims(gl.expand_dims(i2, 0), 1), 3) + z
    c3 = gl.expand_dims(gl.expand_dims(gl.expand_dims(i3, 0), 1), 2) + z
    return c0, c1, c2, c3


@gluon.jit
def _idx3(L3: gl.constexpr, S0: gl.constexpr, S1: gl.constexpr, S2: gl.constexpr):
    """The three coordinate tensors of shape ``[S0, S1, S2]`` (int32, layout ``L3``)."""
    i0 = gl.arange(0, S0, layout=gl.SliceLayout(1, gl.SliceLayout(2, L3)))
    i1 = gl.arange(0, S1, layout=gl.SliceLayout(0, gl.SliceLayout(2, L3)))
    i2 = gl.arange(0, S2, layout=gl.SliceLayout(0, gl.SliceLayout(1, L3)))
    z = gl.full([S0, S1, S2], 0, gl.int32, layout=L3)
    c0 = gl.expand_dims(gl.expand_dims(i0, 1), 2) + z
    c1 = gl.expand_dims(gl.expand_dims(i1, 0), 2) + z
    c2 = gl.expand_dims(gl.expand_dims(i2, 0), 1) + z
    return c0, c1, c2


@gluon.jit
def _merge(w, L3: gl.constexpr):
    """Words ``[.., 2]`` (the pair's two words on the last axis) -> merged (low halves, high halves) ``[..]``."""
    m = gl.inline_asm_elementwise(MERGE, "=r,=r,r,r", [w], dtype=gl.int32, is_pure=True, pack=2)
    lo, hi = gl.split(m)
    return gl.convert_layout(lo, L3, assert_trivial=True), gl.convert_layout(hi, L3, assert_trivial=True)


@gluon.jit
def _merge_sel(w, sel, L3: gl.constexpr):
    """Words ``[.., 2]`` -> one merged word ``[..]`` by ``prmt`` with a runtime selector (0x5410: low halves,
    0x7632: high halves)."""
    m = gl.inline_asm_elementwise(MERGE_SEL, "=r,=r,r,r,r,r", [w, sel], dtype=gl.int32, is_pure=True, pack=2)
    lo, _ = gl.split(m)
    return gl.convert_layout(lo, L3, assert_trivial=True)


@gluon.jit
def _prep_key(sc, zr, BITS: gl.constexpr, BF16: gl.constexpr):
    """Key scale / zero int32 pairs -> (prepared scale, bias) pairs for :func:`_deq`."""
    ASM: gl.constexpr = (PREP2B if BITS == 2 else PREP4B) if BF16 else (PREP2 if BITS == 2 else PREP4)
    return gl.inline_asm_elementwise(ASM, "=r,=r,r,r", [sc, zr], dtype=(gl.int32, gl.int32), is_pure=True, pack=1)


def rotation(j: int, bits: int, bf16: bool = False) -> int:
    """Left rotation that brings code ``j`` of a 16-bit half to mantissa bits ``10 - bits`` (bf16: ``7 - bits``) and
    up (:func:`_rot` in the kernel, which the CPU tests cannot run)."""
    return (_mant(bf16) - bits - bits * j) % 32


@gluon.jit
def _rot(j, BITS: gl.constexpr, BF16: gl.constexpr):
    """Left rotation that brings code ``j`` of a 16-bit half to mantissa bits ``10 - BITS`` (bf16: ``7 - BITS``)
    and up."""
    MANT: gl.constexpr = 7 if BF16 else 10
    return (MANT - BITS - BITS * j + 32) % 32


@gluon.jit
def _deq(x, sh, sc, zr, BITS: gl.constexpr, KEY: gl.constexpr, BF16: gl.constexpr):
    """fp16 pairs from merged words (PTX of :func:`_deq_asm`). Keys: scale / zero pairs arrive as int32 words (two
    adjacent channels' fp16); values: as the two tokens' fp16 values (packed into one register by ``pack=2``)."""
    if BITS == 3:  # TokenQuant only: scales as the values' (one per token)
        ASM: gl.constexpr = DEQV3B if BF16 else DEQV3
    elif BITS == 1:  # values only
        ASM: gl.constexpr = DEQV1B if BF16 else DEQV1
    elif BF16:
        ASM: gl.constexpr = (DEQK2B if BITS == 2 else DEQK4B) if KEY else (DEQV2B if BITS == 2 else DEQV4B)
    else:
        ASM: gl.constexpr = (DEQK2 if BITS == 2 else DEQK4) if KEY else (DEQV2 if BITS == 2 else DEQV4)
    CON: gl.constexpr = "=r,r,r,r,r,r,r,r,r" if KEY else "=r,r,r,r,r,r,r"
    if BF16:
        y = gl.inline_asm_elementwise(ASM, CON, [x, sh, sc, zr], dtype=gl.bfloat16, is_pure=True, pack=2)
    else:
        y = gl.inline_asm_elementwise(ASM, CON, [x, sh, sc, zr], dtype=gl.float16, is_pure=True, pack=2)
    return y


@gluon.jit
def _key_words(kptr, row0, k_nrows, KG: gl.constexpr, KPER: gl.constexpr, MASKED: gl.constexpr):
    """Key words of each lane's token run, from global memory, ``[8 r, 16 f, 4 a, 2 e]``. ``kptr`` holds each
    element's channel offset; ``row0`` each lane's first token."""
    ptr = kptr + ((row0 // KG).to(gl.int64) * 128 * (KG // KPER) + (row0 % KG) // KPER)
    if MASKED:
        wd = gl.load(ptr, mask=row0 < k_nrows, other=0)
    else:
        wd = gl.load(ptr)
    return wd


@gluon.jit
def _merge_key(wd, w, KPER: gl.constexpr):
    """Merged key words as ``(lo, hi)`` ``[8 r, 16 f, 4 a]`` per channel pair: for 2 bits half ``w`` of the lane's
    word (``lo``; ``hi`` unused), for 4 bits word ``w``'s low and high halves."""
    if KPER == 16:
        lo = _merge_sel(wd, 0x5410 + w * (0x7632 - 0x5410) + gl.zeros_like(wd), K3)
        hi = lo
    else:
        lo, hi = _merge(wd, K3)
    return lo, hi


@gluon.jit
def _issue_keys(kflat, sflat, zflat, st, T0, k_data, k_scale2, k_zero2, k_nrows, KG: gl.constexpr):
    """cp.async the 2-bit key tile at ``T0`` (its words, and its scales / zeros once per lane row) into stage
    ``st``."""
    KW: gl.constexpr = 1024
    WPB: gl.constexpr = KG // 16
    blk = T0 // KG
    g = gl.arange(0, KW, layout=CP1)
    gb = blk.to(gl.int64) * (128 * WPB)
    nw = (k_nrows // KG).to(gl.int64) * (128 * WPB)
    _CP_ASYNC(kflat.index(st), k_data + (gb + g), mask=gb + g < nw)
    r = gl.arange(0, 8, layout=gl.SliceLayout(1, CP2))
    pp = gl.arange(0, 64, layout=gl.SliceLayout(0, CP2))
    mb = blk + (16 * r) // KG
    moff = gl.expand_dims(mb.to(gl.int64) * 64, 1) + gl.expand_dims(pp, 0)
    mmask = gl.expand_dims(mb * KG < k_nrows, 1) & gl.expand_dims(pp < 64, 0)
    _CP_ASYNC(sflat.index(st), k_scale2 + moff, mask=mmask)
    _CP_ASYNC(zflat.index(st), k_zero2 + moff, mask=mmask)


@gluon.jit
def _kchunk(lo, hi, sc, zr, i: gl.constexpr, BITS: gl.constexpr, KPER: gl.constexpr, BF16: gl.constexpr):
    """fp16 key chunk ``[16 tokens, 128 channels]`` (A operand) of chunk ``i`` (0..3) of a half tile from the half's
    merged words."""
    HALF: gl.constexpr = KPER // 2
    j0: gl.constexpr = (2 * i) % HALF
    if ((2 * i) // HALF) % 2 == 0:
        src = lo
    else:
        src = hi
    zero5 = gl.full([2, 8, 16, 4, 2], 0, gl.int32, layout=K5)
    x = gl.expand_dims(gl.expand_dims(gl.convert_layout(src, gl.SliceLayout(3, K4), assert_trivial=True), 3), 0)
    x = x + zero5
    hh = gl.arange(0, 2, layout=gl.SliceLayout(1, gl.SliceLayout(2, gl.SliceLayout(3, gl.SliceLayout(4, K5)))))
    sh = _rot((j0 + hh) % HALF, BITS, BF16)
    sh = gl.expand_dims(gl.expand_dims(gl.expand_dims(gl.expand_dims(sh, 1), 2), 3), 4) + zero5
    s5 = gl.expand_dims(gl.expand_dims(gl.convert_layout(sc, gl.SliceLayout(3, K4), assert_trivial=True), 3), 0) + zero5
    z5 = gl.expand_dims(gl.expand_dims(gl.convert_layout(zr, gl.SliceLayout(3, K4), assert_trivial=True), 3), 0) + zero5
    y = _deq(x, sh, s5, z5, BITS, True, BF16)
    return gl.convert_layout(gl.reshape(y, [16, 128]), A_L, assert_trivial=True)


# ---- raw ChannelQuant keys (KIVI's per-channel blocks of tokens, 2 bits) ------------------------------------------
# With per-channel scales s[b, c] and zeros z[b, c] of key block b, a score is
# ``sum_c q_c (s_bc code_tc + z_bc) = sum_c (q_c s_bc) code_tc + sum_c q_c z_bc``: the A operand can be the codes
# themselves (masked out of the merged words as fp16 subnormals, as for TokenQuant rows) if the B operand carries
# ``q s_b`` of the row's block. These keys take the 4-bit token order (row ``m`` of chunk ``i`` of half ``w`` is token
# ``64 w + 8 (m % 8) + 2 i + m // 8`` of the tile): lane row r reads word ``r // 2`` of the half's 4 words of each of
# its channels (lane rows 2u and 2u + 1 the same word, a broadcast) and takes its half ``r % 2``, so a half tile's
# rows lie in at most two key blocks (KG = 32: lane rows 0-3 in the first, 4-7 in the second). The queries use 4 of
# the MMA's 8 columns, so column ``n`` carries query ``n % 4`` scaled by the block of lane rows ``4 (n // 4) ..``; each
# row keeps the four columns of its own block and sets the other four to -inf. Columns n and n + 4 are then two
# softmax streams of one query over disjoint tokens (lane rows 0-3 and 4-7 of every half tile), merged at the end
# like two splits (:func:`_bfly2`). The zeros' term ``sum_c q_c z_bc`` is one more MMA per half tile: the blocks'
# zeros as the A operand (lane row r's rows) against the unscaled queries.
#
# With the keys this cheap the value loads' latency showed (Nsight Compute: long-scoreboard stalls 2.2 per issued
# instruction against 1.0 for the pairs), so this path stages each half tile in shared memory one unit ahead with
# cp.async: its key words, the two key blocks' scales and zeros, its 64 value rows' words, scales and zeros (6 KB per
# stage at G = 32; :func:`_hs_issue`), read back in the register layouts (:func:`_hs_layouts`).


@gluon.constexpr_function
def _hs_layouts(kg: int, ng: int) -> tuple:
    """Shared layouts of one half-tile stage (flat copy views, read views); where a read's lane bits would share
    banks an XOR swizzle moves them onto free bank bits (targets at word bits 2-4, so 16-byte copies stay
    contiguous):

    * key words ``[512]`` / ``[4 u, 16 f, 4 a, 2 e]``: word u (tokens ``16 u ..``) of channel ``c = 8 f + 2 a + e``,
      at ``(u // 2) 256 + 2 c + u % 2`` (KG = 32: two blocks of ``[128 c, 2 j]``) or ``4 c + u`` (KG >= 64);
    * key scales / zeros ``[2, 64]`` / ``[2 b, 16 f, 4 a]``: int32 channel pairs ``4 f + a`` of lane rows ``4 b ..``;
    * value words ``[512]`` / ``[8 r, 2 h, 4 a, 2 e]`` per chunk i: word r of row ``16 a + 8 e + h + 2 i`` (``8 row +
      r`` in the copy) at ``r + 8 h + 16 e + 32 a + 128 i``, so that a chunk is one view (``index``);
    * value scales / zeros ``[32 ng]`` (int32) / ``[ng g, 2 h, 4 a, 2 e]`` (fp16) per chunk: group g of that row
      (``ng row + g`` in the copy) at ``g + ng (h + 2 e + 4 a + 16 i)`` (fp16 units; copied as words)."""
    def lay(nbits, lanes, coords):
        pairs = _swizzle_pairs(lanes)
        gs = [_swz(1 << k, pairs) for k in range(nbits)]
        return [[g] for g in gs], [coords(g) for g in gs]

    if kg == 32:
        kw = lay(9, [0, 8, 2, 3], lambda o: [(o >> 8) * 2 + (o & 1), (o >> 4) & 15, (o >> 2) & 3, (o >> 1) & 1])
    else:
        kw = lay(9, [0, 1, 3, 4], lambda o: [o & 3, (o >> 5) & 15, (o >> 3) & 3, (o >> 2) & 1])
    km = lay(7, [0, 1, 6], lambda o: [o >> 6, (o >> 2) & 15, o & 3])
    km = ([[o[0] >> 6, o[0] & 63] for o in km[0]], km[1])
    pairs = _swizzle_pairs([0, 1, 2, 5, 6])  # value words: lanes r (bits 0-2) and a (5, 6)
    vws = [_swz(1 << k, pairs) for k in range(9)]

    def vw_copy(p):  # position -> the copy's index 8 row + r
        r, h, e, a, i = p & 7, (p >> 3) & 1, (p >> 4) & 1, (p >> 5) & 3, p >> 7
        return 8 * (16 * a + 8 * e + h + 2 * i) + r

    vw = ([[vw_copy(p)] for p in vws], [[p & 7, (p >> 3) & 1, (p >> 5) & 3, (p >> 4) & 1] for p in vws[:7]])
    lg = ng.bit_length() - 1  # fp16 position g + ng (h + 2 e + 4 a + 16 i): lanes' banks differ without a swizzle

    def vm_copy(p16):  # fp16 position -> the copy's fp16 index ng row + g
        g, q = p16 & (ng - 1), p16 >> lg
        h, e, a, i = q & 1, (q >> 1) & 1, (q >> 2) & 3, q >> 4
        return ng * (16 * a + 8 * e + h + 2 * i) + g

    def vm_read(p16):
        g, q = p16 & (ng - 1), p16 >> lg
        return [g, q & 1, (q >> 2) & 3, (q >> 1) & 1]

    vm = ([[vm_copy(2 << k) >> 1] for k in range(5 + lg)], [vm_read(1 << k) for k in range(4 + lg)])
    return kw, km, vw, vm


@gluon.constexpr_function
def _hs_layout(kg, ng, which, read):
    """One of :func:`_hs_layouts`' shared layouts (``which``: 0 key words, 1 key meta, 2 value words, 3 value
    meta)."""
    flat, rd = _hs_layouts(kg, ng)[which]
    return gl.SharedLinearLayout(rd if read else flat)


HS1: gl.constexpr = gl.constexpr(gl.BlockedLayout([4], [32], [1], [0]))  # flat copies
HS2: gl.constexpr = gl.constexpr(gl.BlockedLayout([1, 4], [2, 16], [1, 1], [1, 0]))  # [2, 64] key meta copies


@gluon.jit
def _hs_issue(hk, hks, hkz, hv, hvs, hvz, st, T, vrow, k_data, k_scale2, k_zero2, v_data, v_scale2, v_zero2, k_nrows,
              v_nrows, KG: gl.constexpr, NG: gl.constexpr):
    """cp.async the half tile at token ``T`` (value row ``vrow``) into stage ``st``: its 512 key words (KG = 128:
    words ``4 w ..`` of each channel), the scale / zero pairs of the blocks of its tokens ``T``, ``T + 32``, its 64
    value rows' words and scale / zero words (``32 NG`` each); what lies outside the part reads 0."""
    o = gl.arange(0, 512, layout=HS1)
    blk = T // KG
    if KG == 128:
        kg_ = blk.to(gl.int64) * 1024 + ((T % 128) // 16) + 8 * (o // 4) + o % 4
    else:
        kg_ = (T // 16).to(gl.int64) * 128 + o
    _CP_ASYNC(hk.index(st), k_data + kg_, mask=(blk + 0 * o) * KG < k_nrows)
    b = gl.arange(0, 2, layout=gl.SliceLayout(1, HS2))
    pp = gl.arange(0, 64, layout=gl.SliceLayout(0, HS2))
    mb = (T + 32 * b) // KG
    moff = gl.expand_dims(mb.to(gl.int64) * 64, 1) + gl.expand_dims(pp, 0)
    mmask = gl.expand_dims(mb * KG < k_nrows, 1) & gl.expand_dims(pp < 64, 0)
    _CP_ASYNC(hks.index(st), k_scale2 + moff, mask=mmask)
    _CP_ASYNC(hkz.index(st), k_zero2 + moff, mask=mmask)
    vr = vrow + o // 8
    _CP_ASYNC(hv.index(st), v_data + (vrow.to(gl.int64) * 8 + o), mask=(vr >= 0) & (vr < v_nrows))
    ow = gl.arange(0, 32 * NG, layout=HS1)
    mr = vrow + (2 * ow) // NG
    mw = (mr >= 0) & (mr < v_nrows)
    _CP_ASYNC(hvs.index(st), v_scale2 + ((vrow.to(gl.int64) * NG) // 2 + ow), mask=mw)
    _CP_ASYNC(hvz.index(st), v_zero2 + ((vrow.to(gl.int64) * NG) // 2 + ow), mask=mw)


_F4 = [[0, 1, 0, 0], [0, 2, 0, 0], [0, 4, 0, 0], [0, 8, 0, 0]]
# a half tile's key words [4 u, 16 f, 4 a, 2 e] as read: lane 4 r + a holds word u = r // 2 (lane bit 2 broadcast)
KWC: gl.constexpr = gl.constexpr(gl.DistributedLinearLayout(
    reg_bases=[[0, 0, 0, 1]] + _F4, lane_bases=[[0, 0, 1, 0], [0, 0, 2, 0], [0, 0, 0, 0], [1, 0, 0, 0], [2, 0, 0, 0]],
    warp_bases=[], block_bases=[], shape=[4, 16, 4, 2]))
# ... broadcast to the lane rows [2 r2, 2 r1, 2 r0, 16 f, 4 a, 2 e] (then K4)
KW6: gl.constexpr = gl.constexpr(gl.DistributedLinearLayout(
    reg_bases=[[0, 0, 0, 0, 0, 1], [0, 0, 0, 1, 0, 0], [0, 0, 0, 2, 0, 0], [0, 0, 0, 4, 0, 0], [0, 0, 0, 8, 0, 0]],
    lane_bases=[[0, 0, 0, 0, 1, 0], [0, 0, 0, 0, 2, 0], [0, 0, 1, 0, 0, 0], [0, 1, 0, 0, 0, 0], [1, 0, 0, 0, 0, 0]],
    warp_bases=[], block_bases=[], shape=[2, 2, 2, 16, 4, 2]))
# a half tile's key scales (zeros) [2 b, 16 f, 4 a] as read: lane 4 r + a holds those of lane rows 4 b .. (b = r // 4)
KMC: gl.constexpr = gl.constexpr(gl.DistributedLinearLayout(
    reg_bases=[[0, 1, 0], [0, 2, 0], [0, 4, 0], [0, 8, 0]],
    lane_bases=[[0, 0, 1], [0, 0, 2], [0, 0, 0], [0, 0, 0], [1, 0, 0]],
    warp_bases=[], block_bases=[], shape=[2, 16, 4]))
# B operand pieces [2 n2, 2 n1, 2 n0, 16 f, 4 a, 2 e]: column n = 4 n2 + 2 n1 + n0 (lane 4 n + a), channel
# k = 8 f + 2 a + e (registers e, f), i.e. the B operand [128, 8] permuted; as [8, 16, 4] (without e) also K3
B6: gl.constexpr = gl.constexpr(gl.DistributedLinearLayout(
    reg_bases=[[0, 0, 0, 0, 0, 1], [0, 0, 0, 1, 0, 0], [0, 0, 0, 2, 0, 0], [0, 0, 0, 4, 0, 0], [0, 0, 0, 8, 0, 0]],
    lane_bases=[[0, 0, 0, 0, 1, 0], [0, 0, 0, 0, 2, 0], [0, 0, 1, 0, 0, 0], [0, 1, 0, 0, 0, 0], [1, 0, 0, 0, 0, 0]],
    warp_bases=[], block_bases=[], shape=[2, 2, 2, 16, 4, 2]))
B5: gl.constexpr = gl.constexpr(gl.SliceLayout(5, B6))


@gluon.jit
def _craw_words(kw_st):
    """A half tile's merged key words ``[8 r, 16 f, 4 a]`` (K3) from its view ``kw_st`` (:func:`_hs_layouts`): lane
    row r's half ``r % 2`` of the half's word ``r // 2`` of each channel pair (prmt of the two channels' words)."""
    x = gl.reshape(kw_st.load(KWC), [2, 2, 16, 4, 2])
    x = gl.expand_dims(gl.convert_layout(x, gl.SliceLayout(2, KW6), assert_trivial=True), 2)
    x = x + gl.full([2, 2, 2, 16, 4, 2], 0, gl.int32, layout=KW6)
    wd = gl.convert_layout(gl.reshape(x, [8, 16, 4, 2]), K4, assert_trivial=True)
    r, f, a, e = _idx4(K4, 8, 16, 4, 2)
    return _merge_sel(wd, gl.where(r % 2 == 0, 0x5410, 0x7632), K3)


@gluon.jit
def _craw_meta(st):
    """A half tile's key scales (zeros) for lane rows 0-3 and 4-7 from its view ``st`` (:func:`_hs_layouts`),
    broadcast to ``[2 n2, 2 n1, 2 n0, 16 f, 4 a]`` (:data:`B5`; lane row / column ``4 n2 + 2 n1 + n0``)."""
    S4: gl.constexpr = gl.SliceLayout(2, B5)
    x = gl.expand_dims(gl.convert_layout(st.load(KMC), gl.SliceLayout(1, S4), assert_trivial=True), 1)
    x = gl.expand_dims(x + gl.full([2, 2, 16, 4], 0, gl.int32, layout=S4), 2)
    return x + gl.full([2, 2, 2, 16, 4], 0, gl.int32, layout=B5)


@gluon.jit
def _craw_prep(qb, ks_st, kz_st, zs):
    """A half tile's B operand ``q s_b`` (columns ``n < 4``: the block of lane rows 0-3, ``n >= 4``: of 4-7; rounded
    once from ``qb``) and zeros' term ``[16, 8]`` (-inf in the columns of the other lane-row half's block)."""
    x6 = gl.expand_dims(_craw_meta(ks_st), 5) + gl.full([2, 2, 2, 16, 4, 2], 0, gl.int32, layout=B6)
    y = gl.inline_asm_elementwise(HALVES, "=r,r,r", [x6], dtype=gl.float16, is_pure=True, pack=2)
    kq = qb * gl.convert_layout(gl.reshape(gl.permute(y, (3, 4, 5, 0, 1, 2)), [128, 8]), B_L, assert_trivial=True)
    zr = gl.convert_layout(gl.reshape(_craw_meta(kz_st), [8, 16, 4]), K3, assert_trivial=True)
    x = gl.expand_dims(gl.expand_dims(gl.convert_layout(zr, gl.SliceLayout(3, K4), assert_trivial=True), 3), 0)
    z5 = gl.inline_asm_elementwise(HALVES, "=r,r,r", [x + gl.full([2, 8, 16, 4, 2], 0, gl.int32, layout=K5)],
                                   dtype=gl.float16, is_pure=True, pack=2)
    zt = mma_v2(gl.convert_layout(gl.reshape(z5, [16, 128]), A_L, assert_trivial=True), qb, zs)
    rows = gl.arange(0, 16, layout=ROW_L)
    cols = gl.arange(0, 8, layout=COL_L)
    ok = gl.expand_dims((rows % 8) // 4, 1) == gl.expand_dims(cols // 4, 0)
    return kq, gl.where(ok, zt, float("-inf"))


@gluon.jit
def _craw_scores(lo, kq, kzt, zs, i: gl.constexpr):
    """Scores ``[16, 8]`` of chunk ``i`` of a half tile from its merged 2-bit words ``lo`` (codes ``2 i + h`` of
    each half: in place for ``j < 5``, after a shift by 10 above; ``code x 2^(pos - 24)``), times ``2^(24 - pos)``,
    plus the zeros' term (:func:`_craw_prep`)."""
    NIN: gl.constexpr = 5  # raw_in_place(2)
    zero5 = gl.full([2, 8, 16, 4, 2], 0, gl.int32, layout=K5)
    w3 = gl.convert_layout(lo, gl.SliceLayout(3, K4), assert_trivial=True)
    hh = gl.arange(0, 2, layout=gl.SliceLayout(1, gl.SliceLayout(2, gl.SliceLayout(3, gl.SliceLayout(4, K5)))))
    jj = gl.expand_dims(gl.expand_dims(gl.expand_dims(gl.expand_dims(2 * i + hh, 1), 2), 3), 4) + zero5
    if 2 * i + 1 < NIN:
        x = gl.expand_dims(gl.expand_dims(w3, 3), 0) + zero5
    elif 2 * i >= NIN:
        x = gl.expand_dims(gl.expand_dims(w3 >> (2 * NIN), 3), 0) + zero5
    else:
        x = gl.where(jj < NIN, gl.expand_dims(gl.expand_dims(w3, 3), 0) + zero5,
                     gl.expand_dims(gl.expand_dims(w3 >> (2 * NIN), 3), 0) + zero5)
    pos = gl.where(jj < NIN, 2 * jj, 2 * (jj - NIN))
    mk = 3 << pos
    y = gl.inline_asm_elementwise(RAW_AND, "=r,r,r,r,r", [x, mk | (mk << 16)], dtype=gl.float16, is_pure=True,
                                  pack=2)
    ka = gl.convert_layout(gl.reshape(y, [16, 128]), A_L, assert_trivial=True)
    rows = gl.arange(0, 16, layout=ROW_L)
    jr = 2 * i + rows // 8
    fr = _pow2(24 - gl.where(jr < NIN, 2 * jr, 2 * (jr - NIN)))
    return mma_v2(ka, kq, zs) * gl.expand_dims(fr, 1) + kzt


@gluon.jit
def _bfly2(x):
    """Each register's value in lane ``lane ^ 2`` (float32): the accumulator layouts' column ``c ^ 4``."""
    return gl.inline_asm_elementwise(BFLY2, "=r,r", [x], dtype=gl.float32, is_pure=True, pack=1)


@gluon.constexpr_function
def _tok_key_layout(kper):
    """TokenQuant key chunk ``[2 h, 8 r, NW w, HALF j, 4 a, 2 e]`` (``NW = 32 / kper`` words per lane and token,
    ``HALF = kper / 2``): reshaped to ``[2, 8, 16, 4, 2]`` it is :data:`K5` with ``f = HALF w + j``. Lane ``a`` holds
    channels ``32 a + kper w + j + HALF e`` (:func:`tok_key_channel`): its own words of the token, and in each word
    the codes ``j`` and ``j + HALF``, which sit 16 bits apart (one rotation serves the pair)."""
    half = kper // 2
    lh = half.bit_length() - 1
    regs = [[0, 0, 0, 0, 0, 1], [1, 0, 0, 0, 0, 0]]
    regs += [[0, 0, 0, 1 << b, 0, 0] if b < lh else [0, 0, 1 << (b - lh), 0, 0, 0] for b in range(4)]
    lanes = [[0, 0, 0, 0, 1, 0], [0, 0, 0, 0, 2, 0], [0, 1, 0, 0, 0, 0], [0, 2, 0, 0, 0, 0], [0, 4, 0, 0, 0, 0]]
    return gl.DistributedLinearLayout(reg_bases=regs, lane_bases=lanes, warp_bases=[], block_bases=[],
                                      shape=[2, 8, 32 // kper, half, 4, 2])


@gluon.constexpr_function
def _tok_word_layout(kper):
    """A lane's words of its two tokens ``[2 h, 8 r, NW w, 4 a]``, words first (one vector load per token)."""
    nw = 32 // kper
    regs = [[0, 0, 1 << b, 0] for b in range(nw.bit_length() - 1)] + [[1, 0, 0, 0]]
    lanes = [[0, 0, 0, 1], [0, 0, 0, 2], [0, 1, 0, 0], [0, 2, 0, 0], [0, 4, 0, 0]]
    return gl.DistributedLinearLayout(reg_bases=regs, lane_bases=lanes, warp_bases=[], block_bases=[],
                                      shape=[2, 8, nw, 4])


# a lane's scale (zero) of its two tokens [2 h, 8 r, 4 a]
TSC: gl.constexpr = gl.constexpr(gl.DistributedLinearLayout(
    reg_bases=[[1, 0, 0]], lane_bases=[[0, 0, 1], [0, 0, 2], [0, 1, 0], [0, 2, 0], [0, 4, 0]],
    warp_bases=[], block_bases=[], shape=[2, 8, 4]))


def tok_key_channel(k: int, bits: int) -> int:
    """Physical channel of the MMA's reduction index ``k = 8 f + 2 a + e`` for TokenQuant keys (the queries are
    loaded in this order; :func:`_tok_key_layout`)."""
    if bits == 3:
        return tok3_key_channel(k)
    kper = 32 // bits
    half = kper // 2
    f, a, e = k // 8, (k // 2) % 4, k % 2
    return 32 * a + kper * (f // half) + f % half + half * e


@gluon.jit
def _tok_channel(k, BITS: gl.constexpr):
    """:func:`tok_key_channel` in the kernel."""
    f = k // 8
    if BITS == 3:
        a = (k // 2) % 4
        e = k % 2
        ch = gl.where(f < 15, 30 * a + 10 * (f // 5) + f % 5 + 5 * e, 120 + a + 4 * e)
    else:
        KPER: gl.constexpr = 32 // BITS
        HALF: gl.constexpr = KPER // 2
        ch = 32 * ((k // 2) % 4) + KPER * (f // HALF) + f % HALF + HALF * (k % 2)
    return ch


# ---- 3-bit parts (QAQ's 3-bit tokens, MiKV's default): 10 codes per word at bits 3j, 13 words per row of 128 -------
# Keys (one scale per token): lane a holds words 3a, 3a+1, 3a+2 of each token (30 channels) and codes a, a+4 of word
# 12. Each word is spread once (codes 0-4 stay at bits 0-14, codes 5-9 move up one bit to 16-30), so pair
# (j, j + 5) sits 16 bits apart like a 2- or 4-bit pair (one rotation); word 12 is shifted by 3a and its code a + 4
# moved to bit 16. Values (pairs are two tokens of one channel; output row 8t + r is channel v3_channel(t, r)): lane
# row r holds word r (10 channels), half of word 8 + r // 2 (5 channels) and code r of word 12; the two tokens' words
# are merged by prmt into low halves (codes 0-4), bytes 1-2 (code 5, which crosses the halves) and high halves
# (codes 6-9), the extra channels first into one word per token (5 codes at bits 0-14, word 12's at bit 16).
def tok3_key_channel(k: int) -> int:
    """Physical channel of the reduction index ``k = 8 f + 2 a + e`` of 3-bit TokenQuant keys: codes ``j`` (e = 0)
    and ``j + 5`` (e = 1) of word ``3 a + f // 5`` for ``f < 15``, codes ``a`` and ``a + 4`` of word 12 for
    ``f = 15``."""
    f, a, e = k // 8, (k // 2) % 4, k % 2
    return 30 * a + 10 * (f // 5) + f % 5 + 5 * e if f < 15 else 120 + a + 4 * e


def v3_channel(t: int, r: int) -> int:
    """Physical channel of output row ``8 t + r`` for 3-bit values: word ``r``'s code ``t`` (t < 10), code
    ``5 (r % 2) + t - 10`` of word ``8 + r // 2`` (t < 15), code ``r`` of word 12 (t = 15)."""
    if t < 10:
        return 10 * r + t
    if t < 15:
        return 80 + 10 * (r // 2) + 5 * (r % 2) + t - 10
    return 120 + r


def v3_source(t: int) -> tuple[str, int]:
    """Where the pair of row ``t`` of a lane's 3-bit value rows sits: the merged word (``lo``, ``mid``, ``hi`` of word
    r; ``nlo``, ``nhi`` of the per-token extra word) and the bit of its code within each half."""
    if t < 5:
        return "lo", 3 * t
    if t == 5:
        return "mid", 7
    if t < 10:
        return "hi", 3 * t - 16
    if t < 15:
        return "nlo", 3 * (t - 10)
    return "nhi", 0


def spread3(w: int) -> int:
    """A 3-bit key word with codes 5-9 moved up one bit (to 16-30): pairs ``(j, j + 5)`` 16 bits apart."""
    return (w & 0x7FFF) | ((w << 1) & 0x7FFF0000)


def extra3(w_half: int, w12: int, r: int) -> int:
    """A lane row's extra 3-bit value word of one token: codes ``5 (r % 2) ..`` of word ``8 + r // 2`` at bits 0-14,
    code ``r`` of word 12 at bit 16 (other bits are not read)."""
    return ((w_half >> (15 * (r % 2))) & 0xFFFF) | (((w12 >> (3 * r)) << 16) & 0xFFFFFFFF)


@gluon.jit
def _v3_bit(t):
    """:func:`v3_source`'s bit of the code in row ``t`` of a lane's 3-bit value rows, in the kernel."""
    return gl.where(t < 5, 3 * t, gl.where(t == 5, 7, gl.where(t < 10, 3 * t - 16, gl.where(t < 15, 3 * (t - 10), 0))))


@gluon.jit
def _v3_channel(oc):
    """:func:`v3_channel` of accumulator rows ``oc`` in the kernel."""
    t = oc // 8
    r = oc % 8
    return gl.where(t < 10, 10 * r + t, gl.where(t < 15, 80 + 10 * (r // 2) + 5 * (r % 2) + t - 10, 120 + r))


@gluon.jit
def _merge_mid(w, L3: gl.constexpr):
    """Words ``[.., 2]`` -> bytes 1-2 of each (:data:`MERGE_MID`) ``[..]``."""
    m = gl.inline_asm_elementwise(MERGE_MID, "=r,=r,r,r", [w], dtype=gl.int32, is_pure=True, pack=2)
    lo, _ = gl.split(m)
    return gl.convert_layout(lo, L3, assert_trivial=True)


# a lane's 3-bit key words of its two tokens [2 h, 8 r, 4 a, 4 w]: words 3a, 3a+1, 3a+2 and 12 (w in registers, the
# lowest register bits, so two splits give the four words)
KW3: gl.constexpr = gl.constexpr(gl.DistributedLinearLayout(
    reg_bases=[[0, 0, 0, 1], [0, 0, 0, 2], [1, 0, 0, 0]], lane_bases=[[0, 0, 1, 0], [0, 0, 2, 0], [0, 1, 0, 0],
                                                                      [0, 2, 0, 0], [0, 4, 0, 0]],
    warp_bases=[], block_bases=[], shape=[2, 8, 4, 4]))


@gluon.jit
def _k5_of(x):
    """``[2 h, 8 r, 4 a]`` (:data:`TSC`) broadcast to :data:`K5` ``[2, 8, 16, 4, 2]``."""
    y = gl.convert_layout(x, gl.SliceLayout(2, gl.SliceLayout(4, K5)), assert_trivial=True)
    y = gl.expand_dims(gl.expand_dims(y, 2), 4)
    return gl.broadcast(y, gl.full([2, 8, 16, 4, 2], 0, gl.int32, layout=K5))[0]


@gluon.jit
def _spread3(w):
    """:func:`spread3` in the kernel."""
    return (w & 0x7FFF) | ((w << 1) & 0x7FFF0000)


@gluon.jit
def _tok3_words(wd):
    """A lane's 3-bit key words of a chunk (``[2 h, 8 r, 4 a, 4 w]``, :data:`KW3`) as the pairs see them: words 3a,
    3a + 1, 3a + 2 spread (codes j and j + 5 16 bits apart) and word 12's codes a and a + 4 at bits 0 and 16, each
    ``[2 h, 8 r, 4 a]`` (:data:`TSC`)."""
    e0, e1 = gl.split(gl.reshape(wd, [2, 8, 4, 2, 2]))  # words (0, 2), (1, 3)
    w0, w2 = gl.split(e0)
    w1, w3 = gl.split(e1)
    _, _, aa = _idx3(TSC, 2, 8, 4)
    w3 = gl.convert_layout(w3, TSC, assert_trivial=True) >> (3 * aa)
    x3 = (w3 & 0xFFFF) | ((w3 << 4) & -65536)  # code a at bit 0, code a + 4 at bit 16
    return _spread3(w0), _spread3(w1), _spread3(w2), x3


@gluon.jit
def _tok3_kchunk(wd, sc, zr, BF16: gl.constexpr):
    """fp16 (bf16) 3-bit TokenQuant key chunk ``[16 tokens, 128 channels]`` (A operand, channels in the order of
    :func:`tok3_key_channel`) from the words ``[2 h, 8 r, 4 a, 4 w]`` (:data:`KW3`) and scales / zeros of
    :func:`_tok_key_load`."""
    s0, s1, s2, x3 = _tok3_words(wd)
    x0 = _k5_of(s0)
    x1 = _k5_of(s1)
    x2 = _k5_of(s2)
    ff = gl.arange(0, 16, layout=gl.SliceLayout(0, gl.SliceLayout(1, gl.SliceLayout(3, gl.SliceLayout(4, K5)))))
    ff = gl.expand_dims(gl.expand_dims(gl.expand_dims(gl.expand_dims(ff, 0), 1), 3), 4) + gl.full(
        [2, 8, 16, 4, 2], 0, gl.int32, layout=K5)
    x = gl.where(ff < 5, x0, gl.where(ff < 10, x1, gl.where(ff < 15, x2, _k5_of(x3))))
    MANT: gl.constexpr = 7 if BF16 else 10
    sh = (MANT - 3 - gl.where(ff < 15, 3 * (ff % 5), 0) + 32) % 32
    sp = sc * V_FS3
    if BF16:  # the magic is subtracted in _deq (exact), so the bias is the zero itself
        bz = zr
    else:
        bz = zr - sp * V_FB3
    SL: gl.constexpr = gl.SliceLayout(2, gl.SliceLayout(4, K5))
    sp = gl.expand_dims(gl.expand_dims(gl.convert_layout(sp, SL, assert_trivial=True), 2), 4)
    bz = gl.expand_dims(gl.expand_dims(gl.convert_layout(bz, SL, assert_trivial=True), 2), 4)
    y = _deq(x, sh, gl.broadcast(sp, x)[0], gl.broadcast(bz, x)[0], 3, False, BF16)
    return gl.convert_layout(gl.reshape(y, [16, 128]), A_L, assert_trivial=True)


@gluon.jit
def _vrows():
    """Each element's row ``t`` of a value chunk (``8 t + r`` is its accumulator row), :data:`V5` int32."""
    tt = gl.arange(0, 16, layout=gl.SliceLayout(1, gl.SliceLayout(2, gl.SliceLayout(3, gl.SliceLayout(4, V5)))))
    return gl.expand_dims(gl.expand_dims(gl.expand_dims(gl.expand_dims(tt, 1), 2), 3), 4) + gl.full(
        [16, 8, 2, 4, 2], 0, gl.int32, layout=V5)


@gluon.jit
def _vdeq(x, sh, sc, zr, BITS: gl.constexpr, FS: gl.constexpr, FB: gl.constexpr, BF16: gl.constexpr):
    """A value chunk's A operand from merged words ``x`` and rotations ``sh`` (:data:`V5`) and the per-token scales
    and zeros (:data:`V4`): prepared scale ``s FS`` and bias ``z - FB s FS`` (bf16: the zero, :func:`_deq`)."""
    sp = sc * FS
    s5 = gl.broadcast(gl.expand_dims(sp, 0), x)[0]
    if BF16:
        z5 = gl.broadcast(gl.expand_dims(zr, 0), x)[0]
    else:
        z5 = gl.broadcast(gl.expand_dims(zr - sp * FB, 0), x)[0]
    y = _deq(x, sh, s5, z5, BITS, False, BF16)
    return gl.convert_layout(gl.reshape(y, [128, 16]), A_L, assert_trivial=True)


@gluon.jit
def _vchunk01(vptr, sptr, zptr, vrow0, v_nrows, vrow_off, i: gl.constexpr, BITS: gl.constexpr, VG: gl.constexpr,
              MASKED: gl.constexpr, BF16: gl.constexpr):
    """fp16 (bf16) value chunk ``V^T [128 channels, 16 tokens]`` of chunk ``i`` for 0-bit values in groups smaller
    than a row (every channel of a group is its zero: the pairs are the zeros themselves; with one zero per row
    :func:`_half` skips the value tiles altogether) or 1-bit values (lane row ``r`` holds channels ``16 r ..``: half
    ``r % 2`` of word ``r // 2``, merged by ``prmt`` with a per-lane selector; code ``t`` at bit ``t`` of each
    half)."""
    if MASKED:
        row = vrow0 + vrow_off + 2 * i
        rm = (row >= 0) & (row < v_nrows)
        zr = gl.load(zptr + 2 * i * (128 // VG), mask=rm, other=0.0)
        if BITS == 1:
            sc = gl.load(sptr + 2 * i * (128 // VG), mask=rm, other=0.0)
            w0 = gl.load(vptr + 2 * i * 4, mask=rm, other=0)
    else:
        zr = gl.load(zptr + 2 * i * (128 // VG))
        if BITS == 1:
            sc = gl.load(sptr + 2 * i * (128 // VG))
            w0 = gl.load(vptr + 2 * i * 4)
    zero5 = gl.full([16, 8, 2, 4, 2], 0, gl.int32, layout=V5)
    if BITS == 0:
        y = gl.broadcast(gl.expand_dims(zr, 0), zero5)[0]
        a = gl.convert_layout(gl.reshape(y, [128, 16]), A_L, assert_trivial=True)
    else:
        vr, _, _, _ = _idx4(V4, 8, 2, 4, 2)
        x = _merge_sel(w0, gl.where(vr % 2 == 0, 0x5410, 0x7632), V3)
        x = gl.expand_dims(gl.expand_dims(gl.convert_layout(x, gl.SliceLayout(3, V4), assert_trivial=True), 3), 0)
        x = x + zero5
        a = _vdeq(x, _rot(_vrows(), 1, BF16), sc, zr, 1, V_FS1, V_FB1, BF16)
    return a


@gluon.jit
def _vchunk3(vptr, sptr, zptr, vrow0, v_nrows, vrow_off, i: gl.constexpr, MASKED: gl.constexpr, BF16: gl.constexpr,
             RAW: gl.constexpr = False):
    """fp16 (bf16) 3-bit value chunk ``V^T [128 channels, 16 tokens]`` of chunk ``i`` (output rows in the order of
    :func:`v3_channel`); ``vptr``: each element's pointer to word ``r`` of its token at the tile's row 0. ``RAW``:
    the codes masked out as fp16 subnormals ``code x 2^(pos - 24)`` (codes above bit 7 of their half after one shift
    of the merged word by 8; :func:`raw_vpos`), no scales or zeros read."""
    vr, _, _, _ = _idx4(V4, 8, 2, 4, 2)
    p0 = vptr + 2 * i * 13
    p1 = p0 + (8 + vr // 2 - vr)
    p2 = p0 + (12 - vr)
    if RAW:
        if MASKED:
            rm = ((vrow0 + vrow_off + 2 * i) >= 0) & ((vrow0 + vrow_off + 2 * i) < v_nrows)
            w0 = gl.load(p0, mask=rm, other=0)
            w1 = gl.load(p1, mask=rm, other=0)
            w2 = gl.load(p2, mask=rm, other=0)
        else:
            w0 = gl.load(p0)
            w1 = gl.load(p1)
            w2 = gl.load(p2)
        sc = 0
        zr = 0
    elif MASKED:
        row = vrow0 + vrow_off + 2 * i
        rm = (row >= 0) & (row < v_nrows)
        sc = gl.load(sptr + 2 * i, mask=rm, other=0.0)
        zr = gl.load(zptr + 2 * i, mask=rm, other=0.0)
        w0 = gl.load(p0, mask=rm, other=0)
        w1 = gl.load(p1, mask=rm, other=0)
        w2 = gl.load(p2, mask=rm, other=0)
    else:
        sc = gl.load(sptr + 2 * i)
        zr = gl.load(zptr + 2 * i)
        w0 = gl.load(p0)
        w1 = gl.load(p1)
        w2 = gl.load(p2)
    wn = ((w1 >> (15 * (vr % 2))) & 0xFFFF) | ((w2 >> (3 * vr)) << 16)  # extra3
    zero5 = gl.full([16, 8, 2, 4, 2], 0, gl.int32, layout=V5)
    S4: gl.constexpr = gl.SliceLayout(3, V4)
    lo0, hi0 = _merge(w0, V3)
    mid0 = _merge_mid(w0, V3)
    lon, hin = _merge(wn, V3)
    lo0 = gl.expand_dims(gl.expand_dims(gl.convert_layout(lo0, S4, assert_trivial=True), 3), 0) + zero5
    hi0 = gl.expand_dims(gl.expand_dims(gl.convert_layout(hi0, S4, assert_trivial=True), 3), 0) + zero5
    mid0 = gl.expand_dims(gl.expand_dims(gl.convert_layout(mid0, S4, assert_trivial=True), 3), 0) + zero5
    lon = gl.expand_dims(gl.expand_dims(gl.convert_layout(lon, S4, assert_trivial=True), 3), 0) + zero5
    hin = gl.expand_dims(gl.expand_dims(gl.convert_layout(hin, S4, assert_trivial=True), 3), 0) + zero5
    tt = _vrows()
    x = gl.where(tt < 5, lo0, gl.where(tt == 5, mid0, gl.where(tt < 10, hi0, gl.where(tt < 15, lon, hin))))
    pos = _v3_bit(tt)
    if RAW:
        x = gl.where(pos > 7, x >> 8, x)
        pos = gl.where(pos > 7, pos - 8, pos)
        mk = 7 << pos
        y = gl.inline_asm_elementwise(RAW_AND, "=r,r,r,r,r", [x, mk | (mk << 16)], dtype=gl.float16, is_pure=True,
                                      pack=2)
        a = gl.convert_layout(gl.reshape(y, [128, 16]), A_L, assert_trivial=True)
    else:
        MANT: gl.constexpr = 7 if BF16 else 10
        a = _vdeq(x, (MANT - 3 - pos + 32) % 32, sc, zr, 3, V_FS3, V_FB3, BF16)
    return a


@gluon.jit
def _tok_key_load(k_data, k_scale, k_zero, T, k_nrows, kw_tok, kw_off, ks_tok, ks_off, KPER: gl.constexpr,
                  K_GROUP: gl.constexpr, MASKED: gl.constexpr):
    """A chunk's TokenQuant key words ``[2 h, 8 r, NW w, 4 a]`` (each lane its ``NW`` words of tokens ``T + 8 r + h``;
    3 bits: ``[2 h, 8 r, 4 a, 4 w]``, :data:`KW3`, the layout of the offsets passed in) and their scales and zeros
    ``[2 h, 8 r, 4 a]`` (the lane's group)."""
    # the words' loads as _tok_key_words's, written out: calling it put the address arithmetic in another order,
    # and ptxas scheduled the TokenQuant (G < 128) kernels differently (their SASS changed)
    WPR: gl.constexpr = (128 + KPER - 1) // KPER  # words per row (13 at 3 bits)
    tw = T + kw_tok
    ts = T + ks_tok
    wp = k_data + (tw * WPR + kw_off)
    sp = ts * (128 // K_GROUP) + ks_off
    if MASKED:
        wd = gl.load(wp, mask=tw < k_nrows, other=0)
        sc = gl.load(k_scale + sp, mask=ts < k_nrows, other=0.0)
        zr = gl.load(k_zero + sp, mask=ts < k_nrows, other=0.0)
    else:
        wd = gl.load(wp)
        sc = gl.load(k_scale + sp)
        zr = gl.load(k_zero + sp)
    return wd, sc, zr


@gluon.jit
def _tok_key_words(k_data, T, k_nrows, kw_tok, kw_off, KPER: gl.constexpr, MASKED: gl.constexpr):
    """A chunk's TokenQuant key words alone (:func:`_tok_key_load`'s), for the raw key path."""
    WPR: gl.constexpr = (128 + KPER - 1) // KPER  # words per row (13 at 3 bits)
    tw = T + kw_tok
    wp = k_data + (tw * WPR + kw_off)
    if MASKED:
        wd = gl.load(wp, mask=tw < k_nrows, other=0)
    else:
        wd = gl.load(wp)
    return wd


@gluon.jit
def _tok_kchunk(wd, sc, zr, BITS: gl.constexpr, BF16: gl.constexpr):
    """fp16 (bf16) TokenQuant key chunk ``[16 tokens, 128 channels]`` (A operand, channels in the order of
    :func:`tok_key_channel`) from :func:`_tok_key_load`: each pair is two codes of one word, 16 bits apart."""
    KPER: gl.constexpr = 32 // BITS
    HALF: gl.constexpr = KPER // 2
    NW: gl.constexpr = 32 // KPER
    K6: gl.constexpr = _tok_key_layout(KPER)
    S5: gl.constexpr = gl.SliceLayout(5, K6)
    zero6 = gl.full([2, 8, NW, HALF, 4, 2], 0, gl.int32, layout=K6)
    x = gl.expand_dims(gl.expand_dims(gl.convert_layout(wd, gl.SliceLayout(3, S5), assert_trivial=True), 3), 5)
    x = x + zero6
    jj = gl.arange(0, HALF, layout=gl.SliceLayout(0, gl.SliceLayout(1, gl.SliceLayout(2, gl.SliceLayout(4, S5)))))
    sh = _rot(jj, BITS, BF16)
    sh = gl.expand_dims(gl.expand_dims(gl.expand_dims(gl.expand_dims(gl.expand_dims(sh, 0), 1), 2), 4), 5) + zero6
    # prepared scale and bias of dequant_constants, as _vchunk's (written twice: a shared helper left the PTX
    # instructions as they were but changed ptxas's schedule of the bf16 4-bit KIVI kernel, 161 -> 154 registers)
    sp = sc * (V_FS2 if BITS == 2 else V_FS4)
    if BF16:  # the magic is subtracted in _deq (exact), so the bias is the zero itself
        bz = zr
    else:
        bz = zr - sp * (V_FB2 if BITS == 2 else V_FB4)
    SL: gl.constexpr = gl.SliceLayout(2, gl.SliceLayout(3, S5))
    sp = gl.expand_dims(gl.expand_dims(gl.expand_dims(gl.convert_layout(sp, SL, assert_trivial=True), 2), 3), 5)
    bz = gl.expand_dims(gl.expand_dims(gl.expand_dims(gl.convert_layout(bz, SL, assert_trivial=True), 2), 3), 5)
    y = _deq(x, sh, gl.broadcast(sp, x)[0], gl.broadcast(bz, x)[0], BITS, False, BF16)
    y = gl.convert_layout(gl.reshape(y, [2, 8, 16, 4, 2]), K5, assert_trivial=True)
    return gl.convert_layout(gl.reshape(y, [16, 128]), A_L, assert_trivial=True)


def raw_in_place(bits: int) -> int:
    """Codes of a 16-bit half that lie below its mantissa's top (bits 0-9) as they are: the raw key path masks
    these in place and shifts the word by ``bits * raw_in_place(bits)`` once for the others."""
    return (10 - bits) // bits + 1


def raw_pos(j: int, bits: int) -> int:
    """Bit position (in its half) of code ``j`` of a half as the raw key path reads it: ``code x 2^(pos - 24)``."""
    nin = raw_in_place(bits)
    return bits * (j if j < nin else j - nin)


def raw_qfac(j: int, bits: int) -> float:
    """The raw key path scales the (already ``sm_scale log2 e``-scaled) query of a channel whose code sits at
    ``raw_pos(j)`` by ``2^(RAW_EXP - pos)``, so that a score reads ``2^(RAW_EXP - 24) sum_c code_c q_c`` (times the
    row's scale, :func:`_rows_sz`). At most 4: with d = 128 the scaled query stays below ``4 x 0.128 |q|``, so no
    fp16 query overflows; at least ``2^-6`` (2 bits, position 8), so only scaled queries below ~``2^-8`` lose
    bits as subnormals."""
    return 2.0 ** (RAW_EXP.value - raw_pos(j, bits))


def raw_keys(bits: int, group: int, tok: bool, bf16: bool) -> bool:
    """Whether a pair's keys take the raw path: TokenQuant, one scale per row, 2 or 3 bits, fp16 (bf16 subnormals
    would underflow the products), unless switched off (``KV_GLUON_RAWK=0``). The kernel builds raw 4-bit keys too
    (:func:`_tok_kchunk_raw`), but ptxas spilled 16-100 bytes for them at the 168-register cap where the pairs spill
    none, and they ran 1-2% slower on the H100 (kernels/NOTES.md, session 12), so 4-bit keys keep the pairs."""
    return RAW_K and tok and group == 128 and bits in RAW_K_BITS and not bf16


def raw_values(bits: int, group: int, bf16: bool, slots: int) -> bool:
    """Whether a pair's values take the raw path: one scale per row, 2, 3 or 4 bits, fp16, unless switched off
    (``KV_GLUON_RAWV=0``; with value outliers, ``slots`` > 0: ``KV_GLUON_RAWVOUT=0``). The raw accumulator holds
    each channel in units of ``2^(pos - 24)`` of its code position, times ``2^E`` (:func:`value_exponent`), so a
    value outlier's delta tile, which adds ``delta p`` through one more product with ``P^T = p``, holds
    ``delta 2^(E + pos - 24)`` (:func:`outlier_slots`; ``E`` also keeps the largest below ``2^15``)."""
    return (RAW_V and group == 128 and (bits in (2, 4) or (bits == 3 and RAW_V3)) and not bf16
            and (slots == 0 or RAW_VOUT))


def raw_vpos(row, bits: int):
    """The code position ``pos`` of raw value accumulator rows ``row`` (``8 t + r``: code ``t % (32 / bits)`` of its
    word; 3 bits: :func:`v3_source`'s bit, less 8 above 7; :func:`_raw_vfac`'s ``2^(24 - pos)``); works on int
    tensors too."""
    if bits == 3:
        bit = sum((row // 8 == t) * v3_source(t)[1] for t in range(16))
        return bit - (bit > 7) * 8
    per = 32 // bits
    nin = raw_in_place(bits)
    jh = ((row // 8) % per) % (per // 2)
    return (jh < nin) * (bits * jh) + (jh >= nin) * (bits * (jh - nin))


def raw_channel_keys(bits: int, group: int, tok: bool, bf16: bool, m: int, v_bits: int, v_group: int) -> bool:
    """Whether a pair takes the raw ChannelQuant key path (:func:`_craw_scores`, with half tiles staged in shared
    memory: :func:`_hs_issue`): 2-bit ChannelQuant keys in blocks of 32, 64 or 128 tokens with 2-bit values in
    groups of 32 or 64 channels (KIVI 2-bit), fp16, at most 4 query rows per KV head (the MMA's other 4 columns carry
    the second stream), unless switched off (``KV_GLUON_RAWC=0``)."""
    return (RAW_C and staged(bits, tok) and group in (32, 64, 128) and not bf16 and m <= 4 and v_bits == 2
            and v_group in (32, 64))


def staged_rows(k_bits: int, k_group: int, tok: bool, v_bits: int, v_group: int, bf16: bool, k_slots: int,
                v_slots: int) -> bool:
    """Whether a pair's half tiles are staged in shared memory as rows (:func:`_ts_issue`): TokenQuant keys and values
    of 2 or 4 bits with one scale per row (QAQ's rows), fp16, raw values (:func:`raw_values`), no outliers (their
    buffers must be the kernel's only shared memory), unless switched off (``KV_GLUON_TSTAGE=0``). The launch also
    needs :func:`rows_stageable`."""
    return (TSTAGE and tok and k_group == 128 and k_bits in (2, 4) and v_group == 128 and v_bits in (2, 4)
            and k_slots == 0 and v_slots == 0 and raw_values(v_bits, v_group, bf16, v_slots))


def rows_stageable(plan) -> bool:
    """What staged rows need of a plan's tensors: the words 16-byte aligned (16-byte copies), the scales and zeros
    4-byte aligned (copied as words, a pair of rows each), and each head's first key and value rows of one parity
    (a stage starts at an even row: keys and values must both)."""
    k, v = plan.k, plan.v
    return (getattr(plan, "kv_parity", False) and k.data.data_ptr() % 16 == 0 and v.data.data_ptr() % 16 == 0
            and all(t.data_ptr() % 4 == 0 for t in (k.scale, k.zero, v.scale, v.zero)))


def value_exponent(spec) -> torch.Tensor | None:
    """The exponent ``E`` by which raw values scale the probabilities (``exp2(score - m + E)``; so ``l``, the zeros'
    term and ``P^T = p 2^E s`` with it, and the lse takes ``E`` off again): ``2^15 <= 2^E max(s) < 2^16`` over the
    part, so no ``P^T`` entry overflows (``p <= 1``) and only products below ``2^-29`` of the largest are fp16
    subnormals. Without it small value scales with peaked attention made most ``p s`` subnormals, with errors of
    ``2^-25 / (p s)`` each, above the pairs' (found in review). A float32 scalar on the part's device, which the kernel
    loads (:mod:`kernels.value_exponent`: no host sync, so a decode step that builds a part does not wait for the
    GPU), cached on the part (with the scale tensor and its version); None for parts that do not take the raw value
    path."""
    if not raw_values(spec.bits, spec.group, spec.scale.dtype == torch.bfloat16, _slots_of(spec, True)):
        return None
    return _raw_exponent(spec)


def _raw_exponent(spec) -> torch.Tensor:
    """:func:`value_exponent` of a part that takes the raw value path; with value outliers (``spec.odelta``) also
    ``2^(E - 16) max |delta| < 2^15`` (their slots hold ``delta 2^(E + pos - 24)``, ``pos <= 8``)."""
    part = getattr(spec, "part", None)
    delta = spec.odelta if getattr(spec, "has_out", False) and spec.odelta is not None else None
    cached = getattr(part, "_gluon_vexp", None)
    if (cached is not None and cached[0] is spec.scale and cached[1] == spec.scale._version
            and cached[2] is delta):
        return cached[3]
    e = value_exponent_of(spec.scale, delta)
    if e.is_cuda and torch.cuda.is_current_stream_capturing():  # a graph's E is computed at each replay: not cached,
        return e  # whose tensor holds nothing until the first replay
    try:
        object.__setattr__(part, "_gluon_vexp", (spec.scale, spec.scale._version, delta, e))
    except (AttributeError, TypeError):
        pass
    return e


@gluon.jit
def _pow2(e):
    """``2^e`` (float32, exact) of an int32 exponent tensor."""
    return ((e + 127) << 23).to(gl.float32, bitcast=True)


@gluon.jit
def _raw_qfac(k, BITS: gl.constexpr):
    """:func:`raw_qfac` of each reduction index ``k = 8 f + 2 a + e`` (code ``f % HALF`` of its word; 3 bits: word
    12's pair for ``f = 15``, at position 0)."""
    HALF: gl.constexpr = 16 // BITS
    NIN: gl.constexpr = (10 - BITS) // BITS + 1
    j = (k // 8) % HALF
    pos = gl.where(j < NIN, BITS * j, BITS * (j - NIN))
    return _pow2(RAW_EXP - pos)


@gluon.jit
def _tok_kchunk_raw(wd, BITS: gl.constexpr):
    """Raw TokenQuant key chunk ``[16 tokens, 128 channels]`` (A operand; :func:`raw_pos`): each pair is its two
    codes masked out of the word, in place or after one shift of the word, as fp16 subnormals (one ``and``)."""
    KPER: gl.constexpr = 32 // BITS
    HALF: gl.constexpr = KPER // 2
    NW: gl.constexpr = 32 // KPER
    NIN: gl.constexpr = (10 - BITS) // BITS + 1
    K6: gl.constexpr = _tok_key_layout(KPER)
    S5: gl.constexpr = gl.SliceLayout(5, K6)
    zero6 = gl.full([2, 8, NW, HALF, 4, 2], 0, gl.int32, layout=K6)
    w4 = gl.convert_layout(wd, gl.SliceLayout(3, S5), assert_trivial=True)
    x = gl.expand_dims(gl.expand_dims(w4, 3), 5) + zero6
    xs = gl.expand_dims(gl.expand_dims(w4 >> (BITS * NIN), 3), 5) + zero6  # sign bits land outside every mask
    jj = gl.arange(0, HALF, layout=gl.SliceLayout(0, gl.SliceLayout(1, gl.SliceLayout(2, gl.SliceLayout(4, S5)))))
    jj = gl.expand_dims(gl.expand_dims(gl.expand_dims(gl.expand_dims(gl.expand_dims(jj, 0), 1), 2), 4), 5) + zero6
    pos = gl.where(jj < NIN, BITS * jj, BITS * (jj - NIN))
    mk = ((1 << BITS) - 1) << pos
    y = gl.inline_asm_elementwise(RAW_AND, "=r,r,r,r,r", [gl.where(jj < NIN, x, xs), mk | (mk << 16)],
                                  dtype=gl.float16, is_pure=True, pack=2)
    y = gl.convert_layout(gl.reshape(y, [2, 8, 16, 4, 2]), K5, assert_trivial=True)
    return gl.convert_layout(gl.reshape(y, [16, 128]), A_L, assert_trivial=True)


@gluon.jit
def _tok3_kchunk_raw(wd):
    """Raw 3-bit TokenQuant key chunk (channels of :func:`tok3_key_channel`): the spread words' pairs ``(j, j + 5)``
    masked in place for ``j < 3`` and after a shift by 9 for ``j = 3, 4``; word 12's pair at bit 0 (as
    :func:`_tok3_kchunk` builds it)."""
    s0, s1, s2, x3 = _tok3_words(wd)
    ff = gl.arange(0, 16, layout=gl.SliceLayout(0, gl.SliceLayout(1, gl.SliceLayout(3, gl.SliceLayout(4, K5)))))
    ff = gl.expand_dims(gl.expand_dims(gl.expand_dims(gl.expand_dims(ff, 0), 1), 3), 4) + gl.full(
        [2, 8, 16, 4, 2], 0, gl.int32, layout=K5)
    jj = ff % 5
    near = jj < 3
    x = gl.where(ff < 5, gl.where(near, _k5_of(s0), _k5_of(s0 >> 9)),
                 gl.where(ff < 10, gl.where(near, _k5_of(s1), _k5_of(s1 >> 9)),
                          gl.where(ff < 15, gl.where(near, _k5_of(s2), _k5_of(s2 >> 9)), _k5_of(x3))))
    pos = gl.where(ff < 15, gl.where(near, 3 * jj, 3 * (jj - 3)), 0)
    mk = 7 << pos
    y = gl.inline_asm_elementwise(RAW_AND, "=r,r,r,r,r", [x, mk | (mk << 16)], dtype=gl.float16, is_pure=True,
                                  pack=2)
    return gl.convert_layout(gl.reshape(y, [16, 128]), A_L, assert_trivial=True)


@gluon.jit
def _rows_sz(scale, zero, row, nrows, SF: gl.constexpr, MASKED: gl.constexpr):
    """The scales (times ``SF``) and zeros of rows ``row`` (:data:`ROW_L`) of a part with one per row, float32
    ``[16, 1]`` each (0 outside the part)."""
    if MASKED:
        ok = (row >= 0) & (row < nrows)
        sc = gl.load(scale + row, mask=ok, other=0.0)
        z = gl.load(zero + row, mask=ok, other=0.0)
    else:
        sc = gl.load(scale + row)
        z = gl.load(zero + row)
    return gl.expand_dims(sc.to(gl.float32) * SF, 1), gl.expand_dims(z.to(gl.float32), 1)


@gluon.jit
def _v5_of(x):
    """A merged value word ``[8 r, 2 h, 4 a]`` (``SliceLayout(3, V4)``) broadcast to :data:`V5`."""
    return gl.expand_dims(gl.expand_dims(x, 3), 0) + gl.full([16, 8, 2, 4, 2], 0, gl.int32, layout=V5)


@gluon.jit
def _vchunk_raw(vptr, vrow0, v_nrows, vrow_off, i: gl.constexpr, BITS: gl.constexpr, VPER: gl.constexpr,
                MASKED: gl.constexpr):
    """Raw value chunk ``V^T [128 channels, 16 tokens]``: the two tokens' codes of each channel masked out of their
    merged words (in place, or after one shift of the merged word) as fp16 subnormals ``code x 2^(pos - 24)``;
    accumulator row ``8 t + r`` is then in units of ``2^(raw_pos(t) - 24)`` (:func:`_raw_vfac`)."""
    if BITS == 3:
        a = _vchunk3(vptr, 0, 0, vrow0, v_nrows, vrow_off, i, MASKED, False, True)
    else:
        w0, w1 = _vwords(vptr, vrow0, v_nrows, vrow_off, i, VPER, MASKED)
        a = _vraw(w0, w1, BITS, VPER)
    return a


@gluon.jit
def _vraw(w0, w1, BITS: gl.constexpr, VPER: gl.constexpr):
    """:func:`_vchunk_raw` of a chunk's words (:func:`_vwords`)."""
    NWV: gl.constexpr = 16 // VPER
    HALF: gl.constexpr = VPER // 2
    NIN: gl.constexpr = (10 - BITS) // BITS + 1
    tt = _vrows()
    j = tt % VPER
    jh = j % HALF
    near = jh < NIN
    S4: gl.constexpr = gl.SliceLayout(3, V4)
    lo0, hi0 = _merge(w0, V3)
    lo0 = gl.convert_layout(lo0, S4, assert_trivial=True)
    hi0 = gl.convert_layout(hi0, S4, assert_trivial=True)
    x = gl.where(j < HALF, gl.where(near, _v5_of(lo0), _v5_of(lo0 >> (BITS * NIN))),
                 gl.where(near, _v5_of(hi0), _v5_of(hi0 >> (BITS * NIN))))
    if NWV == 2:
        lo1, hi1 = _merge(w1, V3)
        lo1 = gl.convert_layout(lo1, S4, assert_trivial=True)
        hi1 = gl.convert_layout(hi1, S4, assert_trivial=True)
        x1 = gl.where(j < HALF, gl.where(near, _v5_of(lo1), _v5_of(lo1 >> (BITS * NIN))),
                      gl.where(near, _v5_of(hi1), _v5_of(hi1 >> (BITS * NIN))))
        x = gl.where(tt < VPER, x, x1)
    pos = gl.where(near, BITS * jh, BITS * (jh - NIN))
    mk = ((1 << BITS) - 1) << pos
    y = gl.inline_asm_elementwise(RAW_AND, "=r,r,r,r,r", [x, mk | (mk << 16)], dtype=gl.float16, is_pure=True,
                                  pack=2)
    return gl.convert_layout(gl.reshape(y, [128, 16]), A_L, assert_trivial=True)


@gluon.jit
def _raw_vfac(oc, BITS: gl.constexpr):
    """``2^(24 - pos)`` of accumulator rows ``oc`` (``8 t + r``: code ``t % VPER`` of its word; 3 bits: the position
    of :func:`v3_source`, less 8 above 7) of raw values (:func:`raw_vpos`)."""
    if BITS == 3:
        pos = _v3_bit(oc // 8)
        pos = gl.where(pos > 7, pos - 8, pos)
    else:
        VPER: gl.constexpr = 32 // BITS
        HALF: gl.constexpr = VPER // 2
        NIN: gl.constexpr = (10 - BITS) // BITS + 1
        jh = ((oc // 8) % VPER) % HALF
        pos = gl.where(jh < NIN, BITS * jh, BITS * (jh - NIN))
    return _pow2(24 - pos)


@gluon.jit
def _vwords(vptr, vrow0, v_nrows, vrow_off, i: gl.constexpr, VPER: gl.constexpr, MASKED: gl.constexpr):
    """A value chunk's words (:data:`V4`): each lane's word of its tokens, and at 4 bits (two words per lane and token,
    one 64-bit load) the second one (else ``w1`` is 0)."""
    NWV: gl.constexpr = 16 // VPER
    if NWV == 2:  # a token's two words per lane in one 64-bit load
        wi = gl.arange(0, 2, layout=gl.SliceLayout(0, gl.SliceLayout(1, gl.SliceLayout(2, gl.SliceLayout(3, VW5)))))
        wi = gl.expand_dims(gl.expand_dims(gl.expand_dims(gl.expand_dims(wi, 0), 1), 2), 3)
        vptr2 = gl.expand_dims(gl.convert_layout(vptr, gl.SliceLayout(4, VW5), assert_trivial=True), 4) + wi
    if MASKED:
        row = vrow0 + vrow_off + 2 * i
        rm = (row >= 0) & (row < v_nrows)
        if NWV == 2:
            rm2 = gl.expand_dims(gl.convert_layout(rm, gl.SliceLayout(4, VW5), assert_trivial=True), 4) & (wi < 2)
            w0, w1 = gl.split(gl.load(vptr2 + 2 * i * (128 // VPER), mask=rm2, other=0))
        else:
            w0 = gl.load(vptr + 2 * i * (128 // VPER), mask=rm, other=0)
            w1 = 0
    else:
        if NWV == 2:
            w0, w1 = gl.split(gl.load(vptr2 + 2 * i * (128 // VPER)))
        else:
            w0 = gl.load(vptr + 2 * i * (128 // VPER))
            w1 = 0
    if NWV == 2:
        w0 = gl.convert_layout(w0, V4, assert_trivial=True)
        w1 = gl.convert_layout(w1, V4, assert_trivial=True)
    return w0, w1


@gluon.jit
def _vchunk(vptr, sptr, zptr, vrow0, v_nrows, vrow_off, i: gl.constexpr, BITS: gl.constexpr, VPER: gl.constexpr,
            VG: gl.constexpr, MASKED: gl.constexpr, BF16: gl.constexpr):
    """fp16 (bf16) value chunk ``V^T [128 channels, 16 tokens]`` (A operand of ``O^T += V^T P^T``) of chunk ``i``.
    ``vptr`` / ``sptr`` / ``zptr``: each element's word / scale / zero pointer at the tile's row 0."""
    if MASKED:
        row = vrow0 + vrow_off + 2 * i
        rm = (row >= 0) & (row < v_nrows)
        sc = gl.load(sptr + 2 * i * (128 // VG), mask=rm, other=0.0)
        zr = gl.load(zptr + 2 * i * (128 // VG), mask=rm, other=0.0)
    else:
        sc = gl.load(sptr + 2 * i * (128 // VG))
        zr = gl.load(zptr + 2 * i * (128 // VG))
    w0, w1 = _vwords(vptr, vrow0, v_nrows, vrow_off, i, VPER, MASKED)
    return _vpairs(w0, w1, sc, zr, BITS, VPER, BF16)


@gluon.jit
def _vpairs(w0, w1, sc, zr, BITS: gl.constexpr, VPER: gl.constexpr, BF16: gl.constexpr):
    """A value chunk's words (:func:`_vwords`), scales and zeros (:data:`V4`) -> its fp16 (bf16) pairs as the A
    operand ``V^T [128, 16]``."""
    NWV: gl.constexpr = 16 // VPER
    HALF: gl.constexpr = VPER // 2
    zero5 = gl.full([16, 8, 2, 4, 2], 0, gl.int32, layout=V5)
    tt = gl.arange(0, 16, layout=gl.SliceLayout(1, gl.SliceLayout(2, gl.SliceLayout(3, gl.SliceLayout(4, V5)))))
    tt = gl.expand_dims(gl.expand_dims(gl.expand_dims(gl.expand_dims(tt, 1), 2), 3), 4) + zero5
    j = tt % VPER
    lo0, hi0 = _merge(w0, V3)
    lo0 = gl.expand_dims(gl.expand_dims(gl.convert_layout(lo0, gl.SliceLayout(3, V4), assert_trivial=True), 3), 0)
    hi0 = gl.expand_dims(gl.expand_dims(gl.convert_layout(hi0, gl.SliceLayout(3, V4), assert_trivial=True), 3), 0)
    x = gl.where(j < HALF, lo0 + zero5, hi0 + zero5)
    if NWV == 2:
        lo1, hi1 = _merge(w1, V3)
        lo1 = gl.expand_dims(gl.expand_dims(gl.convert_layout(lo1, gl.SliceLayout(3, V4), assert_trivial=True), 3), 0)
        hi1 = gl.expand_dims(gl.expand_dims(gl.convert_layout(hi1, gl.SliceLayout(3, V4), assert_trivial=True), 3), 0)
        x = gl.where(tt < VPER, x, gl.where(j < HALF, lo1 + zero5, hi1 + zero5))
    sh = _rot(j % HALF, BITS, BF16)
    sp = sc * (V_FS2 if BITS == 2 else V_FS4)  # prepared scale and bias of dequant_constants
    s5 = gl.broadcast(gl.expand_dims(sp, 0), x)[0]
    if BF16:  # the magic is subtracted in _deq (exact), so the bias is the zero itself
        z5 = gl.broadcast(gl.expand_dims(zr, 0), x)[0]
    else:
        z5 = gl.broadcast(gl.expand_dims(zr - sp * (V_FB2 if BITS == 2 else V_FB4), 0), x)[0]
    y = _deq(x, sh, s5, z5, BITS, False, BF16)
    return gl.convert_layout(gl.reshape(y, [128, 16]), A_L, assert_trivial=True)


# a half tile's value scales (zeros) per chunk [ng g, 2 h, 4 a, 2 e] (fp16) as read: lane 4 r + a holds group
# g = 16 r / VG (lane rows of one group broadcast); then broadcast to [2 r2, 2 r1, 2 r0, 2 h, 4 a, 2 e] and V4
VM4: gl.constexpr = gl.constexpr(gl.DistributedLinearLayout(
    reg_bases=[[0, 0, 0, 1], [0, 1, 0, 0]],
    lane_bases=[[0, 0, 1, 0], [0, 0, 2, 0], [0, 0, 0, 0], [1, 0, 0, 0], [2, 0, 0, 0]],
    warp_bases=[], block_bases=[], shape=[4, 2, 4, 2]))
VM2: gl.constexpr = gl.constexpr(gl.DistributedLinearLayout(
    reg_bases=[[0, 0, 0, 1], [0, 1, 0, 0]],
    lane_bases=[[0, 0, 1, 0], [0, 0, 2, 0], [0, 0, 0, 0], [0, 0, 0, 0], [1, 0, 0, 0]],
    warp_bases=[], block_bases=[], shape=[2, 2, 4, 2]))
VM6: gl.constexpr = gl.constexpr(gl.DistributedLinearLayout(
    reg_bases=[[0, 0, 0, 0, 0, 1], [0, 0, 0, 1, 0, 0]],
    lane_bases=[[0, 0, 0, 0, 1, 0], [0, 0, 0, 0, 2, 0], [0, 0, 1, 0, 0, 0], [0, 1, 0, 0, 0, 0], [1, 0, 0, 0, 0, 0]],
    warp_bases=[], block_bases=[], shape=[2, 2, 2, 2, 4, 2]))


@gluon.jit
def _hs_vmeta(st, c, NG: gl.constexpr):
    """A chunk's value scales (zeros) from the stage views ``st`` (chunk ``c``, :func:`_hs_layouts`), fp16 in
    :data:`V4`."""
    S5: gl.constexpr = gl.SliceLayout(2, VM6)
    if NG == 4:
        x = gl.reshape(st.index(c).load(VM4), [2, 2, 2, 4, 2])
        x = gl.expand_dims(gl.convert_layout(x, S5, assert_trivial=True), 2)
    else:
        x = gl.expand_dims(gl.convert_layout(st.index(c).load(VM2), gl.SliceLayout(1, S5), assert_trivial=True), 1)
        x = gl.expand_dims(x + gl.full([2, 2, 2, 4, 2], 0.0, gl.float16, layout=S5), 2)
    x = x + gl.full([2, 2, 2, 2, 4, 2], 0.0, gl.float16, layout=VM6)
    return gl.convert_layout(gl.reshape(x, [8, 2, 4, 2]), V4, assert_trivial=True)


@gluon.jit
def _vchunk_hs(vw, vs, vz, st, i: gl.constexpr, NG: gl.constexpr):
    """2-bit fp16 value chunk ``i`` of a half tile staged in shared memory (stage ``st``, :func:`_hs_issue`) as the A
    operand."""
    c = 4 * st + i
    return _vpairs(vw.index(c).load(V4), 0, _hs_vmeta(vs, c, NG), _hs_vmeta(vz, c, NG), 2, 16, False)


# ---- staged rows (TokenQuant keys and raw values with one scale per row: QAQ's rows without outliers) ----------------
@gluon.constexpr_function
def _ts_layouts(kb: int, vb: int) -> tuple:
    """Shared layouts of one staged-rows half tile (``kb`` / ``vb``-bit keys / values, 64 rows): flat copy views in the
    parts' own order and read views per chunk ``i`` (the chunk index on the stage's top address bits, so that the
    read view's first axis is ``4 stage + i``); where a read's lane bits would share banks an XOR swizzle moves them
    onto free bank bits (word bits 2-4 only, so 16-byte copies stay contiguous):

    * key words ``[256 kb]`` / ``[2 h, 8 r, kb w, 4 a]``: lane ``4 r + a``'s words ``kb a + w`` of row ``8 r + h + 2 i``
      (:func:`_tok_word_layout`) at ``wir + 4 kb (h + 2 r + 16 i)`` (``wir``: the word in its row);
    * row scales / zeros ``[32]`` (int32 words, rows ``2 k, 2 k + 1``) / ``[16]`` fp16 (:data:`ROW_L`: score row
      ``m`` is row ``8 (m % 8) + m // 8 + 2 i``): word ``k = 4 r + i`` at ``r + 8 i``; the pair keys read them as
      ``[2 h, 8 r]`` (:data:`TSC` without its lanes ``a``);
    * value words ``[256 vb]`` / ``[8 r, 2 h, 4 a, 2 e (, 2 w)]``: lane ``4 r + a``'s word(s) of row ``16 a + 8 e + h
      + 2 i`` (:data:`V4`, :data:`VW5` at 4 bits; at 2 bits the layout of :func:`_hs_layouts`).

    Bank conflicts count per phase of a read (8 lanes for 16-byte reads, 16 for 8-byte, 32 for 4-byte)."""
    def lay(nbits, lanes, coords, copy, nread):
        pairs = _swizzle_pairs(lanes)
        ps = [_swz(1 << k, pairs) for k in range(nbits)]
        return [[copy(p)] for p in ps], [coords(p) for p in ps[:nread]]

    lw = (4 * kb).bit_length() - 1  # log2 of a key row's words
    ln = kb.bit_length() - 1  # log2 of a lane's words per key row

    def kcopy(p):
        wir, h, r, i = p & ((1 << lw) - 1), (p >> lw) & 1, (p >> (lw + 1)) & 7, p >> (lw + 4)
        return ((h + 2 * i + 8 * r) << lw) + wir

    def kread(p):
        wir = p & ((1 << lw) - 1)
        return [(p >> lw) & 1, (p >> (lw + 1)) & 7, wir & (kb - 1), wir >> ln]

    kw = lay(lw + 6, [ln, ln + 1, lw + 1, lw + 2, lw + 3], kread, kcopy, lw + 4)
    km = ([[4], [8], [16], [1], [2]], [[8], [1], [2], [4]])
    nv = vb // 2  # a lane's words per value row
    lv = nv.bit_length() - 1

    def vcopy(p):
        w, r, h = p & (nv - 1), (p >> lv) & 7, (p >> (lv + 3)) & 1
        e, a, i = (p >> (lv + 4)) & 1, (p >> (lv + 5)) & 3, p >> (lv + 7)
        return 4 * vb * (16 * a + 8 * e + h + 2 * i) + nv * r + w

    def vread(p):
        c = [(p >> lv) & 7, (p >> (lv + 3)) & 1, (p >> (lv + 5)) & 3, (p >> (lv + 4)) & 1]
        return c + [p & (nv - 1)] if nv > 1 else c

    # a 64-bit read's phase is 16 lanes (r < 4): lane bit r2 lies in the other phase, its bank bit is free
    vw = lay(lv + 9, [lv, lv + 1, lv + 5, lv + 6] if nv > 1 else [0, 1, 2, 5, 6], vread, vcopy, lv + 7)
    return kw, km, vw


@gluon.constexpr_function
def _ts_layout(kb, vb, which, read):
    """One of :func:`_ts_layouts`' shared layouts (``which``: 0 key words, 1 row scales / zeros, 2 value words, 3 row
    scales / zeros read as ``[2 h, 8 r]``)."""
    if which == 3:
        return gl.SharedLinearLayout([[1, 0], [0, 1], [0, 2], [0, 4]])
    flat, rd = _ts_layouts(kb, vb)[(0, 1, 2)[which]]
    return gl.SharedLinearLayout(rd if read else flat)


TS1: gl.constexpr = gl.constexpr(gl.BlockedLayout([1], [32], [1], [0]))  # one word per lane


@gluon.jit
def _ts_issue(tk, tks, tkz, tv, tvs, tvz, st, T, vrow, k_data, k_scale, k_zero, v_data, v_scale, v_zero, k_nrows,
              v_nrows, KB: gl.constexpr, VB: gl.constexpr):
    """cp.async the 64 rows at key row ``T`` and value row ``vrow`` (both even) into stage ``st``: their words (16-byte
    copies) and their scales and zeros as words of two rows (``k_scale`` .. ``v_zero``: fp16 pointers). Rows outside
    the parts read 0, and so does a word whose second row is outside (the masked halves load scales from global
    memory)."""
    ok = gl.arange(0, 256 * KB, layout=HS1)
    _CP_ASYNC(tk.index(st), k_data + (T.to(gl.int64) * (4 * KB) + ok), mask=T + ok // (4 * KB) < k_nrows)
    ov = gl.arange(0, 256 * VB, layout=HS1)
    vr = vrow + ov // (4 * VB)
    _CP_ASYNC(tv.index(st), v_data + (vrow.to(gl.int64) * (4 * VB) + ov), mask=(vr >= 0) & (vr < v_nrows))
    ow = gl.arange(0, 32, layout=TS1)
    km = T + 2 * ow + 1 < k_nrows
    kp = (T // 2).to(gl.int64) + ow
    _CP_ASYNC(tks.index(st), k_scale.to(gl.pointer_type(gl.int32), bitcast=True) + kp, mask=km)
    _CP_ASYNC(tkz.index(st), k_zero.to(gl.pointer_type(gl.int32), bitcast=True) + kp, mask=km)
    vm = (vrow >= 0) & (vrow + 2 * ow + 1 < v_nrows)
    vp = (vrow // 2).to(gl.int64) + ow
    _CP_ASYNC(tvs.index(st), v_scale.to(gl.pointer_type(gl.int32), bitcast=True) + vp, mask=vm)
    _CP_ASYNC(tvz.index(st), v_zero.to(gl.pointer_type(gl.int32), bitcast=True) + vp, mask=vm)


@gluon.jit
def _ts_rows(st, c):
    """Chunk ``c``'s row scales (zeros) from the stage view ``st``: float32 ``[16, 1]`` (as :func:`_rows_sz`)."""
    return gl.expand_dims(st.index(c).load(ROW_L).to(gl.float32), 1)


@gluon.jit
def _ts_sz(s_st, z_st, c):
    """Chunk ``c``'s row scales and zeros from the stage views (:func:`_ts_rows`)."""
    return _ts_rows(s_st, c), _ts_rows(z_st, c)


@gluon.jit
def _ts_tsc(st, c):
    """Chunk ``c``'s row scales (zeros) for the pair keys from the stage view ``st`` (:func:`_ts_layout` 3), fp16 in
    :data:`TSC`."""
    x = gl.expand_dims(st.index(c).load(gl.SliceLayout(2, TSC)), 2)
    return gl.broadcast(x, gl.full([2, 8, 4], 0.0, gl.float16, layout=TSC))[0]


@gluon.jit
def _ts_tsc_sz(s_st, z_st, c):
    """Chunk ``c``'s row scales and zeros for the pair keys from the stage views (:func:`_ts_tsc`)."""
    return _ts_tsc(s_st, c), _ts_tsc(z_st, c)


@gluon.jit
def _tsc_rows(scale, T, nrows):
    """The row scales (zeros) of rows ``T + 8 r + h`` in :data:`TSC` from global memory (0 outside the part)."""
    h, r, a = _idx3(TSC, 2, 8, 4)
    row = T + 8 * r + h
    return gl.load(scale + row, mask=(row >= 0) & (row < nrows), other=0.0)


@gluon.jit
def _tsc_sz(scale, zero, T, nrows):
    """The row scales and zeros of rows ``T + 8 r + h`` from global memory (:func:`_tsc_rows`)."""
    return _tsc_rows(scale, T, nrows), _tsc_rows(zero, T, nrows)


@gluon.jit
def _ts_vwords(vw_st, c, VPER: gl.constexpr):
    """A value chunk's words from the stage view (:func:`_vwords`'s layouts)."""
    if VPER == 8:
        w0, w1 = gl.split(vw_st.index(c).load(VW5))
        w0 = gl.convert_layout(w0, V4, assert_trivial=True)
        w1 = gl.convert_layout(w1, V4, assert_trivial=True)
    else:
        w0 = vw_st.index(c).load(V4)
        w1 = 0
    return w0, w1


# ---- sparse outliers (QAQ keeps each row's extremes exact) ----------------------------------------------------------
# Each row's outliers come as S fixed slots (outlier_slots: 32 x the channel's accumulator row << 16 | the 16 bits of
# value - dequantized code, empty slots 0; the row is the byte offset of the channel's q' row for keys and, divided
# by 32, the delta tile's row for values). Key outliers change a token's scores: the
# lane holding score row t adds sum_j q'[m, c_j] delta_j for its queries, q' (scaled queries, float32) read from
# shared memory. Value outliers add delta_j p[t, m] at output channel c_j, which another lane holds: each chunk's
# deltas go into a [128 accumulator rows, 16 tokens] fp16 tile in shared memory (one 16-bit store per slot, by the
# lane that loaded it), which the warp reads back as the A operand of one more P^T product per chunk; two tiles
# alternate, and a tile's entries are cleared (the same stores, of zeros) only after a barrier that follows every
# lane's read of it and precedes the next writes to it. The products run at the running max of the value tiles,
# in the same precision, so nothing is flushed at the half tile's end.
# [16 tokens, 8 queries, 2 slots]: the accumulator layout of a chunk's scores, each lane holding a plane's two slots
# of its tokens in registers (contiguous: one vector load per token), a query pair in consecutive ones
SLOT_L: gl.constexpr = gl.constexpr(gl.DistributedLinearLayout(
    reg_bases=[[0, 1, 0], [0, 0, 1], [8, 0, 0]], lane_bases=[[0, 2, 0], [0, 4, 0], [1, 0, 0], [2, 0, 0], [4, 0, 0]],
    warp_bases=[], block_bases=[], shape=[16, 8, 2]))


@gluon.jit
def _slots(ell, row, nrows, MASKED: gl.constexpr, BF16: gl.constexpr):
    """The two outlier slots of a plane (``ell``: its first row's slots) for the 16 rows ``row`` (a chunk's score
    rows): the byte offsets of their channels' rows in the ``[128, 8]`` buffers ``[16, 1, 2]`` (int32) and their
    deltas ``[16, 1, 2]`` (float32) in :data:`SLOT_L`."""
    LE: gl.constexpr = gl.SliceLayout(1, SLOT_L)
    r = gl.convert_layout(row, gl.SliceLayout(1, LE), assert_trivial=True)
    j = gl.arange(0, 2, layout=gl.SliceLayout(0, LE))
    ptr = ell + (gl.expand_dims(r * 2, 1) + gl.expand_dims(j, 0))
    if MASKED:
        ok = gl.expand_dims((r >= 0) & (r < nrows), 1) & gl.expand_dims(j < 2, 0)
        ew = gl.load(ptr, mask=ok, other=0)
    else:
        ew = gl.load(ptr)
    off = (ew >> 16) & 0xFFF
    lo = (ew & 0xFFFF).to(gl.int16)
    if BF16:
        dl = lo.to(gl.bfloat16, bitcast=True).to(gl.float32)
    else:
        dl = lo.to(gl.float16, bitcast=True).to(gl.float32)
    return gl.expand_dims(off, 1), gl.expand_dims(dl, 1)


@gluon.jit
def _more(ell, lo, nrows):
    """Whether any of the rows ``lo .. lo + 63`` (a half tile's; clamped to the part) has slots after plane 0:
    the difference of two of the part's prefix counts (:func:`outlier_slots`), two loads of one address per warp, so
    the branch on it is warp-uniform and needs no reduction across lanes."""
    pre = ell + 2 * nrows
    a = gl.minimum(gl.maximum(lo, 0), nrows)
    b = gl.minimum(gl.maximum(lo + 64, 0), nrows)
    return gl.load(pre + b) > gl.load(pre + a)


@gluon.jit
def _plane1(ell, nrows):
    """The second plane's first slot (after plane 0 and the prefix counts, :func:`_prefix_len`); plane ``1 + j`` at
    ``2 j nrows`` slots after it."""
    return ell + 2 * nrows + ((nrows + 3) // 2) * 2


@gluon.jit
def _extra(ell, nrows):
    """The number of planes after plane 0 (the entry after the prefix counts, :func:`outlier_slots`)."""
    return gl.load(ell + 3 * nrows + 1)


@gluon.jit
def _qcol3():
    """Query columns ``[1, 8, 1]`` in :data:`SLOT_L`."""
    c = gl.arange(0, 8, layout=gl.SliceLayout(0, gl.SliceLayout(2, SLOT_L)))
    return gl.expand_dims(gl.expand_dims(c, 0), 2)


@gluon.jit
def _k_terms(qbase, off, dl):
    """``[16, 8]`` key-outlier terms ``sum_j q'[m, c_j] delta_j`` of two slots per row."""
    qv = gl.inline_asm_elementwise(LDS_F32X2, "=f,=f,r,r", [(qbase + off) + _qcol3() * 4], dtype=gl.float32,
                                   is_pure=True, pack=2)
    return gl.convert_layout(gl.sum(qv * dl, axis=2), MMA, assert_trivial=True)


@gluon.jit
def _k_out(s, ell, tok, k_nrows, qbase, MASKED: gl.constexpr, BF16: gl.constexpr):
    """Scores ``s [16, 8]`` (log2 units) plus the terms ``sum_j q'[m, c_j] delta_j`` of one plane's two key-outlier
    slots (``ell``: the plane) of each token row, with the scaled queries ``q'`` read from shared memory at ``qbase``
    (``[128 channels, 8 queries]``)."""
    off, dl = _slots(ell, tok, k_nrows, MASKED, BF16)
    return s + _k_terms(qbase, off, dl)


@gluon.constexpr_function
def _dslot_layout():
    """``[16 token rows, 2 slots]`` of a chunk, one slot per lane."""
    return gl.DistributedLinearLayout(reg_bases=[], lane_bases=[[0, 1], [1, 0], [2, 0], [4, 0], [8, 0]],
                                      warp_bases=[], block_bases=[], shape=[16, 2])


DT_L: gl.constexpr = gl.constexpr(gl.SwizzledSharedLayout(8, 4, 2, order=[1, 0]))  # [128 rows, 16 tokens] fp16


@gluon.jit
def _vd_write(dbase, ell, vrow0, i: gl.constexpr, v_nrows, want, ZERO: gl.constexpr = False):
    """Write one plane of value-outlier deltas of chunk ``i`` (rows ``vrow0 + trow + 2 i``) into the chunk's delta
    tile at shared address ``dbase`` (``[128 accumulator rows, 16 token rows]`` fp16, :data:`DT_L`: the 16-byte
    halves of a row swapped on rows ``R`` with ``R // 4`` odd); ``want``: whether to read the plane. Returns each
    slot's address and word (to clear it after the tile was read). ``ZERO``: store zeros (clear a plane's entries)."""
    L2: gl.constexpr = _dslot_layout()
    r = gl.arange(0, 16, layout=gl.SliceLayout(1, L2))
    j = gl.arange(0, 2, layout=gl.SliceLayout(0, L2))
    row = vrow0 + (8 * (r % 8) + r // 8 + 2 * i)  # trow (RUN = 8: outliers come with TokenQuant keys)
    ok = gl.expand_dims((row >= 0) & (row < v_nrows) & want, 1) & gl.expand_dims(j < 2, 0)
    ew = gl.load(ell + (gl.expand_dims(row * 2, 1) + gl.expand_dims(j, 0)), mask=ok, other=0)
    R = (ew >> 21) & 0x7F
    rr = gl.expand_dims(r, 1)
    addr = dbase + (R * 32 + (((rr // 8) ^ ((R // 4) % 2)) * 16 + (rr % 8) * 2))
    if ZERO:
        val = ew * 0
    else:
        val = ew & 0xFFFF
    gl.inline_asm_elementwise(ST_DELTA, "=r,r,r,r", [addr, ew, val], dtype=gl.int32, is_pure=False, pack=1)
    return addr, ew


@gluon.jit
def _vd_chunk(acc, p, i: gl.constexpr, cbuf, cbase, ell, ell1, vrow0, v_nrows, more, nx, BF16: gl.constexpr,
              MANY: gl.constexpr):
    """``acc += D_i^T P_i^T`` for chunk ``i``'s value outliers: every plane's deltas (plane 1, and with ``MANY`` the
    ``nx`` planes after plane 0, only when ``more``) written into tile ``i % 2``, a barrier, the tile read as the A
    operand. Returns ``acc`` and plane 0 and 1's slot addresses and words, for :func:`_vd_clear` after the next
    barrier (:func:`_vd_planes` clears the rest)."""
    base = cbase + 4096 * (i % 2)
    a, e = _vd_write(base, ell, vrow0, i, v_nrows, True)
    b, f = _vd_write(base, ell1, vrow0, i, v_nrows, more)
    _vd_planes(i, cbase, ell1, vrow0, v_nrows, more, nx, MANY, False)
    _BARRIER()
    acc = mma_v2(cbuf.slice(128 * (i % 2), 128).load(A_L), _pt(p, BF16), acc)
    return acc, a, e, b, f


@gluon.jit
def _vd_planes(i: gl.constexpr, cbase, ell1, vrow0, v_nrows, more, nx, MANY: gl.constexpr, ZERO: gl.constexpr):
    """Planes 2 .. ``nx`` of chunk ``i``'s value deltas (rows with more than four outliers; only with ``MANY`` and
    when ``more``) into its tile (:func:`_vd_chunk`), or with ``ZERO`` their entries cleared after the tile was read
    (the slots read again)."""
    if MANY:
        if more:
            for j in range(1, nx):
                _vd_write(cbase + 4096 * (i % 2), ell1 + j * 2 * v_nrows, vrow0, i, v_nrows, True, ZERO)


@gluon.jit
def _vd_clear(a, e, b, f):
    """Clear the delta-tile entries that :func:`_vd_chunk` wrote (the same stores, of zeros)."""
    gl.inline_asm_elementwise(ST_DELTA, "=r,r,r,r", [a, e, e * 0], dtype=gl.int32, is_pure=False, pack=1)
    gl.inline_asm_elementwise(ST_DELTA, "=r,r,r,r", [b, f, f * 0], dtype=gl.int32, is_pure=False, pack=1)


@gluon.jit
def _key_op(klo, khi, ksc, kzr, wk, sk, zk, i: gl.constexpr, K_BITS: gl.constexpr, BF16: gl.constexpr,
            K_TOK: gl.constexpr):
    """Key chunk ``i`` of a half tile as the A operand: TokenQuant from the chunk's words (``wk, sk, zk``),
    ChannelQuant from the half's merged words (``klo, khi, ksc, kzr``)."""
    if K_TOK:
        if K_BITS == 3:
            ka = _tok3_kchunk(wk, sk, zk, BF16)
        else:
            ka = _tok_kchunk(wk, sk, zk, K_BITS, BF16)
    else:
        ka = _kchunk(klo, khi, ksc, kzr, i, K_BITS, 32 // K_BITS, BF16)
    return ka


@gluon.jit
def _scores(qb, klo, khi, ksc, kzr, wk, sk, zk, zs, qs, i: gl.constexpr, T0, trow, k_ell, k_nrows, cbase,
            K_BITS: gl.constexpr, MASKED: gl.constexpr, BF16: gl.constexpr, K_TOK: gl.constexpr, K_OUT: gl.constexpr,
            K_RAW: gl.constexpr, K_CRAW: gl.constexpr, K_TS: gl.constexpr = False):
    """Scores ``S^T [16 tokens, 8 queries]`` (log2 units, unmasked) of chunk ``i`` of the half tile whose chunk 0
    starts at ``T0`` (physical tokens ``T0 + trow + 2 i``). The key chunk comes from ``klo, khi, ksc, kzr``
    (ChannelQuant) or ``wk, sk, zk`` (TokenQuant, :func:`_key_op`; raw keys: words and row factors, ``K_RAW``); with
    key outliers (``K_OUT``) the terms of each
    row's first two slots (:func:`_k_out`; a third and fourth: :func:`_half`). Raw ChannelQuant keys (``K_CRAW``):
    :func:`_craw_scores` with the half's scaled queries in ``ksc`` and zeros' term in ``kzr``. Staged rows
    (``K_TS``): unmasked halves pass the raw keys' row factors in ``sk, zk`` (:func:`_ts_rows`)."""
    if K_CRAW:
        s = _craw_scores(klo, ksc, kzr, zs, i)
    elif K_RAW:  # codes x scaled queries, then each row's scale and zero (sk, zk: _rows_sz; qs: the queries' sums)
        if K_BITS == 3:
            s = mma_v2(_tok3_kchunk_raw(wk), qb, zs)
        else:
            s = mma_v2(_tok_kchunk_raw(wk, K_BITS), qb, zs)
        if K_TS and not MASKED:  # staged rows: sk, zk are the chunk's (_ts_rows)
            rs = sk * RAW_ROW
            rz = zk
        else:
            rs, rz = _rows_sz(sk, zk, T0 + trow + 2 * i, k_nrows, RAW_ROW, MASKED)
        s = s * rs + rz * qs
    else:
        s = mma_v2(_key_op(klo, khi, ksc, kzr, wk, sk, zk, i, K_BITS, BF16, K_TOK), qb, zs)
    if K_OUT > 0:
        s = _k_out(s, k_ell, T0 + trow + 2 * i, k_nrows, cbase + 8192, MASKED, BF16)
    return s


@gluon.jit
def _seen(s, i: gl.constexpr, T0, kbeg, cnt, new0, trow, qcol, s_ptr, hd, M, NMAX, COLBASE, col, LQ,
          WANT_SCORES: gl.constexpr, MASKED: gl.constexpr, K_CRAW: gl.constexpr):
    """Chunk ``i``'s scores (:func:`_scores`) masked on boundary tiles (tokens outside the head's rows, causal new
    rows), and stored (natural units) when asked. Raw ChannelQuant keys: column ``n`` is query ``n % 4``, and a row
    is stored from the columns of its lane-row half (:func:`_craw_prep`)."""
    tok = T0 + trow + 2 * i
    if K_CRAW:
        qq = qcol % 4
    else:
        qq = qcol
    if MASKED:
        see = (tok >= kbeg) & (tok < kbeg + cnt)
        see2 = gl.expand_dims(see, 1) & (gl.expand_dims(tok - new0, 1) <= gl.expand_dims(qq % LQ, 0))
        s = gl.where(see2, s, float("-inf"))
    if WANT_SCORES:
        jc = COLBASE + col + tok - kbeg
        smask = gl.expand_dims(qq < M, 0) & gl.expand_dims((tok >= kbeg) & (tok < kbeg + cnt), 1)
        if K_CRAW:
            smask = smask & (gl.expand_dims((trow // 32) % 2, 1) == gl.expand_dims(qcol // 4, 0))
        gl.store(s_ptr + (hd * M + gl.expand_dims(qq, 0)).to(gl.int64) * NMAX + gl.expand_dims(jc, 1),
                 s * 0.6931471805599453, mask=smask)
    return s


@gluon.jit
def _pt(p, BF16: gl.constexpr):
    """``P^T`` [16, 8] of a chunk's probabilities as the B operand: from the accumulator by ``movmatrix``."""
    if BF16:
        pt = gl.inline_asm_elementwise(TRANS, "=r,r", [p.to(gl.bfloat16)], dtype=gl.bfloat16, is_pure=True, pack=2)
    else:
        pt = gl.inline_asm_elementwise(TRANS, "=r,r", [p.to(gl.float16)], dtype=gl.float16, is_pure=True, pack=2)
    # register j of lane l now holds P^T[2 (l % 4) + (j & 1) + 8 (j >> 1), l // 4]: as a [2, 8, 8] view that is the
    # B fragment of P^T with the last two axes swapped
    pb = gl.reshape(gl.permute(gl.reshape(pt, [2, 8, 8]), (0, 2, 1)), [16, 8])
    return gl.convert_layout(pb, B_L, assert_trivial=True)


@gluon.jit
def _pv(acc, pb, vptr, sptr, zptr, vrow0, v_nrows, vrow_off, i: gl.constexpr, V_BITS: gl.constexpr,
        VPER: gl.constexpr, V_GROUP: gl.constexpr, MASKED: gl.constexpr, BF16: gl.constexpr):
    """``acc += V^T_chunk @ P^T`` (``pb``: :func:`_pt`)."""
    if V_BITS == 3:
        va_ = _vchunk3(vptr, sptr, zptr, vrow0, v_nrows, vrow_off, i, MASKED, BF16)
    elif V_BITS < 2:
        va_ = _vchunk01(vptr, sptr, zptr, vrow0, v_nrows, vrow_off, i, V_BITS, V_GROUP, MASKED, BF16)
    else:
        va_ = _vchunk(vptr, sptr, zptr, vrow0, v_nrows, vrow_off, i, V_BITS, VPER, V_GROUP, MASKED, BF16)
    return mma_v2(va_, pb, acc)


@gluon.jit
def _zrow(v_zero, row, v_nrows, MASKED: gl.constexpr):
    """The zeros of 0-bit value rows ``row`` (one per row, float32 ``[16, 1]``)."""
    if MASKED:
        z = gl.load(v_zero + row, mask=(row >= 0) & (row < v_nrows), other=0.0)
    else:
        z = gl.load(v_zero + row)
    return gl.expand_dims(z.to(gl.float32), 1)


@gluon.jit
def _unit_issue(hk, hks, hkz, hv, hvs, hvz, st, T, kbeg, vbeg, k_data, k_scale2, k_zero2, v_data, v_scale2, v_zero2,
                k_nrows, v_nrows, K_TS: gl.constexpr, K_BITS: gl.constexpr, V_BITS: gl.constexpr,
                K_GROUP: gl.constexpr, V_GROUP: gl.constexpr):
    """Copy the half tile at key row ``T`` (value row ``T - kbeg + vbeg``) into stage ``st``: staged rows
    (:func:`_ts_issue`) or raw ChannelQuant keys' half stage (:func:`_hs_issue`)."""
    if K_TS:
        _ts_issue(hk, hks, hkz, hv, hvs, hvz, st, T, T - kbeg + vbeg, k_data, k_scale2, k_zero2, v_data, v_scale2,
                  v_zero2, k_nrows, v_nrows, K_BITS, V_BITS)
    else:
        _hs_issue(hk, hks, hkz, hv, hvs, hvz, st, T, T - kbeg + vbeg, k_data, k_scale2, k_zero2, v_data, v_scale2,
                  v_zero2, k_nrows, v_nrows, K_GROUP, 128 // V_GROUP)


@gluon.jit
def _half(acc, m_i, l_i, za, qb, zs, qs, ve, T0, w, kbeg, vbeg, cnt, new0, k_data, k_scale2, k_zero2, v_data, v_scale,
          v_zero, k_nrows, v_nrows, kc_off, ks_off, krow_l, krow_w, vw_off, vs_off, vrow_off, trow, qcol, s_ptr, hd,
          M, NMAX, COLBASE, col, LQ, kw_st, ks_st, kz_st, k_ell, v_ell, cbase, cbuf, K_BITS: gl.constexpr,
          K_GROUP: gl.constexpr, V_BITS: gl.constexpr, V_GROUP: gl.constexpr, WANT_SCORES: gl.constexpr,
          MASKED: gl.constexpr, STAGED: gl.constexpr, BF16: gl.constexpr, K_TOK: gl.constexpr, K_OUT: gl.constexpr,
          V_OUT: gl.constexpr, K_RAW: gl.constexpr, V_RAW: gl.constexpr, K_CRAW: gl.constexpr, vw_st=0, vs_st=0,
          vz_st=0, vst=0, K_TS: gl.constexpr = False, LATE: gl.constexpr = False, draw=0, nsp=0, total=0, abeg=0,
          hk=0, hks=0, hkz=0, hv=0, hvs=0, hvz=0):
    """Half ``w`` (chunks 4w .. 4w+3) of the 128-token tile at ``T0``: scores of its 4 chunks, online softmax,
    ``P V``. ChannelQuant halves keep only half of each lane's key words in registers; with ``STAGED`` the key words
    come from the shared-memory views ``kw_st`` / ``ks_st`` / ``kz_st`` of this tile's stage, otherwise from global
    memory. TokenQuant keys (``K_TOK``) load each chunk's own words, scales and zeros (:func:`_tok_key_load`).
    Outliers (``K_OUT`` / ``V_OUT`` slots per row): :func:`_k_out`; the value deltas through the tiles ``cbuf`` (at
    shared address ``cbase``, :func:`_vd_write`). Staged rows (``K_TS``): the chunks' key and value words, and in
    unmasked halves their row scales and zeros, from the stage views (chunk ``4 vst + i``; :func:`_ts_issue`)."""
    KPER: gl.constexpr = 32 // K_BITS
    VPER: gl.constexpr = 32 // V_BITS if V_BITS > 0 else 32
    HOFF: gl.constexpr = 8 if (K_BITS == 2 and not K_TOK and not K_CRAW) else 64  # half w's first token - trow - 2 i
    WOFF: gl.constexpr = 0 if K_BITS == 2 else 64  # first token of the half's key words: T0 + WOFF w + lane run
    if K_TOK:  # TokenQuant keys: each chunk's own words and scales (kc_off / krow_w: words; ks_off / krow_l: scales)
        T8 = T0 + HOFF * w  # the half's chunk i has physical tokens T8 + trow + 2 i
    if K_TS:
        c0 = 4 * vst
        WL: gl.constexpr = _tok_word_layout(KPER)
        wk0 = kw_st.index(c0).load(WL)
        wk1 = kw_st.index(c0 + 1).load(WL)
        wk2 = kw_st.index(c0 + 2).load(WL)
        wk3 = kw_st.index(c0 + 3).load(WL)
        if MASKED and K_RAW:  # the row factors from global memory (_scores)
            sk0 = k_scale2
            zk0 = k_zero2
            sk1 = k_scale2
            zk1 = k_zero2
            sk2 = k_scale2
            zk2 = k_zero2
            sk3 = k_scale2
            zk3 = k_zero2
        elif MASKED:
            sk0, zk0 = _tsc_sz(k_scale2, k_zero2, T8, k_nrows)
            sk1, zk1 = _tsc_sz(k_scale2, k_zero2, T8 + 2, k_nrows)
            sk2, zk2 = _tsc_sz(k_scale2, k_zero2, T8 + 4, k_nrows)
            sk3, zk3 = _tsc_sz(k_scale2, k_zero2, T8 + 6, k_nrows)
        elif K_RAW:
            sk0, zk0 = _ts_sz(ks_st, kz_st, c0)
            sk1, zk1 = _ts_sz(ks_st, kz_st, c0 + 1)
            sk2, zk2 = _ts_sz(ks_st, kz_st, c0 + 2)
            sk3, zk3 = _ts_sz(ks_st, kz_st, c0 + 3)
        else:
            sk0, zk0 = _ts_tsc_sz(ks_st, kz_st, c0)
            sk1, zk1 = _ts_tsc_sz(ks_st, kz_st, c0 + 1)
            sk2, zk2 = _ts_tsc_sz(ks_st, kz_st, c0 + 2)
            sk3, zk3 = _ts_tsc_sz(ks_st, kz_st, c0 + 3)
        klo = 0
        khi = 0
        ksc = 0
        kzr = 0
    elif K_RAW:
        wk0 = _tok_key_words(k_data, T8, k_nrows, krow_w, kc_off, KPER, MASKED)
        wk1 = _tok_key_words(k_data, T8 + 2, k_nrows, krow_w, kc_off, KPER, MASKED)
        wk2 = _tok_key_words(k_data, T8 + 4, k_nrows, krow_w, kc_off, KPER, MASKED)
        wk3 = _tok_key_words(k_data, T8 + 6, k_nrows, krow_w, kc_off, KPER, MASKED)
        sk0 = k_scale2  # the row factors are loaded by _scores (_rows_sz)
        zk0 = k_zero2
        sk1 = k_scale2
        zk1 = k_zero2
        sk2 = k_scale2
        zk2 = k_zero2
        sk3 = k_scale2
        zk3 = k_zero2
        klo = 0
        khi = 0
        ksc = 0
        kzr = 0
    elif K_TOK:
        wk0, sk0, zk0 = _tok_key_load(k_data, k_scale2, k_zero2, T8, k_nrows, krow_w, kc_off, krow_l, ks_off, KPER,
                                      K_GROUP, MASKED)
        wk1, sk1, zk1 = _tok_key_load(k_data, k_scale2, k_zero2, T8 + 2, k_nrows, krow_w, kc_off, krow_l, ks_off,
                                      KPER, K_GROUP, MASKED)
        wk2, sk2, zk2 = _tok_key_load(k_data, k_scale2, k_zero2, T8 + 4, k_nrows, krow_w, kc_off, krow_l, ks_off,
                                      KPER, K_GROUP, MASKED)
        wk3, sk3, zk3 = _tok_key_load(k_data, k_scale2, k_zero2, T8 + 6, k_nrows, krow_w, kc_off, krow_l, ks_off,
                                      KPER, K_GROUP, MASKED)
        klo = 0
        khi = 0
        ksc = 0
        kzr = 0
    else:
        wk0 = 0
        sk0 = 0
        zk0 = 0
        wk1 = 0
        sk1 = 0
        zk1 = 0
        wk2 = 0
        sk2 = 0
        zk2 = 0
        wk3 = 0
        sk3 = 0
        zk3 = 0
        if K_CRAW:  # raw ChannelQuant keys: the half's scaled queries and zeros' term in ksc, kzr (_craw_prep)
            klo = _craw_words(kw_st)
            khi = klo
            ksc, kzr = _craw_prep(qb, ks_st, kz_st, zs)
        elif STAGED:
            ksc = ks_st.load(K3)
            kzr = kz_st.load(K3)
            wd = kw_st.load(K4)
        else:
            # each lane's key run lies in one key block: its scales / zeros as int32 pairs (two channels' fp16)
            row0 = T0 + WOFF * w + krow_l
            kbo = (row0 // K_GROUP).to(gl.int64) * 64
            if MASKED:
                ksc = gl.load(k_scale2 + kbo + ks_off, mask=row0 < k_nrows, other=0)
                kzr = gl.load(k_zero2 + kbo + ks_off, mask=row0 < k_nrows, other=0)
            else:
                ksc = gl.load(k_scale2 + kbo + ks_off)
                kzr = gl.load(k_zero2 + kbo + ks_off)
            wd = _key_words(k_data + kc_off, T0 + WOFF * w + krow_w, k_nrows, K_GROUP, KPER, MASKED)
        if not K_CRAW:
            klo, khi = _merge_key(wd, w, KPER)
            ksc, kzr = _prep_key(ksc, kzr, K_BITS, BF16)
        T8 = T0 + HOFF * w
    vrow0 = T8 - kbeg + vbeg
    vptr = v_data + (vrow0 * ((128 + VPER - 1) // VPER) + vw_off)
    sptr = v_scale + (vrow0 * (128 // V_GROUP) + vs_off)
    zptr = v_zero + (vrow0 * (128 // V_GROUP) + vs_off)
    # outliers' planes after the first: one warp-uniform flag per half tile and side, loaded first (their latency hides
    # behind the key chunks)
    if K_OUT >= 4:
        kmore = _more(k_ell, T8, k_nrows)
    else:
        kmore = False
    if V_OUT >= 4:
        vmore = _more(v_ell, vrow0, v_nrows)
    else:
        vmore = False
    if V_OUT > 4:  # planes 2 .. (MAX_SLOTS)
        vx = _extra(v_ell, v_nrows)
    else:
        vx = 2
    s0 = _scores(qb, klo, khi, ksc, kzr, wk0, sk0, zk0, zs, qs, 0, T8, trow, k_ell, k_nrows, cbase, K_BITS,
                 MASKED, BF16, K_TOK, K_OUT, K_RAW, K_CRAW, K_TS)
    s1 = _scores(qb, klo, khi, ksc, kzr, wk1, sk1, zk1, zs, qs, 1, T8, trow, k_ell, k_nrows, cbase, K_BITS,
                 MASKED, BF16, K_TOK, K_OUT, K_RAW, K_CRAW, K_TS)
    s2 = _scores(qb, klo, khi, ksc, kzr, wk2, sk2, zk2, zs, qs, 2, T8, trow, k_ell, k_nrows, cbase, K_BITS,
                 MASKED, BF16, K_TOK, K_OUT, K_RAW, K_CRAW, K_TS)
    s3 = _scores(qb, klo, khi, ksc, kzr, wk3, sk3, zk3, zs, qs, 3, T8, trow, k_ell, k_nrows, cbase, K_BITS,
                 MASKED, BF16, K_TOK, K_OUT, K_RAW, K_CRAW, K_TS)
    if K_OUT == 4:
        if kmore:  # a third and fourth key outlier in some row of the half tile (QAQ's ties: ~14% of half tiles)
            k1 = _plane1(k_ell, k_nrows)
            s0 = _k_out(s0, k1, T8 + trow, k_nrows, cbase + 8192, MASKED, BF16)
            s1 = _k_out(s1, k1, T8 + trow + 2, k_nrows, cbase + 8192, MASKED, BF16)
            s2 = _k_out(s2, k1, T8 + trow + 4, k_nrows, cbase + 8192, MASKED, BF16)
            s3 = _k_out(s3, k1, T8 + trow + 6, k_nrows, cbase + 8192, MASKED, BF16)
    if K_OUT > 4:
        if kmore:  # a third key outlier or more in some row of the half tile: planes 1 ..
            k1 = _plane1(k_ell, k_nrows)
            for j in range(0, _extra(k_ell, k_nrows)):
                kj = k1 + j * 2 * k_nrows
                s0 = _k_out(s0, kj, T8 + trow, k_nrows, cbase + 8192, MASKED, BF16)
                s1 = _k_out(s1, kj, T8 + trow + 2, k_nrows, cbase + 8192, MASKED, BF16)
                s2 = _k_out(s2, kj, T8 + trow + 4, k_nrows, cbase + 8192, MASKED, BF16)
                s3 = _k_out(s3, kj, T8 + trow + 6, k_nrows, cbase + 8192, MASKED, BF16)
    s0 = _seen(s0, 0, T8, kbeg, cnt, new0, trow, qcol, s_ptr, hd, M, NMAX, COLBASE, col, LQ, WANT_SCORES, MASKED,
               K_CRAW)
    s1 = _seen(s1, 1, T8, kbeg, cnt, new0, trow, qcol, s_ptr, hd, M, NMAX, COLBASE, col, LQ, WANT_SCORES, MASKED,
               K_CRAW)
    s2 = _seen(s2, 2, T8, kbeg, cnt, new0, trow, qcol, s_ptr, hd, M, NMAX, COLBASE, col, LQ, WANT_SCORES, MASKED,
               K_CRAW)
    s3 = _seen(s3, 3, T8, kbeg, cnt, new0, trow, qcol, s_ptr, hd, M, NMAX, COLBASE, col, LQ, WANT_SCORES, MASKED,
               K_CRAW)
    if LATE:  # the next unit (ticket drawn at this unit's start) copied into the other stage now (_hstep)
        nxt = nsp + _ticket(draw)
        if nxt < total:
            _unit_issue(hk, hks, hkz, hv, hvs, hvz, 1 - vst, abeg + nxt * 64, kbeg, vbeg, k_data, k_scale2, k_zero2,
                        v_data, v_scale, v_zero, k_nrows, v_nrows, K_TS, K_BITS, V_BITS, K_GROUP, V_GROUP)
        async_copy.commit_group()
    else:
        nxt = 0
    mx = gl.maximum(gl.maximum(s0, s1), gl.maximum(s2, s3))
    m_new = gl.maximum(m_i, gl.max(mx, 0))
    m_safe = gl.where(m_new == float("-inf"), 0.0, m_new)
    alpha = gl.exp2(m_i - m_safe)
    # 0-bit values with one zero per row: every channel of a token is its zero, so the half tile adds
    # sum_t p[t, m] z_t to every output row (no value tiles, no MMA)
    V_Z: gl.constexpr = V_BITS == 0 and V_GROUP == 128
    if not V_Z:
        acc = acc * gl.expand_dims(alpha, 0)
    ms = gl.expand_dims(m_safe, 0)
    if V_RAW:  # the probabilities (and so l, P^T and the zeros' term) times the part's 2^E (value_exponent)
        ms = ms - ve
    p0 = gl.exp2(s0 - ms)
    p1 = gl.exp2(s1 - ms)
    p2 = gl.exp2(s2 - ms)
    p3 = gl.exp2(s3 - ms)
    if V_RAW:  # raw values: P^T times each token's scale, the zeros' term per query in za (summed at the end)
        if K_TS and not MASKED:
            sv0, zv0 = _ts_sz(vs_st, vz_st, c0)
            sv1, zv1 = _ts_sz(vs_st, vz_st, c0 + 1)
            sv2, zv2 = _ts_sz(vs_st, vz_st, c0 + 2)
            sv3, zv3 = _ts_sz(vs_st, vz_st, c0 + 3)
        else:
            sv0, zv0 = _rows_sz(v_scale, v_zero, vrow0 + trow, v_nrows, 1.0, MASKED)
            sv1, zv1 = _rows_sz(v_scale, v_zero, vrow0 + trow + 2, v_nrows, 1.0, MASKED)
            sv2, zv2 = _rows_sz(v_scale, v_zero, vrow0 + trow + 4, v_nrows, 1.0, MASKED)
            sv3, zv3 = _rows_sz(v_scale, v_zero, vrow0 + trow + 6, v_nrows, 1.0, MASKED)
        za = za * gl.expand_dims(alpha, 0) + ((p0 * zv0 + p1 * zv1) + (p2 * zv2 + p3 * zv3))
    if K_TS:  # staged value words
        va0, vb0 = _ts_vwords(vw_st, c0, VPER)
        acc = mma_v2(_vraw(va0, vb0, V_BITS, VPER), _pt(p0 * sv0, BF16), acc)
        va1, vb1 = _ts_vwords(vw_st, c0 + 1, VPER)
        acc = mma_v2(_vraw(va1, vb1, V_BITS, VPER), _pt(p1 * sv1, BF16), acc)
        va2, vb2 = _ts_vwords(vw_st, c0 + 2, VPER)
        acc = mma_v2(_vraw(va2, vb2, V_BITS, VPER), _pt(p2 * sv2, BF16), acc)
        va3, vb3 = _ts_vwords(vw_st, c0 + 3, VPER)
        acc = mma_v2(_vraw(va3, vb3, V_BITS, VPER), _pt(p3 * sv3, BF16), acc)
    elif V_RAW:
        acc = mma_v2(_vchunk_raw(vptr, vrow0, v_nrows, vrow_off, 0, V_BITS, VPER, MASKED), _pt(p0 * sv0, BF16), acc)
        acc = mma_v2(_vchunk_raw(vptr, vrow0, v_nrows, vrow_off, 1, V_BITS, VPER, MASKED), _pt(p1 * sv1, BF16), acc)
        acc = mma_v2(_vchunk_raw(vptr, vrow0, v_nrows, vrow_off, 2, V_BITS, VPER, MASKED), _pt(p2 * sv2, BF16), acc)
        acc = mma_v2(_vchunk_raw(vptr, vrow0, v_nrows, vrow_off, 3, V_BITS, VPER, MASKED), _pt(p3 * sv3, BF16), acc)
    elif V_Z:
        zc = p0 * _zrow(v_zero, vrow0 + trow, v_nrows, MASKED)
        zc += p1 * _zrow(v_zero, vrow0 + trow + 2, v_nrows, MASKED)
        zc += p2 * _zrow(v_zero, vrow0 + trow + 4, v_nrows, MASKED)
        zc += p3 * _zrow(v_zero, vrow0 + trow + 6, v_nrows, MASKED)
        acc = acc * gl.expand_dims(alpha, 0) + gl.expand_dims(gl.sum(zc, 0), 0)
    elif K_CRAW:  # values staged with the keys (_hs_issue)
        acc = mma_v2(_vchunk_hs(vw_st, vs_st, vz_st, vst, 0, 128 // V_GROUP), _pt(p0, BF16), acc)
        acc = mma_v2(_vchunk_hs(vw_st, vs_st, vz_st, vst, 1, 128 // V_GROUP), _pt(p1, BF16), acc)
        acc = mma_v2(_vchunk_hs(vw_st, vs_st, vz_st, vst, 2, 128 // V_GROUP), _pt(p2, BF16), acc)
        acc = mma_v2(_vchunk_hs(vw_st, vs_st, vz_st, vst, 3, 128 // V_GROUP), _pt(p3, BF16), acc)
    else:
        acc = _pv(acc, _pt(p0, BF16), vptr, sptr, zptr, vrow0, v_nrows, vrow_off, 0, V_BITS, VPER, V_GROUP, MASKED,
                  BF16)
        acc = _pv(acc, _pt(p1, BF16), vptr, sptr, zptr, vrow0, v_nrows, vrow_off, 1, V_BITS, VPER, V_GROUP, MASKED,
                  BF16)
        acc = _pv(acc, _pt(p2, BF16), vptr, sptr, zptr, vrow0, v_nrows, vrow_off, 2, V_BITS, VPER, V_GROUP, MASKED,
                  BF16)
        acc = _pv(acc, _pt(p3, BF16), vptr, sptr, zptr, vrow0, v_nrows, vrow_off, 3, V_BITS, VPER, V_GROUP, MASKED,
                  BF16)
    l_i = l_i * alpha + gl.sum((p0 + p1) + (p2 + p3), 0)
    if V_OUT > 0:
        # value outliers: each chunk's deltas go into a [128 accumulator rows, 16 tokens] tile in shared memory (two
        # tiles, alternating), which is read back as an A operand and multiplied by the chunk's P^T; a tile's
        # entries are cleared once every lane has read it (after the next barrier), before it is written again
        v1 = _plane1(v_ell, v_nrows)
        if V_RAW:  # the deltas are in the raw accumulator's units (raw_values): P^T = p (p0 = p 2^E)
            inv = gl.exp2(-ve)
            p0 = p0 * inv
            p1 = p1 * inv
            p2 = p2 * inv
            p3 = p3 * inv
        acc, a0, e0, b0, f0 = _vd_chunk(acc, p0, 0, cbuf, cbase, v_ell, v1, vrow0, v_nrows, vmore, vx, BF16, V_OUT > 4)
        acc, a1, e1, b1, f1 = _vd_chunk(acc, p1, 1, cbuf, cbase, v_ell, v1, vrow0, v_nrows, vmore, vx, BF16, V_OUT > 4)
        _vd_clear(a0, e0, b0, f0)
        _vd_planes(0, cbase, v1, vrow0, v_nrows, vmore, vx, V_OUT > 4, True)
        _BARRIER()
        acc, a2, e2, b2, f2 = _vd_chunk(acc, p2, 2, cbuf, cbase, v_ell, v1, vrow0, v_nrows, vmore, vx, BF16, V_OUT > 4)
        _vd_clear(a1, e1, b1, f1)
        _vd_planes(1, cbase, v1, vrow0, v_nrows, vmore, vx, V_OUT > 4, True)
        _BARRIER()
        acc, a3, e3, b3, f3 = _vd_chunk(acc, p3, 3, cbuf, cbase, v_ell, v1, vrow0, v_nrows, vmore, vx, BF16, V_OUT > 4)
        _vd_clear(a2, e2, b2, f2)
        _vd_planes(2, cbase, v1, vrow0, v_nrows, vmore, vx, V_OUT > 4, True)
        _BARRIER()
        _vd_clear(a3, e3, b3, f3)
        _vd_planes(3, cbase, v1, vrow0, v_nrows, vmore, vx, V_OUT > 4, True)
    return acc, m_new, l_i, za, nxt


@gluon.jit
def _step(acc, m_i, l_i, za, qb, zs, qs, ve, ht, st, issue_next, T_next, abeg, kbeg, vbeg, cnt, new0, k_data, k_scale2,
          k_zero2, v_data, v_scale, v_zero, k_nrows, v_nrows, kc_off, ks_off, krow_l, krow_w, vw_off, vs_off,
          vrow_off, trow, qcol, s_ptr, hd, M, NMAX, COLBASE, col, LQ, kflat, sflat, zflat, kread, sread, zread, k_ell,
          v_ell, cbase, cbuf, K_BITS: gl.constexpr, K_GROUP: gl.constexpr, V_BITS: gl.constexpr,
          V_GROUP: gl.constexpr, WANT_SCORES: gl.constexpr, STAGE_K: gl.constexpr, BF16: gl.constexpr,
          K_TOK: gl.constexpr, K_OUT: gl.constexpr, V_OUT: gl.constexpr, K_RAW: gl.constexpr,
          V_RAW: gl.constexpr, K_CRAW: gl.constexpr):
    """Half tile ``ht`` of the head (tile ``ht // 2``, half ``ht % 2``). Staged keys: at the tile's first half the
    next tile (at token ``T_next``, when ``issue_next``) is copied into the other stage, and this tile's stage ``st``
    is waited for."""
    T0 = abeg + (ht // 2) * 128
    w = ht % 2
    inner = (T0 >= kbeg) & (T0 + 128 <= kbeg + cnt) & (T0 + 128 <= new0)
    if STAGE_K:
        st = st.to(gl.int32)
        if w == 0:
            if issue_next:
                _issue_keys(kflat, sflat, zflat, 1 - st, T_next, k_data, k_scale2, k_zero2, k_nrows, K_GROUP)
            async_copy.commit_group()
            async_copy.wait_group(1)  # this tile's copies have landed
            _BARRIER()
        kw_st = kread.index(st)
        ks_st = sread.index(st)
        kz_st = zread.index(st)
    else:
        kw_st = 0
        ks_st = 0
        kz_st = 0
    if inner:
        acc, m_i, l_i, za, _ = _half(acc, m_i, l_i, za, qb, zs, qs, ve, T0, w, kbeg, vbeg, cnt, new0,
                              k_data, k_scale2, k_zero2, v_data, v_scale, v_zero, k_nrows, v_nrows, kc_off, ks_off,
                              krow_l, krow_w, vw_off, vs_off, vrow_off, trow, qcol, s_ptr, hd, M, NMAX, COLBASE, col,
                              LQ, kw_st, ks_st, kz_st, k_ell, v_ell, cbase, cbuf, K_BITS, K_GROUP, V_BITS, V_GROUP,
                              WANT_SCORES, False, STAGE_K, BF16, K_TOK, K_OUT, V_OUT, K_RAW, V_RAW, K_CRAW)
    else:
        acc, m_i, l_i, za, _ = _half(acc, m_i, l_i, za, qb, zs, qs, ve, T0, w, kbeg, vbeg, cnt, new0,
                              k_data, k_scale2, k_zero2, v_data, v_scale, v_zero, k_nrows, v_nrows, kc_off, ks_off,
                              krow_l, krow_w, vw_off, vs_off, vrow_off, trow, qcol, s_ptr, hd, M, NMAX, COLBASE, col,
                              LQ, kw_st, ks_st, kz_st, k_ell, v_ell, cbase, cbuf, K_BITS, K_GROUP, V_BITS, V_GROUP,
                              WANT_SCORES, True, STAGE_K, BF16, K_TOK, K_OUT, V_OUT, K_RAW, V_RAW, K_CRAW)
    if STAGE_K:
        if w == 1:
            _BARRIER()  # every lane has read this stage before it is refilled
    return acc, m_i, l_i, za


@gluon.jit
def _hstep(acc, m_i, l_i, za, qb, zs, qs, ve, ht, st, issue_next, n_next, abeg, kbeg, vbeg, cnt, new0, k_data,
           k_scale2, k_zero2, v_data, v_scale, v_zero, k_nrows, v_nrows, trow, qcol, s_ptr, hd, M, NMAX, COLBASE, col,
           LQ, hk, hks, hkz, hv, hvs, hvz, rk, rks, rkz, rv, rvs, rvz, K_BITS: gl.constexpr, K_GROUP: gl.constexpr,
           V_BITS: gl.constexpr, V_GROUP: gl.constexpr, WANT_SCORES: gl.constexpr, BF16: gl.constexpr,
           V_RAW: gl.constexpr, K_RAW: gl.constexpr = False, K_TS: gl.constexpr = False,
           LATE: gl.constexpr = False, draw=0, nsp=0, total=0):
    """Half tile ``ht`` of the head for raw ChannelQuant keys (or staged rows, ``K_TS``): the next unit (half tile
    ``n_next``, when ``issue_next``) is copied into the other stage, this one's stage ``st`` is waited for and computed
    (:func:`_half` with the stage's views). ``v_scale`` / ``v_zero``: int32 pointers (the copies move words; fp16 for
    staged rows). ``LATE`` (:data:`DRAW_LATE`): the next unit is half tile ``nsp`` + the ticket ``draw`` (drawn at
    this unit's start), copied after this unit's scores (in :func:`_half`); returns it (or a number >= ``total``)."""
    st = st.to(gl.int32)
    if LATE:
        async_copy.wait_group(0)  # this unit's copies (the only ones in flight) have landed
    else:
        if issue_next:
            _unit_issue(hk, hks, hkz, hv, hvs, hvz, 1 - st, abeg + n_next * 64, kbeg, vbeg, k_data, k_scale2, k_zero2,
                        v_data, v_scale, v_zero, k_nrows, v_nrows, K_TS, K_BITS, V_BITS, K_GROUP, V_GROUP)
        async_copy.commit_group()
        async_copy.wait_group(1)  # this unit's copies have landed
    _BARRIER()
    T0 = abeg + (ht // 2) * 128
    w = ht % 2
    T8 = T0 + 64 * w
    inner = (T8 >= kbeg) & (T8 + 64 <= kbeg + cnt) & (T8 + 64 <= new0)
    if K_TS:  # the views of both stages (_half reads chunk 4 st + i)
        kv = rk
        ksv = rks
        kzv = rkz
    else:
        kv = rk.index(st)
        ksv = rks.index(st)
        kzv = rkz.index(st)
    if inner:
        acc, m_i, l_i, za, nxt = _half(acc, m_i, l_i, za, qb, zs, qs, ve, T0, w, kbeg, vbeg, cnt, new0, k_data,
                                       k_scale2, k_zero2, v_data, v_scale, v_zero, k_nrows, v_nrows, 0, 0, 0, 0, 0, 0,
                                       0, trow, qcol, s_ptr, hd, M, NMAX, COLBASE, col, LQ, kv, ksv, kzv,
                                       0, 0, 0, 0, K_BITS, K_GROUP, V_BITS, V_GROUP, WANT_SCORES, False, True, BF16,
                                       K_TS, 0, 0, K_RAW, V_RAW, not K_TS, rv, rvs, rvz, st, K_TS, LATE, draw, nsp,
                                       total, abeg, hk, hks, hkz, hv, hvs, hvz)
    else:
        acc, m_i, l_i, za, nxt = _half(acc, m_i, l_i, za, qb, zs, qs, ve, T0, w, kbeg, vbeg, cnt, new0, k_data,
                                       k_scale2, k_zero2, v_data, v_scale, v_zero, k_nrows, v_nrows, 0, 0, 0, 0, 0, 0,
                                       0, trow, qcol, s_ptr, hd, M, NMAX, COLBASE, col, LQ, kv, ksv, kzv,
                                       0, 0, 0, 0, K_BITS, K_GROUP, V_BITS, V_GROUP, WANT_SCORES, True, True, BF16,
                                       K_TS, 0, 0, K_RAW, V_RAW, not K_TS, rv, rvs, rvz, st, K_TS, LATE, draw, nsp,
                                       total, abeg, hk, hks, hkz, hv, hvs, hvz)
    _BARRIER()  # every lane has read this stage before it is refilled
    return acc, m_i, l_i, za, nxt


@gluon.jit
def _grab(ctr, last):
    """Draw the head's next ticket (lane 0; :func:`_ticket` reads it): ``atom.inc`` with bound ``last`` returns the
    counter and adds 1, or sets it back to 0 when it was ``last``. Every unit a program works on draws once, so a
    launch draws tickets 0 .. ``last`` and leaves the counter at 0 for the next launch."""
    return gl.inline_asm_elementwise(GRAB, "=r,l,r", [ctr, last], dtype=gl.int32, is_pure=False, pack=1)


@gluon.jit
def _ticket(draw):
    """The ticket lane 0 drew, for the whole warp."""
    return gl.inline_asm_elementwise(TICKET, "=r,r", [draw], dtype=gl.int32, is_pure=False, pack=1)


# sizes are runtime values: specialising on them (== 1, multiples of 16) would recompile as a decode cache grows, and
# resident_programs() must see the registers of the kernel that launches
_SIZES = ["KB0", "KHS", "VB0", "VHS", "CNT", "COL0", "k_nrows", "v_nrows", "M", "NMAX", "COLBASE", "NEWR", "LQ",
          "SPLIT_OFF", "S_TOTAL", "NSPLIT"]


@gluon.jit(do_not_specialize=_SIZES)
def _kivi_attn_kernel(
    q_ptr, out_ptr, lse_ptr, s_ptr, k_data, k_scale, k_zero, v_data, v_scale, v_zero,
    meta_ptr, KB0, KHS, VB0, VHS, CNT, COL0, k_nrows, v_nrows, M, NMAX, COLBASE, NEWR, LQ,
    SPLIT_OFF, S_TOTAL, NSPLIT, sm_scale, ve_ptr, ctr_ptr, k_ell, v_ell,
    K_BITS: gl.constexpr, K_GROUP: gl.constexpr, V_BITS: gl.constexpr, V_GROUP: gl.constexpr,
    UNIFORM: gl.constexpr, WANT_SCORES: gl.constexpr, STAGE_K: gl.constexpr, DYNAMIC: gl.constexpr,
    BF16: gl.constexpr, K_TOK: gl.constexpr, K_OUT: gl.constexpr = 0, V_OUT: gl.constexpr = 0,
    K_RAW: gl.constexpr = False, V_RAW: gl.constexpr = False, K_CRAW: gl.constexpr = False,
    K_TS: gl.constexpr = False, LATE: gl.constexpr = False, PDL: gl.constexpr = False,
):
    KPER: gl.constexpr = 32 // K_BITS
    VPER: gl.constexpr = 32 // V_BITS if V_BITS > 0 else 32
    # a lane's key run per half tile: 2 bits: one word of 16 tokens (each half uses half of it); 4 bits: one word of 8
    RUN: gl.constexpr = 16 if (K_BITS == 2 and not K_TOK and not K_CRAW) else 8  # else the 4-bit token order
    gl.static_assert(K_GROUP % 16 == 0)
    hd = gl.program_id(0)
    sp = gl.program_id(1)
    if V_RAW:  # the part's exponent E (value_exponent), a device scalar
        v_e = gl.load(ve_ptr)
    else:
        v_e = 0.0
    if PDL:
        gl.inline_asm_elementwise(GDC_LAUNCH, "=r,r", [sp], dtype=gl.int32, is_pure=False, pack=1)
    if UNIFORM:
        kbeg = (KB0 + hd * KHS).to(gl.int64)
        vbeg = (VB0 + hd * VHS).to(gl.int64)
        cnt = (CNT + 0 * hd).to(gl.int64)
        col = (COL0 + 0 * hd).to(gl.int64)
    else:
        nh = gl.num_programs(0)
        kbeg = gl.load(meta_ptr + hd)
        vbeg = gl.load(meta_ptr + nh + hd)
        cnt = gl.load(meta_ptr + 2 * nh + hd)
        col = gl.load(meta_ptr + 3 * nh + hd)
    if K_TS:  # staged rows start at an even row (their scales and zeros are copied as words of two rows)
        abeg = kbeg - kbeg % 2
    elif K_TOK:
        abeg = kbeg
    else:
        abeg = kbeg - kbeg % K_GROUP  # key tiles start at a key block
    ntiles = gl.where(cnt > 0, (kbeg + cnt - abeg + 127) // 128, 0)
    tps = (ntiles + NSPLIT - 1) // NSPLIT
    t_lo = sp * tps
    t_hi = gl.minimum(t_lo + tps, ntiles)
    new0 = kbeg + cnt - NEWR

    # Q^T: B operand [128 channels, 8 queries], pre-scaled by sm_scale * log2(e)
    qk = gl.arange(0, 128, layout=gl.SliceLayout(1, B_L))
    qn = gl.arange(0, 8, layout=gl.SliceLayout(0, B_L))
    if K_CRAW:  # raw ChannelQuant keys: columns n and n + 4 both carry query n (two streams, _craw_scores)
        gl.static_assert(STAGE_K and not BF16 and K_BITS == 2 and K_GROUP >= 32)
        qn = qn % 4
    qmask = gl.expand_dims(qk < 128, 1) & gl.expand_dims(qn < M, 0)
    if K_TOK:  # the keys' channel order (tok_key_channel)
        qc = _tok_channel(qk, K_BITS)
    else:
        qc = qk
    qv = gl.load(q_ptr + (hd * M + gl.expand_dims(qn, 0)) * 128 + gl.expand_dims(qc, 1), mask=qmask, other=0.0)
    qscale = sm_scale * 1.4426950408889634
    if BF16:
        qb = (qv.to(gl.float32) * qscale).to(gl.bfloat16)
    else:
        qb = (qv.to(gl.float32) * qscale).to(gl.float16)
    if K_RAW:  # raw keys: each channel's query times 2^(raw_exp - pos) (exact), and the queries' sums (the zero's)
        qs = gl.expand_dims(gl.convert_layout(gl.sum(qb.to(gl.float32), 0), COL_L), 0)
        qb = (qb.to(gl.float32) * gl.expand_dims(_raw_qfac(qk, K_BITS), 1)).to(gl.float16)
    else:
        qs = 0
    if K_OUT + V_OUT > 0:
        # rows 0-255: the two value-outlier delta tiles ([128 accumulator rows, 16 tokens] fp16 each, DT_L,
        # zeroed); rows 256-383: the scaled queries q' (float32 bits, also in accumulator-row order) for the key
        # outliers; rows 384-511 unused (an allocation's shape is a power of two). The kernel's only shared memory:
        # its address is the shared window's base (_check_smem)
        gl.static_assert(K_TOK and not STAGE_K)
        QT: gl.constexpr = gl.BlockedLayout([1, 8], [32, 1], [1, 1], [1, 0])
        obuf = gl.allocate_shared_memory(gl.int32, [512, 8], gl.SwizzledSharedLayout(1, 1, 1, order=[1, 0]))
        obuf.slice(0, 256).store(gl.zeros([256, 8], gl.int32, layout=QT))
        if BF16:
            cbuf = _REINTERPRET(obuf.slice(0, 256), gl.bfloat16, [256, 16], DT_L)
        else:
            cbuf = _REINTERPRET(obuf.slice(0, 256), gl.float16, [256, 16], DT_L)
        tc = gl.arange(0, 128, layout=gl.SliceLayout(1, QT))
        tm = gl.arange(0, 8, layout=gl.SliceLayout(0, QT))
        tch = 16 * (tc % 8) + tc // 8  # row R holds channel 16 (R % 8) + R // 8 (out_row's inverse)
        qt = gl.load(q_ptr + (hd * M + gl.expand_dims(tm, 0)) * 128 + gl.expand_dims(tch, 1),
                     mask=gl.expand_dims(tch < 128, 1) & gl.expand_dims(tm < M, 0), other=0.0)
        obuf.slice(256, 128).store((qt.to(gl.float32) * qscale).to(gl.int32, bitcast=True))
        cbase = gl.inline_asm_elementwise(SMEM_BASE, "=r,r", [sp], dtype=gl.int32, is_pure=True, pack=1)
        _BARRIER()
    else:
        cbuf = 0
        cbase = 0

    # per-element offsets, split into a lane part and a register constant (so loads use immediate offsets)
    if K_TOK:
        # TokenQuant keys (_tok_key_load): words [2 h, 8 r, NW w, 4 a] of token 8 r + h, lane a's words; scales and
        # zeros [2 h, 8 r, 4 a]: lane a's group
        if K_BITS == 3:  # words 3a, 3a + 1, 3a + 2 and 12 ([2 h, 8 r, 4 a, 4 w], _tok3_kchunk)
            wh, wr, wa, ww = _idx4(KW3, 2, 8, 4, 4)
            kc_off = gl.where(ww < 3, 3 * wa + ww, 12)
        else:
            NWK: gl.constexpr = 32 // KPER
            wh, wr, ww, wa = _idx4(_tok_word_layout(KPER), 2, 8, NWK, 4)
            kc_off = NWK * wa + ww
        krow_w = 8 * wr + wh
        sh_, sr_, sa_ = _idx3(TSC, 2, 8, 4)
        krow_l = 8 * sr_ + sh_
        ks_off = (32 * sa_) // K_GROUP
        k_scale2 = k_scale
        k_zero2 = k_zero
    else:
        r, f, a, e = _idx4(K4, 8, 16, 4, 2)
        kc_off = (2 * a) * (K_GROUP // KPER) + (8 * f + e) * (K_GROUP // KPER)  # channel offset in a key block's words
        kr, kf, ka = _idx3(K3, 8, 16, 4)
        ks_off = ka + 4 * kf  # channel-pair offset of the int32 scale pairs
        krow_l = RUN * kr  # each lane's first token in the half tile's key words (plus WOFF w)
        krow_w = RUN * r
        k_scale2 = k_scale.to(gl.pointer_type(gl.int32), bitcast=True)
        k_zero2 = k_zero.to(gl.pointer_type(gl.int32), bitcast=True)
    vr, vh, va, ve = _idx4(V4, 8, 2, 4, 2)
    vrow_off = 2 * RUN * va + (RUN * ve + vh)  # value row (minus 2 i) of each element of a chunk
    # words per value row (13 at 3 bits: lane row r starts at word r; at 1 bit at word r // 2)
    VW: gl.constexpr = (128 + VPER - 1) // VPER
    vw_off = (2 * RUN * va * VW + (vr if V_BITS == 3 else (16 * vr) // VPER)) + (RUN * ve + vh) * VW
    vs_off = (2 * RUN * va * (128 // V_GROUP) + (16 * vr) // V_GROUP) + (RUN * ve + vh) * (128 // V_GROUP)
    rows = gl.arange(0, 16, layout=ROW_L)
    trow = RUN * (rows % 8) + rows // 8  # physical token (minus T8 + 2 i) of each score row of a chunk
    qcol = gl.arange(0, 8, layout=COL_L)

    m_i = gl.full([8], float("-inf"), gl.float32, layout=COL_L)
    l_i = gl.full([8], 0.0, gl.float32, layout=COL_L)
    acc = gl.zeros([128, 8], gl.float32, layout=MMA)
    zs = gl.zeros([16, 8], gl.float32, layout=MMA)
    if V_RAW:
        za = gl.zeros([16, 8], gl.float32, layout=MMA)  # raw values: sum_t p[t, m] z_t per score row's lanes
    else:
        za = 0
    kflat = 0  # the tile-staged keys' buffers and views (STAGE_K without K_CRAW)
    sflat = 0
    zflat = 0
    kread = 0
    sread = 0
    zread = 0
    if K_CRAW:
        # two stages of a half tile's keys and values (_hs_issue, _hs_layouts): unit u + 1 is copied while unit u is
        # computed
        NG: gl.constexpr = 128 // V_GROUP
        gl.static_assert(V_BITS == 2 and (NG == 2 or NG == 4) and not V_RAW)
        hk = gl.allocate_shared_memory(gl.int32, [2, 512], _hs_layout(K_GROUP, NG, 0, False))
        hks = gl.allocate_shared_memory(gl.int32, [2, 2, 64], _hs_layout(K_GROUP, NG, 1, False))
        hkz = gl.allocate_shared_memory(gl.int32, [2, 2, 64], _hs_layout(K_GROUP, NG, 1, False))
        hv = gl.allocate_shared_memory(gl.int32, [2, 512], _hs_layout(K_GROUP, NG, 2, False))
        hvs = gl.allocate_shared_memory(gl.int32, [2, 32 * NG], _hs_layout(K_GROUP, NG, 3, False))
        hvz = gl.allocate_shared_memory(gl.int32, [2, 32 * NG], _hs_layout(K_GROUP, NG, 3, False))
        rk = _view(hk, [2, 4, 16, 4, 2], _hs_layout(K_GROUP, NG, 0, True))
        rks = _view(hks, [2, 2, 16, 4], _hs_layout(K_GROUP, NG, 1, True))
        rkz = _view(hkz, [2, 2, 16, 4], _hs_layout(K_GROUP, NG, 1, True))
        rv = _view(hv, [8, 8, 2, 4, 2], _hs_layout(K_GROUP, NG, 2, True))
        rvs = _REINTERPRET(hvs, gl.float16, [8, NG, 2, 4, 2], _hs_layout(K_GROUP, NG, 3, True))
        rvz = _REINTERPRET(hvz, gl.float16, [8, NG, 2, 4, 2], _hs_layout(K_GROUP, NG, 3, True))
        v_scale2 = v_scale.to(gl.pointer_type(gl.int32), bitcast=True)
        v_zero2 = v_zero.to(gl.pointer_type(gl.int32), bitcast=True)
    elif K_TS:
        # two stages of a half tile's rows (_ts_issue, _ts_layouts): unit u + 1 is copied while unit u is computed
        gl.static_assert(K_TOK and V_RAW and K_OUT == 0 and K_GROUP == 128 and (K_BITS == 2 or K_BITS == 4))
        hk = gl.allocate_shared_memory(gl.int32, [2, 256 * K_BITS], _ts_layout(K_BITS, V_BITS, 0, False))
        hks = gl.allocate_shared_memory(gl.int32, [2, 32], _ts_layout(K_BITS, V_BITS, 1, False))
        hkz = gl.allocate_shared_memory(gl.int32, [2, 32], _ts_layout(K_BITS, V_BITS, 1, False))
        hv = gl.allocate_shared_memory(gl.int32, [2, 256 * V_BITS], _ts_layout(K_BITS, V_BITS, 2, False))
        hvs = gl.allocate_shared_memory(gl.int32, [2, 32], _ts_layout(K_BITS, V_BITS, 1, False))
        hvz = gl.allocate_shared_memory(gl.int32, [2, 32], _ts_layout(K_BITS, V_BITS, 1, False))
        rk = _view(hk, [8, 2, 8, K_BITS, 4], _ts_layout(K_BITS, V_BITS, 0, True))
        if K_RAW:
            rks = _REINTERPRET(hks, gl.float16, [8, 16], _ts_layout(K_BITS, V_BITS, 1, True))
            rkz = _REINTERPRET(hkz, gl.float16, [8, 16], _ts_layout(K_BITS, V_BITS, 1, True))
        else:
            rks = _REINTERPRET(hks, gl.float16, [8, 2, 8], _ts_layout(K_BITS, V_BITS, 3, True))
            rkz = _REINTERPRET(hkz, gl.float16, [8, 2, 8], _ts_layout(K_BITS, V_BITS, 3, True))
        if V_BITS == 4:
            rv = _view(hv, [8, 8, 2, 4, 2, 2], _ts_layout(K_BITS, V_BITS, 2, True))
        else:
            rv = _view(hv, [8, 8, 2, 4, 2], _ts_layout(K_BITS, V_BITS, 2, True))
        rvs = _REINTERPRET(hvs, gl.float16, [8, 16], _ts_layout(K_BITS, V_BITS, 1, True))
        rvz = _REINTERPRET(hvz, gl.float16, [8, 16], _ts_layout(K_BITS, V_BITS, 1, True))
        v_scale2 = v_scale  # fp16: _ts_issue copies words, the masked halves load rows
        v_zero2 = v_zero
    elif STAGE_K:
        # two stages of each tile's key words and key scales / zeros: tile t + 1 is copied while tile t is computed
        gl.static_assert(K_BITS == 2)
        gl.static_assert(128 % K_GROUP == 0)  # a tile is whole key blocks, contiguous in memory
        kflat = gl.allocate_shared_memory(gl.int32, [2, 1024], _kwords_layout(K_GROUP, False))
        kread = _view(kflat, [2, 8, 16, 4, 2], _kwords_layout(K_GROUP, True))
        sflat = gl.allocate_shared_memory(gl.int32, [2, 8, 64], _kmeta_layout(False))
        zflat = gl.allocate_shared_memory(gl.int32, [2, 8, 64], _kmeta_layout(False))
        sread = _view(sflat, [2, 8, 16, 4], _kmeta_layout(True))
        zread = _view(zflat, [2, 8, 16, 4], _kmeta_layout(True))
    if K_CRAW or K_TS:  # units of one half tile, staged one unit ahead (_hstep)
        if DYNAMIC:
            last = (2 * ntiles - 1).to(gl.int32)
            nxt = NSPLIT + sp
            ht = sp
            if ht < 2 * ntiles:
                _unit_issue(hk, hks, hkz, hv, hvs, hvz, 0, abeg + 64 * ht, kbeg, vbeg, k_data, k_scale2, k_zero2,
                            v_data, v_scale2, v_zero2, k_nrows, v_nrows, K_TS, K_BITS, V_BITS, K_GROUP, V_GROUP)
            async_copy.commit_group()
            uc = sp * 0  # units done (the stage parity)
            while ht < 2 * ntiles:
                draw = _grab(ctr_ptr + hd, last)
                if LATE:  # the ticket is this unit's successor (NSPLIT + ticket), copied after its scores
                    acc, m_i, l_i, za, ht = _hstep(acc, m_i, l_i, za, qb, zs, qs, v_e, ht, uc % 2, False, 0, abeg,
                                                   kbeg, vbeg, cnt, new0, k_data, k_scale2, k_zero2, v_data, v_scale2,
                                                   v_zero2, k_nrows, v_nrows, trow, qcol, s_ptr, hd, M, NMAX, COLBASE,
                                                   col, LQ, hk, hks, hkz, hv, hvs, hvz, rk, rks, rkz, rv, rvs, rvz,
                                                   K_BITS, K_GROUP, V_BITS, V_GROUP, WANT_SCORES, BF16, V_RAW, K_RAW,
                                                   K_TS, True, draw, NSPLIT, 2 * ntiles)
                else:
                    acc, m_i, l_i, za, _ = _hstep(acc, m_i, l_i, za, qb, zs, qs, v_e, ht, uc % 2, nxt < 2 * ntiles,
                                                  nxt, abeg, kbeg, vbeg, cnt, new0, k_data, k_scale2, k_zero2, v_data,
                                                  v_scale2, v_zero2, k_nrows, v_nrows, trow, qcol, s_ptr, hd, M, NMAX,
                                                  COLBASE, col, LQ, hk, hks, hkz, hv, hvs, hvz, rk, rks, rkz, rv, rvs,
                                                  rvz, K_BITS, K_GROUP, V_BITS, V_GROUP, WANT_SCORES, BF16, V_RAW,
                                                  K_RAW, K_TS)
                    ht = nxt
                    nxt = 2 * NSPLIT + _ticket(draw)
                uc += 1
        else:
            if t_lo < t_hi:
                _unit_issue(hk, hks, hkz, hv, hvs, hvz, 0, abeg + 128 * t_lo, kbeg, vbeg, k_data, k_scale2, k_zero2,
                            v_data, v_scale2, v_zero2, k_nrows, v_nrows, K_TS, K_BITS, V_BITS, K_GROUP, V_GROUP)
            async_copy.commit_group()
            for ht in range(2 * t_lo, 2 * t_hi):
                acc, m_i, l_i, za, _ = _hstep(acc, m_i, l_i, za, qb, zs, qs, v_e, ht, (ht - 2 * t_lo) % 2,
                                           ht + 1 < 2 * t_hi, ht + 1, abeg, kbeg, vbeg, cnt, new0, k_data, k_scale2,
                                           k_zero2, v_data, v_scale2, v_zero2, k_nrows, v_nrows, trow, qcol, s_ptr, hd,
                                           M, NMAX, COLBASE, col, LQ, hk, hks, hkz, hv, hvs, hvz, rk, rks, rkz, rv, rvs,
                                           rvz, K_BITS, K_GROUP, V_BITS, V_GROUP, WANT_SCORES, BF16, V_RAW, K_RAW, K_TS)
    elif DYNAMIC:
        # units of one half tile, or of a whole tile when keys are staged (a stage holds one tile): each program
        # starts with units sp and NSPLIT + sp, then takes the next free one from the head's counter, drawn one unit
        # ahead (the atomic's latency hides behind a unit of work). Programs that their SM's schedulers serve more
        # slowly so do fewer units; with static ranges the kernel waited for the slowest (kernels/NOTES.md, session
        # 7). The staged and unstaged loops are written apart: one loop for both (UNIT half tiles per unit) got
        # another ptxas schedule and ran 2-bit 1.5-2.5% slower on the H100.
        UNIT: gl.constexpr = 2 if STAGE_K else 1
        last = (2 * ntiles // UNIT - 1).to(gl.int32)
        nxt = NSPLIT + sp
        ht = UNIT * sp  # the half tile to do
        if STAGE_K:
            if sp < ntiles:
                _issue_keys(kflat, sflat, zflat, 0, abeg + sp * 128, k_data, k_scale2, k_zero2, k_nrows, K_GROUP)
            async_copy.commit_group()
            tc = sp * 0  # tiles done (the stage parity)
            draw = sp * 0
            while ht < 2 * ntiles:
                w = ht % 2
                if w == 0:
                    draw = _grab(ctr_ptr + hd, last)
                acc, m_i, l_i, za = _step(acc, m_i, l_i, za, qb, zs, qs, v_e, ht,
                                      tc % 2, nxt < ntiles,
                                      abeg + nxt * 128, abeg, kbeg, vbeg, cnt, new0, k_data, k_scale2, k_zero2,
                                      v_data, v_scale, v_zero, k_nrows, v_nrows, kc_off, ks_off, krow_l, krow_w,
                                      vw_off, vs_off, vrow_off,
                                      trow, qcol, s_ptr, hd, M, NMAX, COLBASE, col, LQ, kflat, sflat, zflat, kread,
                                      sread, zread, k_ell, v_ell, cbase, cbuf, K_BITS, K_GROUP, V_BITS, V_GROUP,
                                      WANT_SCORES, STAGE_K, BF16, K_TOK, K_OUT, V_OUT, K_RAW, V_RAW, K_CRAW)
                if w == 1:
                    ht = 2 * nxt
                    nxt = 2 * NSPLIT + _ticket(draw)
                    tc += 1
                else:
                    ht += 1
        else:
            cur = sp
            while cur < 2 * ntiles:
                draw = _grab(ctr_ptr + hd, last)
                acc, m_i, l_i, za = _step(acc, m_i, l_i, za, qb, zs, qs, v_e, cur, 0,
                                      False, 0, abeg, kbeg, vbeg, cnt,
                                      new0, k_data, k_scale2, k_zero2, v_data, v_scale, v_zero, k_nrows, v_nrows,
                                      kc_off, ks_off, krow_l, krow_w, vw_off, vs_off, vrow_off, trow, qcol, s_ptr, hd,
                                      M, NMAX, COLBASE, col, LQ, kflat, sflat, zflat, kread, sread, zread, k_ell,
                                      v_ell, cbase, cbuf, K_BITS, K_GROUP, V_BITS, V_GROUP, WANT_SCORES, STAGE_K,
                                      BF16, K_TOK, K_OUT, V_OUT, K_RAW, V_RAW, K_CRAW)
                cur = nxt
                nxt = 2 * NSPLIT + _ticket(draw)
    else:
        if STAGE_K:
            if t_lo < t_hi:
                _issue_keys(kflat, sflat, zflat, 0, abeg + t_lo * 128, k_data, k_scale2, k_zero2, k_nrows, K_GROUP)
            async_copy.commit_group()
        for ht in range(2 * t_lo, 2 * t_hi):  # half tiles
            acc, m_i, l_i, za = _step(acc, m_i, l_i, za, qb, zs, qs, v_e, ht,
                                  (ht // 2 - t_lo) % 2, ht // 2 + 1 < t_hi,
                                  abeg + (ht // 2 + 1) * 128, abeg, kbeg, vbeg, cnt, new0, k_data, k_scale2, k_zero2,
                                  v_data, v_scale, v_zero, k_nrows, v_nrows, kc_off, ks_off, krow_l, krow_w, vw_off,
                                  vs_off, vrow_off, trow, qcol, s_ptr, hd, M, NMAX, COLBASE, col, LQ, kflat, sflat,
                                  zflat, kread, sread, zread, k_ell, v_ell, cbase, cbuf, K_BITS,
                                  K_GROUP, V_BITS, V_GROUP, WANT_SCORES, STAGE_K, BF16, K_TOK, K_OUT, V_OUT, K_RAW,
                                  V_RAW, K_CRAW)
    if K_CRAW:  # the two streams of each query (columns n and n + 4, disjoint tokens) merged like two splits
        if V_RAW:
            acc = acc * gl.expand_dims(_raw_vfac(gl.arange(0, 128, layout=ROW_L), V_BITS), 1) + gl.expand_dims(
                gl.sum(za, 0), 0)
        m_p = _bfly2(m_i)
        m_c = gl.maximum(m_i, m_p)
        m_s = gl.where(m_c == float("-inf"), 0.0, m_c)
        a_i = gl.exp2(m_i - m_s)
        a_p = gl.exp2(m_p - m_s)
        l_i = l_i * a_i + _bfly2(l_i) * a_p
        acc = acc * gl.expand_dims(a_i, 0) + _bfly2(acc) * gl.expand_dims(a_p, 0)
        m_i = m_c
    has = l_i > 0
    if V_RAW and not K_CRAW:
        acc = acc * gl.expand_dims(_raw_vfac(gl.arange(0, 128, layout=ROW_L), V_BITS), 1) + gl.expand_dims(
            gl.sum(za, 0), 0)
    out = acc / gl.expand_dims(gl.where(has, l_i, 1.0), 0)
    m_l = m_i - v_e if V_RAW else m_i  # raw values: l is in units of 2^v_e
    lse = gl.where(has, (m_l + gl.log2(gl.where(has, l_i, 1.0))) * 0.6931471805599453, float("-inf"))
    orow = (hd * S_TOTAL + SPLIT_OFF + sp) * M + qcol
    oc = gl.arange(0, 128, layout=ROW_L)
    if V_BITS == 3:
        pc = _v3_channel(oc)
    else:
        pc = 16 * (oc % 8) + oc // 8
    gl.store(out_ptr + gl.expand_dims(orow, 0).to(gl.int64) * 128 + gl.expand_dims(pc, 1), out,
             mask=gl.expand_dims(qcol < M, 0) & gl.expand_dims(pc < 128, 1))
    gl.store(lse_ptr + orow, lse, mask=qcol < M)
    if PDL:
        gl.inline_asm_elementwise(GDC_WAIT, "=r,r", [sp], dtype=gl.int32, is_pure=False, pack=1)


# outlier slots per row the kernel takes (QAQ's default keeps 2 per row of 128 channels, and about 8 at its
# ``outliers=0.05``): 2 in plane 0, 2 in each further plane
MAX_SLOTS = 16


def outlier_slots(spec, value: bool = False) -> torch.Tensor | None:
    """A TokenQuant part's outliers as fixed slots: one flat int32 tensor (:func:`slot_views` names its pieces) of
    plane 0 (``[rows, 2]``: a row's first two outliers), the rows' prefix counts of the rows with more than two
    (``rows + 1`` entries: entry ``r`` counts the rows before ``r`` that have a third outlier), the number ``P - 1``
    of further planes, a padding entry when needed for an even length, and planes 1 .. P - 1 (``[rows, 2]`` each:
    outliers 3-4, 5-6, ... of a row; QAQ keeps 3 where a row ties at an extreme, 0.2% of rows, and about 8 per row at
    ``outliers=0.05``; only when some row has them). The kernel reads the further planes for a half tile only when
    two prefix counts say one of its 64 rows has a third outlier. A slot holds ``32 out_row(channel)`` (bits 16-27:
    for keys the byte offset of the channel's row in the kernel's ``[128, 8]`` float32 scaled queries, for values
    the row of the ``[128, 16]`` delta tile) and the 16 bits of ``value - dequantized code`` in the cache dtype (the
    CSR's delta, rounded once; bits 0-15); empty slots 0.
    ``None`` without outliers, when a row has more than :data:`MAX_SLOTS`, when a delta overflows the 16-bit
    format, when an index repeats or when the outliers are not on the codes' device. Built once per outlier tensor
    from the part's CSR and cached on the part, like the CSR. ``value``: the part is a pair's values (a 3-bit value
    part's channels sit at other accumulator rows, :func:`out_row`); key slots index the scaled queries, which are
    kept in the 2/4-bit value order."""
    if not spec.has_out or spec.odelta is None:
        return None
    return _slot_cache(spec, value)


def _prefix_len(rows: int) -> int:
    """Entries between plane 0 and plane 1 in :func:`outlier_slots`: the ``rows + 1`` prefix counts and the number of
    further planes, rounded up to even (the planes' slot pairs stay 8-byte aligned); the kernel's :func:`_plane1`
    computes the same."""
    return (rows + 3) // 2 * 2


def slot_views(ell: torch.Tensor, rows: int) -> tuple:
    """The pieces of :func:`outlier_slots`' tensor for a part of ``rows`` rows: plane 0 ``[rows, 2]``, the prefix
    counts ``[rows + 1]`` and the further planes ``[P - 1, rows, 2]`` (``None`` when no row has a third outlier)."""
    n = _prefix_len(rows)
    more = ell[2 * rows + n:]
    return (ell[:2 * rows].view(rows, 2), ell[2 * rows:2 * rows + rows + 1],
            more.view(-1, rows, 2) if more.numel() else None)


def out_row(c, bits: int = 2):
    """The accumulator row ``O^T [128, 8]`` that holds output channel ``c`` (the value chunk's channel order, module
    docstring): ``8 (c % 16) + c // 16``, for 3-bit values the inverse of :func:`v3_channel`; works on int tensors
    too."""
    if bits != 3:
        return 8 * (c % 16) + c // 16
    u = c - 80
    r = (c < 80) * (c // 10) + ((c >= 80) & (c < 120)) * (2 * (u // 10) + (u % 10) // 5) + (c >= 120) * (c - 120)
    t = (c < 80) * (c % 10) + ((c >= 80) & (c < 120)) * (10 + u % 5) + (c >= 120) * 15
    return 8 * t + r


def _slot_cache(spec, value: bool = False) -> torch.Tensor | None:
    """The slots of a part (:func:`outlier_slots`), built once per outlier tensor and row order (``value``: a 3-bit
    value part's accumulator rows) and cached on the part, one entry per order."""
    if not spec.has_out or spec.odelta is None or spec.scale.dtype not in (torch.float16, torch.bfloat16):
        return None
    part = spec.part
    rows_of = 3 if (value and spec.bits == 3) else 2  # the accumulator-row order of the slots' channels (out_row)
    raw = value and raw_values(spec.bits, spec.group, spec.scale.dtype == torch.bfloat16, MAX_SLOTS)
    # the cache key: the row order, or for raw values, whose deltas are in their rows' units, the part's exponent
    order = (spec.bits, _raw_exponent(spec)) if raw else rows_of
    cached = getattr(part, "_gluon_slots", None)
    if cached is not None and cached[0] is spec.oidx and order in cached[1]:
        return cached[1][order]
    sidx, ptr = spec.oidx.long(), spec.optr.long()
    delta = spec.odelta.to(spec.scale.dtype)
    # one host sync: the most outliers in a row, whether every delta fits the 16-bit format, and repeated indices
    # (the reference writes a repeated position once; slots would add its delta twice)
    most, finite, repeated = torch.stack([(ptr[1:] - ptr[:-1]).max(), torch.isfinite(delta).all().long(),
                                          (sidx[1:] == sidx[:-1]).any().long()]).tolist()
    ell = None
    if most <= MAX_SLOTS and finite and not repeated and spec.oidx.is_cuda == spec.data.is_cuda:
        planes = max(1, (most + 1) // 2)
        rows = spec.nrows
        row, ch = sidx // spec.d, sidx % spec.d
        pos = torch.arange(sidx.numel(), device=sidx.device) - ptr[row]
        rrow = out_row(ch, rows_of)
        if raw:  # delta 2^(E + pos - 24), rounded once
            delta = (spec.odelta.float() * torch.exp2((raw_vpos(rrow, spec.bits) + order[1] - 24).float())).to(
                delta.dtype)
        bits = delta.view(torch.int16).to(torch.int32) & 0xFFFF
        n = _prefix_len(rows)
        ell = torch.zeros(2 * rows + n + 2 * rows * (planes - 1), dtype=torch.int32, device=sidx.device)
        # plane p's slot j of row r at (p ? 2 rows + n + 2 rows (p - 1) : 0) + 2 r + j
        pl = pos // 2
        ell[(pl > 0) * (n + 2 * rows * pl) + 2 * row + pos % 2] = ((rrow.to(torch.int32) * 32) << 16) | bits
        extra = ((ptr[1:] - ptr[:-1]) > 2).to(torch.int32)  # rows with a third outlier or more
        ell[2 * rows + 1:2 * rows + 1 + rows] = torch.cumsum(extra, 0, dtype=torch.int32)
        ell[3 * rows + 1] = planes - 1
    try:
        built = cached[1] if cached is not None and cached[0] is spec.oidx else {}
        object.__setattr__(part, "_gluon_slots", (spec.oidx, {**built, order: ell}))
    except (AttributeError, TypeError):
        pass
    return ell


def _slots_of(spec, value: bool) -> int:
    """The kernel's outlier variant for a part: 0 without outliers; 4 with up to 4 slots per row (plane 1 behind one
    warp-uniform branch per half tile, :func:`_more`; one variant whether or not the part has a plane 1: a part
    without one has all-zero prefix counts, so the branch is never taken); :data:`MAX_SLOTS` with more (planes 1 ..
    behind the same branch, looped over by their number: a variant of its own, since the loops cost QAQ's default
    rows 3-6% on the H100)."""
    ell = outlier_slots(spec, value)
    if ell is None:
        return 0
    return 4 if ell.numel() <= 2 * spec.nrows + _prefix_len(spec.nrows) + 2 * spec.nrows else MAX_SLOTS


def pair_fits(k, v) -> bool:
    """Whether a K / V part pair (:class:`kernels.triton_tiles.PartSpec`) is in this kernel's scope."""
    from kernels.triton_tiles import CHANNEL, TOKEN

    # outliers: TokenQuant keys and values with at most MAX_SLOTS per row (the value corrections' shared buffer needs
    # the unstaged kernel, which TokenQuant keys get); looked at last (it builds the slots)
    # 3 bits: one scale per row (QAQ's parts, MiKV's low-precision tokens), TokenQuant keys; values also of 0 bits
    # (no codes: the group's zero) and 1 bit (most of QAQ's values at its default bounds)
    return (ENABLED and v.fmt == TOKEN and (k.bits in (2, 4) or (k.bits == 3 and k.fmt == TOKEN and k.group == 128))
            and (v.bits in (0, 1, 2, 4) or (v.bits == 3 and v.group == 128))
            and k.data.dtype == torch.int32 and (v.data.dtype == torch.int32 or v.bits == 0) and k.d == 128
            and v.d == 128
            and ((k.fmt == CHANNEL and k.group in (16, 32, 64, 128)) or (k.fmt == TOKEN and k.group in (32, 64, 128)))
            and v.group % 16 == 0 and v.group <= 128
            and (k.scale.dtype == torch.float16  # bf16: mul / sub .bf16x2 need sm_90
                 or (k.scale.dtype == torch.bfloat16 and k.scale.is_cuda and _major_cc(k.scale.device.index) >= 9))
            and all(t.dtype == k.scale.dtype and t.is_cuda for t in (k.scale, k.zero, v.scale, v.zero))
            and all(t.is_contiguous() for t in (k.data, k.scale, k.zero, v.data, v.scale, v.zero))
            # ChannelQuant scale / zero pairs are read as int32 words
            and (k.fmt != CHANNEL or (k.scale.data_ptr() % 4 == 0 and k.zero.data_ptr() % 4 == 0))
            and all(not sp.has_out or (k.fmt == TOKEN and outlier_slots(sp, sp is v) is not None) for sp in (k, v)))


@functools.cache
def _major_cc(index: int | None) -> int:
    return torch.cuda.get_device_capability(index)[0]


def prepare(plans, q) -> list:
    """What the launches of ``plans`` read that is computed on the device, per plan (for :func:`launch`'s ``ve``): the
    value part's exponent (:func:`value_exponent`) or None, all before the first launch, so a chain's later launches
    read nothing the chain computes (:func:`launch`). Under CUDA-graph capture an exponent not yet cached is computed
    in the graph (at each replay) and used by this call's launches only."""
    return [value_exponent(p.v) if supports(p, q) else None for p in plans]


def chained(plans, q) -> bool:
    """Whether the part pairs ``plans`` of one call launch as a chain (:func:`launch`'s ``chain``): several pairs, all
    served by this kernel, on a GPU with programmatic dependent launch (compute capability 9.0 or later), while a CUDA
    graph is captured. Each launch fills the GPU (its splits are one wave), so the next one's programs take the SMs
    that its tail frees, one kernel at a time on an SM but for the tails (three kernels resident on every SM for the
    whole call ran a third slower: kernels/NOTES.md, session 11). Eager calls, bound by the host's launches, launch
    one after another: on the H100 machine's host the chain cost them up to 33 us (4k, three pairs) and won nothing."""
    return (CHAIN and len(plans) > 1 and q.is_cuda and torch.cuda.is_current_stream_capturing()
            and all(supports(p, q) for p in plans) and _major_cc(q.device.index) >= 9)


def supports(plan, q) -> bool:
    """Whether :func:`launch` serves ``plan`` for queries ``q`` (see the module docstring for the scope)."""
    H, M, D = q.shape
    return (ENABLED and plan.gluon and q.is_cuda and q.dtype == plan.k.scale.dtype and D == 128 and M <= 8
            and torch.version.hip is None and os.environ.get("TRITON_INTERPRET") != "1")


def disable(exc: Exception) -> None:
    """Switch this kernel off for the process (the Triton kernel takes over), saying why once."""
    global ENABLED
    ENABLED = False
    warnings.warn(f"Gluon decode kernel disabled, using the Triton kernel: {type(exc).__name__}: {exc}", stacklevel=3)


_RESIDENT: dict = {}


def _consts(plan, want_scores: bool, m: int) -> dict:
    """Compile-time and launch options of ``plan``'s kernel for ``m`` query rows per KV head."""
    tok = key_tokenquant(plan.k)
    c = dict(K_BITS=plan.k.bits, K_GROUP=plan.k.group, V_BITS=plan.v.bits, V_GROUP=plan.v.group,
                UNIFORM=plan.uniform, WANT_SCORES=want_scores, STAGE_K=staged(plan.k.bits, tok),
                DYNAMIC=plan.counters is not None and dynamic_enabled(),
                BF16=plan.k.scale.dtype == torch.bfloat16, K_TOK=tok, K_OUT=_slots_of(plan.k, False),
                V_OUT=_slots_of(plan.v, True),
                K_RAW=raw_keys(plan.k.bits, plan.k.group, tok, plan.k.scale.dtype == torch.bfloat16),
                V_RAW=raw_values(plan.v.bits, plan.v.group, plan.v.scale.dtype == torch.bfloat16,
                                 _slots_of(plan.v, True)),
                K_CRAW=raw_channel_keys(plan.k.bits, plan.k.group, tok, plan.k.scale.dtype == torch.bfloat16, m,
                                        plan.v.bits, plan.v.group),
                K_TS=staged_rows(plan.k.bits, plan.k.group, tok, plan.v.bits, plan.v.group,
                                 plan.k.scale.dtype == torch.bfloat16, _slots_of(plan.k, False),
                                 _slots_of(plan.v, True)) and rows_stageable(plan),
                num_warps=1, maxnreg=MAXNREG)
    c["LATE"] = DRAW_LATE and c["DYNAMIC"] and (c["K_CRAW"] or c["K_TS"])
    return c


def key_tokenquant(kspec) -> bool:
    """Whether a pair's keys are TokenQuant (per-token groups of channels, as QAQ stores them) rather than
    ChannelQuant (KIVI's per-channel blocks of tokens)."""
    from kernels.triton_tiles import TOKEN

    return kspec.fmt == TOKEN


def staged(k_bits: int, k_tok: bool = False) -> bool:
    """Whether key tiles are staged in shared memory: 2-bit ChannelQuant keys (4 bits would take 32 KB per program,
    so 6 programs per SM instead of 12, measured slower; TokenQuant keys load straight into registers)."""
    return STAGE_K and k_bits == 2 and not k_tok


def dynamic_enabled() -> bool:
    """The dynamic schedule, unless switched off (``KV_GLUON_DYNAMIC=0``) or deterministic algorithms are asked for
    (``torch.use_deterministic_algorithms``; read at each launch): which program does which unit varies from run to
    run, and with it the rounding of the probabilities (relative output differences near 2.5e-4 between runs)."""
    return DYNAMIC and not torch.are_deterministic_algorithms_enabled()


def unit_halves(kspec) -> int:
    """Half tiles per unit of the dynamic schedule for keys ``kspec``: a whole tile when they are staged (a stage
    holds one tile; raw ChannelQuant keys stage half tiles, but their kernel depends on the query rows, so the plan's
    split count assumes whole tiles)."""
    return 2 if staged(kspec.bits, key_tokenquant(kspec)) else 1


def counters(n_heads: int, device: torch.device) -> torch.Tensor:
    """A plan's per-head unit counters (int32, zeroed here, on the current stream): every dynamic launch leaves them
    at 0 (:func:`_grab`), so the plan's launches, which run one after another, reuse them. Like the plan's other
    tensors they belong to the stream the plan is used on; two launches of one plan running at once on two streams
    would share them."""
    return torch.zeros(n_heads, dtype=torch.int32, device=device)


def resident_programs(plan) -> int:
    """One-warp programs of this pair's kernel that fit on an SM at once, from the compiled kernel's registers (each
    of the SM's 4 schedulers has 16K registers; a warp takes its per-thread count rounded up to 8, times 32) and
    shared memory (the SM's, less 1 KB reserved per program); compiled once per configuration. A plan whose kernel
    differs with the number of query rows (:func:`raw_channel_keys`) counts both kernels and takes the fewer."""
    if PROGRAMS_PER_SM:
        return PROGRAMS_PER_SM
    return min(_resident(plan, m) for m in {_consts(plan, False, m)["K_CRAW"]: m for m in (4, 8)}.values())


def _resident(plan, m: int) -> int:
    """:func:`resident_programs` of the kernel that launches for ``m`` query rows."""
    consts = _consts(plan, False, m)
    key = tuple(consts.items())
    if key not in _RESIDENT:
        kern = _kivi_attn_kernel.warmup(*_warmup_args(plan), grid=(1,), **consts)
        _check_smem(kern, _slots_of(plan.k, False) + _slots_of(plan.v, True) > 0)
        kern._init_handles()
        regs = max(int(kern.n_regs), 1)
        # each of the 4 schedulers of an SM owns a quarter of the register file (16K): a warp needs
        # regs (rounded up to 8) x 32 of it; shared memory: 1 KB reserved per resident program
        by_regs = 4 * (16384 // (-(-regs // 8) * 8 * 32))
        props = torch.cuda.get_device_properties(plan.k.data.device)
        smem = getattr(props, "shared_memory_per_multiprocessor", 228 * 1024)  # 228 KB on the H100 / H200
        by_smem = smem // (int(kern.metadata.shared) + 1024)
        _RESIDENT[key] = max(1, min(32, by_regs, by_smem))
    return _RESIDENT[key]


def _warmup_args(plan) -> tuple:
    """The kernel's runtime arguments for :func:`resident_programs`' warmup build, typed like :func:`launch`'s:
    uniform plans pass the float32 lse buffer for the unused meta pointer (a different type here compiled a second
    kernel just to count its registers)."""
    meta = torch.int64 if plan.meta is not None else torch.float32
    return (plan.k.scale.dtype, torch.float32, torch.float32, torch.float32, plan.k.data, plan.k.scale, plan.k.zero,
            plan.v.data, plan.v.scale, plan.v.zero, meta, *plan.scalars, plan.k.nrows, plan.v.nrows, 4, 0, 0, 0, 2, 0,
            2, 2, 1.0, torch.float32, torch.int32, torch.int32, torch.int32)


def _ve_arg(spec, lse_p: torch.Tensor) -> torch.Tensor:
    """The kernel's ``ve_ptr``: the value part's exponent (:func:`value_exponent`), or for parts without the raw value
    path (not read) the float32 lse buffer."""
    ve = value_exponent(spec)
    return lse_p if ve is None else ve


def _launch_args(q, plan, out_p, lse_p, scores, split_off: int, s_total: int, scale: float, lq: int,
                 ve: torch.Tensor | None = None) -> tuple:
    """The kernel's runtime arguments for one launch of ``plan`` (``ve``: its value exponent from :func:`prepare`)."""
    M = q.shape[1]
    want = scores is not None
    return (q, out_p, lse_p, scores if want else lse_p, plan.k.data, plan.k.scale, plan.k.zero,
            plan.v.data, plan.v.scale, plan.v.zero, plan.meta if plan.meta is not None else lse_p, *plan.scalars,
            plan.k.nrows, plan.v.nrows, M, scores.shape[-1] if want else 0, plan.col_base, plan.newr, lq, split_off,
            s_total, plan.nsplit, float(scale), ve if ve is not None else _ve_arg(plan.v, lse_p),
            plan.counters if plan.counters is not None else plan.k.data,
            _ell_arg(plan.k, False, plan.k.data), _ell_arg(plan.v, True, plan.k.data))


def launch(q, plan, out_p, lse_p, scores, split_off: int, s_total: int, scale: float, lq: int,
           chain: int = 0, *, ve: torch.Tensor | None = None) -> None:
    """One launch over all heads x splits of ``plan`` (same outputs as the Triton split kernel). ``chain``: 0 alone;
    1 the first and 2 a later launch of a chain of part pairs on one stream (:func:`chained`): every launch of a
    chain lets the next one start its programs in its own tail, a later one is launched as a programmatic dependent
    of the one before (it may start before that one ends: it reads nothing the chain writes) and no program of it
    ends before the one before has ended, so whatever follows the last launch sees every launch's partials."""
    H = q.shape[0]
    consts = _consts(plan, scores is not None, q.shape[1])
    if chain:
        consts = {**consts, "PDL": True, "launch_pdl": chain == 2}
    args = _launch_args(q, plan, out_p, lse_p, scores, split_off, s_total, scale, lq, ve)
    if consts["K_OUT"] + consts["V_OUT"] > 0:  # each outlier variant's shared memory, before its first launch
        key = tuple(consts.items())
        if key not in _CHECKED:
            _check_smem(_kivi_attn_kernel.warmup(*args, grid=(H, plan.nsplit), **consts), True)
            _CHECKED.add(key)
    fast_launch.launch(_kivi_attn_kernel, (H, plan.nsplit), args, consts)


_CHECKED: set = set()


def _ell_arg(spec, value: bool, words: torch.Tensor) -> torch.Tensor:
    """A part's outlier slots, or, when it has none, ``words`` (the pair's int32 key words; not read): int32 like the
    slots and like :func:`resident_programs`' warmup, so that a 0-bit value part, whose ``data`` is its fp16 zeros,
    compiles no second kernel."""
    ell = outlier_slots(spec, value)
    return words if ell is None else ell


def _check_smem(kern, outliers: bool) -> None:
    """With outliers the kernel's buffers (value-delta tiles and scaled queries) must be its only shared memory (so at
    offset 0: the kernel addresses them from the shared window's base): one allocation, and the kernel's shared
    memory is its 16 KB."""
    if not outliers:
        return
    allocs = kern.asm["ttgir"].count("ttg.local_alloc")
    if allocs != 1 or int(kern.metadata.shared) != OUT_SMEM:
        raise RuntimeError(f"outlier buffers: expected one {OUT_SMEM}-byte shared allocation, got {allocs} "
                           f"allocation(s), {kern.metadata.shared} bytes")


OUT_SMEM = 512 * 8 * 4  # the outlier buffers' bytes (_kivi_attn_kernel's obuf)


def compile_offline(k_bits: int = 2, v_bits: int = 2, k_group: int = 32, v_group: int = 32, arch: int = 90,
                    want_scores: bool = False, dynamic: bool = True, bf16: bool = False, k_tok: bool = False,
                    k_out: int = 0, v_out: int = 0, m: int = 4, pdl: bool = False):
    """Build the kernel for an NVIDIA target without a GPU, with the runtime's options (how CI checks that it still
    compiles: the layout conversions are asserted trivial at build time); ``pdl``: the code of a chained launch
    (:func:`launch`'s ``chain``). Returns the compiled kernel
    (``.asm["ptx"]``, ``["cubin"]``)."""
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.experimental.gluon._runtime import GluonASTSource

    h = "*bf16" if bf16 else "*fp16"
    sig = dict(q_ptr=h, out_ptr="*fp32", lse_ptr="*fp32", s_ptr="*fp32", k_data="*i32", k_scale=h, k_zero=h,
               v_data="*i32", v_scale=h, v_zero=h, meta_ptr="*i64")
    sig.update({n: "i32" for n in ("KB0", "KHS", "VB0", "VHS", "CNT", "COL0", "k_nrows", "v_nrows", "M", "NMAX",
                                   "COLBASE", "NEWR", "LQ", "SPLIT_OFF", "S_TOTAL", "NSPLIT")})
    sig["sm_scale"] = "fp32"
    sig["ve_ptr"] = "*fp32"
    sig.update(ctr_ptr="*i32", k_ell="*i32", v_ell="*i32")
    const = dict(K_BITS=k_bits, K_GROUP=k_group, V_BITS=v_bits, V_GROUP=v_group, UNIFORM=False,
                 WANT_SCORES=want_scores, STAGE_K=staged(k_bits, k_tok), DYNAMIC=dynamic, BF16=bf16, K_TOK=k_tok,
                 K_OUT=k_out, V_OUT=v_out, K_RAW=raw_keys(k_bits, k_group, k_tok, bf16),
                 V_RAW=raw_values(v_bits, v_group, bf16, v_out),
                 K_CRAW=raw_channel_keys(k_bits, k_group, k_tok, bf16, m, v_bits, v_group),
                 K_TS=staged_rows(k_bits, k_group, k_tok, v_bits, v_group, bf16, k_out, v_out))
    const["LATE"] = DRAW_LATE and dynamic and (const["K_CRAW"] or const["K_TS"])
    const["PDL"] = pdl
    sig.update({k: "constexpr" for k in const})
    # pointer arguments 16-byte aligned, as the runtime specialises them (16-byte cp.async needs it)
    names = _kivi_attn_kernel.arg_names
    attrs = {(names.index(n),): [["tt.divisibility", 16]] for n, t in sig.items() if t.startswith("*")}
    src = GluonASTSource(_kivi_attn_kernel, sig, const, attrs)
    kern = triton.compile(src, target=GPUTarget("cuda", arch, 32), options=dict(num_warps=1, maxnreg=MAXNREG))
    _check_smem(kern, k_out + v_out > 0)
    return kern
