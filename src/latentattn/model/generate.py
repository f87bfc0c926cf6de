"""Autoregressive generation with (default) or without the KV cache."""

from __future__ import annotations

import torch

from latentattn.errors import LatentAttnError
from latentattn.model.transformer import Transformer

CAPACITY_STEP = 256  # a compiled model's cache capacity is a multiple of this (generate)


def sample(
    logits: torch.Tensor, temperature: float = 0.0, top_p: float = 1.0, top_k: int = 0,
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """logits (B, V) -> token ids (B,). temperature 0 is greedy (argmax)."""
    if temperature <= 0:
        return logits.argmax(dim=-1)
    logits = logits.float() / temperature
    if top_k > 0:
        kth = logits.topk(min(top_k, logits.shape[-1]), dim=-1).values[:, -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p < 1.0:
        sorted_logits, order = logits.sort(dim=-1, descending=True)
        probs = sorted_logits.softmax(dim=-1)
        # Drop a token when the mass before it already reaches top_p (the first always stays).
        drop = probs.cumsum(dim=-1) - probs >= top_p
        sorted_logits = sorted_logits.masked_fill(drop, float("-inf"))
        logits = torch.full_like(logits, float("-inf")).scatter(1, order, sorted_logits)
    probs = logits.softmax(dim=-1)
    return torch.multinomial(probs, 1, generator=generator).squeeze(1)


@torch.no_grad()
def generate(
    model: Transformer, input_ids: torch.Tensor, max_new_tokens: int, temperature: float = 0.0,
    top_p: float = 1.0, top_k: int = 0, eos_token_id: int | None = None,
    prompt_lengths: torch.Tensor | None = None, use_cache: bool = True,
    generator: torch.Generator | None = None, pad_token_id: int = 0, latent_fp8: bool = False,
    page_size: int | None = None, cache_dtype: torch.dtype | None = None,
) -> torch.Tensor:
    """Extend each prompt by up to max_new_tokens tokens; returns (B, T + max_new_tokens) ids.

    input_ids (B, T). A ragged batch is right-padded with ``prompt_lengths`` (B,) giving each
    row's real length; row b of the result is its prompt, its new tokens, then ``pad_token_id``.
    After ``eos_token_id`` a row emits only padding. ``latent_fp8``: decode over MLA's latent
    in FlashMLA's fp8 record, ``page_size``: over a paged latent cache, ``cache_dtype``: a cache
    kept in that dtype (None: the model's) (Transformer.make_cache).
    """
    if max_new_tokens < 0:
        raise LatentAttnError(f"max_new_tokens must be >= 0, got {max_new_tokens}")
    if not 0.0 < top_p <= 1.0:
        raise LatentAttnError(f"top_p must be in (0, 1], got {top_p}")
    b, t = input_ids.shape
    total = t + max_new_tokens
    limit = model.config.max_seq_len
    if total > limit:
        raise LatentAttnError(
            f"prompt of {t} tokens plus max_new_tokens={max_new_tokens} exceeds the model's "
            f"context of {limit} tokens"
        )
    device = input_ids.device
    lengths = (
        torch.full((b,), t, dtype=torch.long, device=device) if prompt_lengths is None
        else prompt_lengths.to(device=device, dtype=torch.long)
    )
    if bool((lengths < 1).any()) or bool((lengths > t).any()):
        raise LatentAttnError(f"prompt_lengths must lie in [1, {t}], got {lengths.tolist()}")
    out = torch.full((b, total), pad_token_id, dtype=torch.long, device=device)
    out[:, :t] = input_ids
    rows = torch.arange(b, device=device)
    finished = torch.zeros(b, dtype=torch.bool, device=device)
    ragged = prompt_lengths is not None and bool((lengths != t).any())

    capacity = total
    if model.compiled_steps is not None:
        # A compiled decode step is compiled for its cache's shape: capacities rounded up to a
        # multiple of CAPACITY_STEP let later calls of similar lengths reuse the compiled graph.
        capacity = min(limit, -(-total // CAPACITY_STEP) * CAPACITY_STEP)
    cache = (model.make_cache(b, capacity, dtype=cache_dtype, latent_fp8=latent_fp8,
                              page_size=page_size) if use_cache else None)
    logits = model(input_ids, cache, lengths if ragged else None, logits_at=lengths - 1)
    for i in range(max_new_tokens):
        nxt = sample(logits, temperature, top_p, top_k, generator)
        nxt = torch.where(finished, torch.full_like(nxt, pad_token_id), nxt)
        out[rows, lengths + i] = nxt
        if eos_token_id is not None:
            finished |= nxt == eos_token_id
            if bool(finished.all()):
                break
        if i + 1 == max_new_tokens:
            break
        if cache is not None:
            logits = model(nxt[:, None], cache)[:, -1]
        else:
            upto = int((lengths + i + 1).max())
            logits = model(out[:, :upto], logits_at=lengths + i)
    return out
