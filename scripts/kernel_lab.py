"""Kernel lab: where the time of packed decode attention goes (CUDA only; not used by the harness).

    python3 scripts/kernel_lab.py [--T 32768] [--bits 2,4] [--quick]

A stripped-down KIVI decode kernel (ChannelQuant keys, TokenQuant values, every head the same length, whole
tiles) that can stop after each stage (MODE 0 load words + scales, 1 + expand codes, 2 + dequantize, 3 full
attention), with the orientation (ORIENT 0: queries are the MMA's M; 1: tokens are, which lets Triton use wgmma with
4 warps), the code -> fp16 conversion (MAGIC 0: int-to-float; 1: or-ing the code into fp16 1024.0 per element;
2: the inline-PTX pairs of ``kernels.triton_tiles.pair_dequant``) and the launch shape as parameters. Prints time,
fraction of the copy bandwidth, speed-up over SDPA, error against the production kernel, registers and spills.
Results and what they showed: kernels/NOTES.md.
"""

from __future__ import annotations

import argparse
import itertools
import math
import sys

import torch
import triton
import triton.language as tl

sys.path.insert(0, ".")

from kernels.triton_tiles import expand_codes, pair_dequant  # noqa: E402


@triton.jit
def _to_f16(c, MAGIC: tl.constexpr):
    if MAGIC:
        # 0x6400 is fp16 1024.0; or-ing a code < 1024 into its mantissa gives 1024 + code exactly (no I2F)
        return (c | 0x6400).to(tl.int16).to(tl.float16, bitcast=True) - 1024.0
    else:
        return c.to(tl.float16)


@triton.jit
def lab_kernel(q_ptr, out_ptr, lse_ptr, kw, ks, kz, vw, vs, vz, T, NSPLIT, sm_scale,
               D: tl.constexpr, M: tl.constexpr, BM: tl.constexpr, BN: tl.constexpr,
               KBITS: tl.constexpr, KG: tl.constexpr, KPER: tl.constexpr, KWPR: tl.constexpr,
               VBITS: tl.constexpr, VG: tl.constexpr, VPER: tl.constexpr, VWPR: tl.constexpr,
               MODE: tl.constexpr, MAGIC: tl.constexpr, ORIENT: tl.constexpr):
    h = tl.program_id(0)
    sp = tl.program_id(1)
    ntiles = T // BN
    tps = tl.cdiv(ntiles, NSPLIT)
    lo = sp * tps
    hi = tl.minimum(lo + tps, ntiles)
    offs_m = tl.arange(0, BM)
    offs_d = tl.arange(0, D)
    q = tl.load(q_ptr + (h * M + offs_m[:, None]) * D + offs_d[None, :], mask=(offs_m < M)[:, None], other=0.0)
    NBK: tl.constexpr = BN // KG
    NG: tl.constexpr = D // VG
    qk_scale = sm_scale * 1.4426950408889634
    if ORIENT == 0:
        m_i = tl.full([BM], float("-inf"), tl.float32)
        l_i = tl.zeros([BM], tl.float32)
        acc = tl.zeros([BM, D], tl.float32)
    else:
        qt = tl.trans(q)
        m_i = tl.full([BM], float("-inf"), tl.float32)
        l_i = tl.zeros([BM], tl.float32)
        acc = tl.zeros([D, BM], tl.float32)
    chk = tl.zeros([D], tl.float32)
    for t in range(lo, hi):
        r0 = (h * T + t * BN).to(tl.int64)
        kb = r0 // KG + tl.arange(0, NBK)
        kwt = tl.load(kw + ((kb[:, None, None] * D + offs_d[None, :, None]) * KWPR
                            + tl.arange(0, KWPR)[None, None, :]))  # [NBK, D, KWPR]
        ksc = tl.load(ks + kb[:, None] * D + offs_d[None, :])  # [NBK, D]
        kzr = tl.load(kz + kb[:, None] * D + offs_d[None, :])
        rows = r0 + tl.arange(0, BN)
        vwt = tl.load(vw + rows[:, None] * VWPR + tl.arange(0, VWPR)[None, :])  # [BN, VWPR]
        vsc = tl.load(vs + rows[:, None] * NG + tl.arange(0, NG)[None, :])  # [BN, NG]
        vzr = tl.load(vz + rows[:, None] * NG + tl.arange(0, NG)[None, :])
        if MODE == 0:
            x = tl.sum(tl.reshape(kwt, (NBK * D, KWPR)), 1).to(tl.float32)
            y = tl.sum(vwt, 1).to(tl.float32)
            chk += tl.sum(tl.reshape(x, (NBK, D)), 0) + tl.sum(ksc.to(tl.float32) + kzr.to(tl.float32), 0)
            chk += tl.sum(y) + tl.sum(tl.sum(vsc.to(tl.float32) + vzr.to(tl.float32), 1))
        else:
            if MAGIC == 2:
                kx = tl.reshape(pair_dequant(kwt, tl.broadcast_to(ksc[:, :, None], (NBK, D, KWPR)),
                                             tl.broadcast_to(kzr[:, :, None], (NBK, D, KWPR)), KBITS), (NBK, D, KG))
                WPG: tl.constexpr = VWPR // NG
                vw3 = tl.reshape(vwt, (BN, NG, WPG))
                vx = tl.reshape(pair_dequant(vw3, tl.broadcast_to(vsc[:, :, None], (BN, NG, WPG)),
                                             tl.broadcast_to(vzr[:, :, None], (BN, NG, WPG)), VBITS), (BN, D))
            kc = tl.reshape(expand_codes(tl.reshape(kwt, (NBK * D, KWPR)), KBITS, KPER), (NBK, D, KG))
            vc = expand_codes(vwt, VBITS, VPER)  # [BN, D]
            if MODE == 1:
                chk += tl.sum(tl.sum(kc, 2), 0).to(tl.float32) + tl.sum(vc, 0).to(tl.float32)
            else:
                if MAGIC < 2:
                    kx = _to_f16(kc, MAGIC) * ksc[:, :, None] + kzr[:, :, None]  # [NBK, D, KG] fp16
                    vx = tl.reshape(tl.reshape(_to_f16(vc, MAGIC), (BN, NG, VG)) * vsc[:, :, None] + vzr[:, :, None],
                                    (BN, D))
                if MODE == 2:
                    chk += tl.sum(tl.sum(kx.to(tl.float32), 2), 0) + tl.sum(vx.to(tl.float32), 0)
                elif ORIENT == 0:
                    kt = tl.reshape(tl.permute(kx, (1, 0, 2)), (D, BN))
                    s = tl.dot(q, kt) * qk_scale  # [BM, BN]
                    m_new = tl.maximum(m_i, tl.max(s, 1))
                    alpha = tl.exp2(m_i - m_new)
                    p = tl.exp2(s - m_new[:, None])
                    l_i = l_i * alpha + tl.sum(p, 1)
                    acc = acc * alpha[:, None] + tl.dot(p.to(tl.float16), vx)
                    m_i = m_new
                else:
                    kk = tl.reshape(tl.permute(kx, (0, 2, 1)), (BN, D))
                    s = tl.dot(kk, qt) * qk_scale  # [BN, BM]
                    m_new = tl.maximum(m_i, tl.max(s, 0))
                    alpha = tl.exp2(m_i - m_new)
                    p = tl.exp2(s - m_new[None, :])
                    l_i = l_i * alpha + tl.sum(p, 0)
                    acc = acc * alpha[None, :] + tl.dot(tl.trans(vx), p.to(tl.float16))
                    m_i = m_new
    row = (h * NSPLIT + sp) * M + offs_m
    if MODE < 3:
        tl.store(out_ptr + row[:, None] * D + offs_d[None, :], tl.broadcast_to(chk[None, :], (BM, D)),
                 mask=(offs_m < M)[:, None])
    else:
        if ORIENT == 1:
            acc = tl.trans(acc)
        out = acc / l_i[:, None]
        tl.store(out_ptr + row[:, None] * D + offs_d[None, :], out, mask=(offs_m < M)[:, None])
        tl.store(lse_ptr + row, (m_i + tl.log2(l_i)) * 0.6931471805599453, mask=offs_m < M)


def run_lab(q, parts, T, nsplit, bn, warps, stages, mode, magic, orient):
    kp, vp = parts
    H, M, D = q.shape
    out = torch.empty(H * nsplit * M, D, device=("cuda" if torch.cuda.is_available() else "cpu"), dtype=torch.float32)
    lse = torch.empty(H * nsplit * M, device=("cuda" if torch.cuda.is_available() else "cpu"), dtype=torch.float32)
    kb, vb = kp.nbits, vp.nbits
    ck = lab_kernel[(H, nsplit)](q, out, lse, kp.words, kp.scale, kp.zero, vp.words, vp.scale, vp.zero, T, nsplit,
                            D ** -0.5, D=D, M=M, BM=16, BN=bn, KBITS=kb, KG=kp.group, KPER=32 // kb,
                            KWPR=kp.words.shape[2], VBITS=vb, VG=vp.group, VPER=32 // vb, VWPR=vp.words.shape[1],
                            MODE=mode, MAGIC=magic, ORIENT=orient, num_warps=warps, num_stages=stages)
    return out, lse, ck


def merged(out, lse, H, nsplit, M, D):
    o = out.view(H, nsplit, M, D)
    s = lse.view(H, nsplit, M)
    w = torch.softmax(s, 1)
    return torch.where(w[..., None] > 0, o * w[..., None], 0.0).sum(1)


def main(argv=None):
    from triton.testing import do_bench

    from kernels.bench import build_cases, copy_bandwidth, part_bytes

    ap = argparse.ArgumentParser()
    ap.add_argument("--T", type=int, default=32768)
    ap.add_argument("--bits", default="2,4")
    for name, default in (("modes", "3"), ("bn", "32,64,128"), ("warps", "1,2,4,8"), ("stages", "2,3"),
                          ("pps", "16"), ("magic", "0,1"), ("orient", "0,1")):
        ap.add_argument("--" + name, default=default)
    a = ap.parse_args(argv)
    B, hkv, hq, D, T = 8, 8, 32, 128, a.T
    H, M = B * hkv, hq // hkv
    bw = copy_bandwidth() if torch.cuda.is_available() else 3e12
    data = build_cases(B, hkv, T, D)
    k, v = data["k"], data["v"]
    q = torch.randn(H, M, D, device=("cuda" if torch.cuda.is_available() else "cpu"), dtype=torch.float16)
    sdpa = do_bench(lambda: torch.nn.functional.scaled_dot_product_attention(
        q.view(B, hkv * M, 1, D), k.view(B, hkv, T, D), v.view(B, hkv, T, D), enable_gqa=True), return_mode="median")
    print(f"# copy {bw / 1e9:.0f} GB/s; sdpa {sdpa * 1e3:.1f} us", flush=True)
    sms = torch.cuda.get_device_properties(0).multi_processor_count
    for bits in [int(b) for b in a.bits.split(",")]:
        kp, vp, _ = data["cases"][f"kivi-{bits}bit"][0]
        nbytes = part_bytes(kp) + part_bytes(vp)
        print(f"## kivi-{bits}bit bytes {nbytes / 1e6:.1f} MB floor {nbytes / bw * 1e6:.1f} us", flush=True)
        from kernels.bench import plans_for
        from kernels.triton_attention import attend_pairs

        ref = attend_pairs(q, plans_for(data["cases"][f"kivi-{bits}bit"], q.device), D ** -0.5)[0]
        grid = []
        for mode in [int(x) for x in a.modes.split(",")]:
            for bn, warps, stages, pps, magic, orient in itertools.product(*(
                    [int(x) for x in getattr(a, n).split(",")] for n in ("bn", "warps", "stages", "pps", "magic",
                                                                       "orient"))):
                if mode < 2 and magic == 2:
                    continue
                if (bn <= 32 and warps > 4) or (bn >= 128 and warps == 1) or (mode < 3 and orient):
                    continue
                if mode < 2 and magic:
                    continue
                grid.append((bn, warps, stages, pps, mode, magic, orient))
        for bn, warps, stages, pps, mode, magic, orient in grid:
            nsplit = max(1, min(T // bn, math.ceil(pps * sms / H)))
            try:
                out, lse, ck = run_lab(q, (kp, vp), T, nsplit, bn, warps, stages, mode, magic, orient)
                err = ""
                if mode == 3:
                    o = merged(out, lse, H, nsplit, M, D)
                    err = f" rel_err={((o - ref).norm() / ref.norm()).item():.2e}"
                args = (q, (kp, vp), T, nsplit, bn, warps, stages, mode, magic, orient)
                ms = do_bench(lambda args=args: run_lab(*args), warmup=10, rep=50, return_mode="median")
            except Exception as e:
                print(f"BN={bn} w={warps} st={stages} pps={pps} mode={mode} magic={magic} orient={orient}: "
                      f"{type(e).__name__} {str(e)[:120]}", flush=True)
                continue
            print(f"BN={bn:3d} w={warps} st={stages} pps={pps:2d} mode={mode} magic={magic} orient={orient}: "
                  f"{ms * 1e3:7.1f} us  {nbytes / (ms * 1e-3) / bw:.2f} copyBW  speedup {sdpa / ms:.2f}{err} "
                  f"regs={ck.n_regs} spills={ck.n_spills}",
                  flush=True)


if __name__ == "__main__":
    main()
