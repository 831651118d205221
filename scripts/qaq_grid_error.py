"""Reconstruction error of QAQ's two quantizer grids on real keys and values (explains the key-vs-value sweep).

Runs one RULER prompt through the embedded model with a plain fp16-equivalent cache (CPU, fp32), takes every layer's
post-RoPE keys and its values, quantizes each (token, layer, KV head) group of head_dim channels at 1-8 bits with
``mode=faithful`` (the reference code: mean-centred grid, step R/2^n, clamped) and ``mode=fixed`` (min/scale
grid), no outliers, and prints the relative error ||X - X_hat|| / ||X|| and, for the faithful grid, the share of
elements above its largest level (clipped whatever the bit width).

    python scripts/qaq_grid_error.py [--task niah_single_1] [--length 4k]
"""

from __future__ import annotations

import argparse

import torch

from harness import models
from harness.config import parse_lengths
from harness.protocol import build_prompt
from methods.qaq_quant import quantize_groups
from tasks.registry import resolve_tasks


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--task", default="niah_single_1")
    ap.add_argument("--length", default="4k")
    a = ap.parse_args()
    lm = models.load(None)
    (task,) = resolve_tasks(a.task)
    (length,) = parse_lengths(a.length)
    sample = task.generate(lm.tokenizer, length, 0, 0)
    prompt = build_prompt(lm.tokenizer, sample.context, [(q.text, q.answer_prefix) for q in sample.questions])
    ids = torch.tensor([prompt.context])
    with torch.no_grad():
        pkv = lm.model(ids, use_cache=True).past_key_values
    rows = {"K": [], "V": []}
    for layer in pkv.layers:
        rows["K"].append(layer.keys[0].reshape(-1, layer.keys.shape[-1]).half().float())
        rows["V"].append(layer.values[0].reshape(-1, layer.values.shape[-1]).half().float())
    print(f"# {a.task} at {length} tokens ({ids.shape[1]} context tokens), {len(pkv.layers)} layers")
    print("| tensor | bits | faithful rel. error | fixed rel. error | faithful: elements above top level |")
    print("|---|---|---|---|---|")
    for name, xs in rows.items():
        x = torch.cat(xs)
        for b in range(1, 9):
            bits = torch.full((x.shape[0],), b, dtype=torch.int64)
            err = {}
            for mode in ("faithful", "fixed"):
                q = quantize_groups(x, bits, 0.0, mode)
                err[mode] = float((q.fake - x).norm() / x.norm())
            mu = x.mean(1, keepdim=True)
            top = mu + (2 ** (b - 1) - 0.5) * (x.amax(1, keepdim=True) - x.amin(1, keepdim=True)) / 2 ** b
            clipped = float((x > top).float().mean())
            print(f"| {name} | {b} | {err['faithful']:.4f} | {err['fixed']:.4f} | {clipped:.2%} |")


if __name__ == "__main__":
    main()
