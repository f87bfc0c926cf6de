"""Where a decode step's time goes: ``latentattn bench generate --profile FILE``.

A batch-1 prompt of ``context`` tokens is prefilled, a few decode steps warm up, then
``steps`` more run under ``torch.profiler``; the table groups the operators by input shape, so
each weight's GEMV and each layer's attention read show as their own rows (the profile behind
the fp32 decode speed-ups, measured with this command: SmolLM2-135M's fp32 decode at 2k tokens
spent 64% of its time in ``aten::mm`` at about 12 GB/s, and 22% in SDPA over a token-major K/V cache)."""

from __future__ import annotations

import torch
from torch.profiler import ProfilerActivity, profile

from latentattn.model.transformer import Transformer

__all__ = ["profile_decode"]


@torch.no_grad()
def profile_decode(model: Transformer, prompt: torch.Tensor, steps: int = 8, warmup: int = 3,
                   rows: int = 25) -> str:
    """The profiler's table (``rows`` operators by self CPU time) over ``steps`` decode steps
    after ``prompt`` (1, T) and ``warmup`` untimed ones, with the milliseconds per step."""
    cache = model.make_cache(1, prompt.shape[1] + warmup + steps)
    last = torch.full((1,), prompt.shape[1] - 1, device=prompt.device)
    tok = model(prompt, cache, logits_at=last).argmax(-1, keepdim=True)
    for _ in range(warmup):
        tok = model(tok, cache)[:, -1].argmax(-1, keepdim=True)
    with profile(activities=[ProfilerActivity.CPU], record_shapes=True) as prof:
        for _ in range(steps):
            tok = model(tok, cache)[:, -1].argmax(-1, keepdim=True)
    events = prof.key_averages(group_by_input_shape=True)
    total_ms = sum(e.self_cpu_time_total for e in events) / 1e3
    head = (f"{steps} decode steps after {prompt.shape[1]:,} tokens: {total_ms / steps:.1f} ms of "
            f"operator time a step (self CPU, profiled)\n")
    return head + events.table(sort_by="self_cpu_time_total", row_limit=rows,
                               max_name_column_width=48, max_shapes_column_width=60)
