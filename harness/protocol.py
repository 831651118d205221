"""The evaluation protocol (kvpress's, made explicit; DESIGN.md "The evaluation protocol").

1. The prompt is built with the model's chat template when it has one: context part + question part.
2. The context is prefilled; each layer's cache is compressed by the method right after that layer's prefill.
3. Greedy decoding against the compressed cache with explicit (true) position ids and all EOS ids of the model;
   the question tokens and every generated token go through the method too.
4. ``query_aware`` puts the question inside the compressed part (one prefill of context + question).
5. Several questions on one context reuse one compressed cache: it is snapshotted after the context and restored
   before each further question.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from harness.measure import Timer
from methods.attention import register
from methods.cache import CompressedCache


@dataclass
class PromptParts:
    context: list[int]  # token ids of the compressible part (template header + context)
    questions: list[list[int]]  # per question: question + template footer + answer prefix


def build_prompt(tokenizer, context: str, questions: list[tuple[str, str]], query_aware: bool = False) -> PromptParts:
    """Split a templated prompt into the context part and one question part per ``(question, answer_prefix)``."""
    parts: list[list[int]] = []
    ctx_ids: list[int] | None = None
    for text, prefix in questions:
        if getattr(tokenizer, "chat_template", None):
            full = tokenizer.apply_chat_template([{"role": "user", "content": context + text}], tokenize=False,
                                                 add_generation_prompt=True)
            cut = full.index(context) + len(context)
            head, tail = full[:cut], full[cut:] + prefix
            special = False
        else:
            head, tail, special = context, text + prefix, True
        ids_head = tokenizer(head, add_special_tokens=special).input_ids
        ids_tail = tokenizer(tail, add_special_tokens=False).input_ids
        if query_aware:
            ids_head, ids_tail = ids_head + ids_tail, []
        if ctx_ids is None or query_aware:
            ctx_ids = ids_head
        parts.append(ids_tail if not query_aware else ids_head)
    if query_aware:
        return PromptParts([], parts)
    return PromptParts(ctx_ids or [], parts)


def eos_ids(model, tokenizer) -> set[int]:
    """Every EOS id the model declares (generation config and tokenizer)."""
    out: set[int] = set()
    for src in (getattr(model, "generation_config", None), model.config, tokenizer):
        e = getattr(src, "eos_token_id", None)
        if e is None:
            continue
        out.update(e if isinstance(e, (list, tuple)) else [e])
    return out


@dataclass
class Answer:
    text: str
    tokens: int
    ttft_s: float  # prefill (+ compression) + question + first token
    tpot_s: float | None  # mean time per later output token
    kv_bytes_prefill: int
    stats_prefill: dict
    stats_end: dict


def cache_stats(cache: CompressedCache) -> dict:
    """Memory facts of a cache right now (bytes of real tensors)."""
    return {"kv_bytes": cache.nbytes(), "aux_bytes": cache.aux_bytes(), "kept_rows": cache.kept_rows(),
            "seen_rows": cache.seen_rows(), "n_outliers": cache.n_outliers()}


class Session:
    """Runs the protocol for one model and method."""

    def __init__(self, model, tokenizer, method, kv_dtype: torch.dtype, seed: int = 0):
        self.model = model
        self.tok = tokenizer
        self.method = method
        self.kv_dtype = kv_dtype
        self.seed = seed
        self.device = next(model.parameters()).device
        self.eos = eos_ids(model, tokenizer)
        model.set_attn_implementation(register())

    def _forward(self, cache, ids: list[int], start: int) -> torch.Tensor:
        x = torch.tensor([ids], device=self.device)
        pos = torch.arange(start, start + len(ids), device=self.device)[None]
        return self.model(x, past_key_values=cache, position_ids=pos, use_cache=True, logits_to_keep=1).logits[0, -1]

    @torch.no_grad()
    def run(self, prompt: PromptParts, max_new_tokens: int) -> list[Answer]:
        """Answer every question of a prompt; returns one :class:`Answer` per question."""
        timer = Timer(self.device)
        answers = []
        cache = CompressedCache(self.model.config, self.method, self.kv_dtype, self.device, self.seed)
        ctx_len = len(prompt.context)
        snap = None
        t_ctx = 0.0
        ctx_stats: dict = {}
        if ctx_len:
            with timer.span() as t:
                self._forward(cache, prompt.context, 0)
            t_ctx = t.seconds
            ctx_stats = cache_stats(cache)
            if len(prompt.questions) > 1:
                snap = cache.snapshot()
        for i, q_ids in enumerate(prompt.questions):
            if i and snap is not None:
                cache.restore(snap)
            elif i:  # query-aware: a fresh prefill per question
                cache = CompressedCache(self.model.config, self.method, self.kv_dtype, self.device, self.seed)
            with timer.span() as t:
                logits = self._forward(cache, q_ids, ctx_len)
                tok = int(logits.argmax())
            stats_prefill = ctx_stats if ctx_len else cache_stats(cache)
            ttft = t_ctx + t.seconds
            out = [tok]
            pos = ctx_len + len(q_ids)
            steps = []
            while tok not in self.eos and len(out) < max_new_tokens:
                with timer.span() as t:
                    tok = int(self._forward(cache, [tok], pos).argmax())
                steps.append(t)
                out.append(tok)
                pos += 1
            timer.sync()
            text_ids = [x for x in out if x not in self.eos]
            tpot = sum(s.seconds for s in steps) / len(steps) if steps else None
            answers.append(Answer(self.tok.decode(text_ids, skip_special_tokens=True), len(out), ttft, tpot,
                                  stats_prefill["kv_bytes"], stats_prefill, cache_stats(cache)))
        self.last_cache = cache
        return answers
