"""Tiny random Llama models and a minimal prefill+decode loop through the compressed cache (tests only)."""

from __future__ import annotations

import torch
from transformers import LlamaConfig, LlamaForCausalLM

from methods.attention import register
from methods.cache import CompressedCache


def tiny_llama(n_heads: int = 4, n_kv_heads: int = 2, layers: int = 2, head_dim: int = 16, seed: int = 0,
               attn: str = "sdpa") -> LlamaForCausalLM:
    """A random Llama from a config (no download); fp32, eval mode."""
    torch.manual_seed(seed)
    cfg = LlamaConfig(vocab_size=128, hidden_size=n_heads * head_dim, intermediate_size=4 * n_heads * head_dim,
                      num_hidden_layers=layers, num_attention_heads=n_heads, num_key_value_heads=n_kv_heads,
                      max_position_embeddings=4096, attn_implementation=attn)
    return LlamaForCausalLM(cfg).eval()


@torch.no_grad()
def run_cache(model, method, ids: torch.Tensor, n_decode: int = 0, kv_dtype=torch.float32,
              tokens: list[int] | None = None, chunk: list[int] | None = None
              ) -> tuple[CompressedCache, list[torch.Tensor]]:
    """Prefill ``ids [1, T]`` through a compressed cache, then feed ``chunk`` (several tokens in one forward, like a
    question after a compressed context) if given, then decode ``n_decode`` tokens (greedy, or ``tokens``).

    Returns the cache and the logits of every forward (prefill first).
    """
    model.set_attn_implementation(register())
    cache = CompressedCache(model.config, method, kv_dtype, ids.device)
    T = ids.shape[1]
    out = model(ids, past_key_values=cache, position_ids=torch.arange(T, device=ids.device)[None],
                use_cache=True)
    logits = [out.logits]
    if chunk:
        pos = torch.arange(T, T + len(chunk), device=ids.device)[None]
        out = model(torch.tensor([chunk], device=ids.device), past_key_values=cache, position_ids=pos, use_cache=True)
        logits.append(out.logits)
        T += len(chunk)
    for i in range(n_decode):
        nxt = tokens[i] if tokens is not None else int(logits[-1][0, -1].argmax())
        out = model(torch.tensor([[nxt]], device=ids.device), past_key_values=cache,
                    position_ids=torch.tensor([[T + i]], device=ids.device), use_cache=True)
        logits.append(out.logits)
    return cache, logits
