"""What is measured on a trained model besides its loss: the parameters that make keys and
values, the KV cache it really allocates, decode speed at a given context, and, for DSA, how much
of the dense attention's mass the indexer's top-k catches."""

from __future__ import annotations

import statistics
import time

import torch
from torch import nn

from latentattn.attention import GroupedQueryAttention, MultiHeadLatentAttention
from latentattn.attention.dsa import SparseLatentAttention
from latentattn.attention.v4 import V4Attention
from latentattn.data import random_batch
from latentattn.model.transformer import Transformer
from latentattn.train.dsa import selection_recall
from latentattn.train.v4 import is_v4, v4_selection_recall

PREFILL_CHUNK = 1024  # prompt tokens per forward when filling the cache (bounds score memory)


def kv_parameters_per_layer(model: Transformer) -> int:
    """Parameters of one layer that produce what its attention reads as keys and values.

    * MHA / GQA / MQA: ``k_proj`` and ``v_proj``.
    * MLA: ``kv_a_proj_with_mqa`` (the joint latent and the shared rope key), ``kv_a_layernorm``
      and ``kv_b_proj`` (the up-projections to per-head keys and values; absorbed decode folds
      them into the query and output sides, but they are still K/V weights).
    * MLA+DSA: those, plus the indexer's ``wk`` and ``k_norm``, which make its cached key.
    * DeepSeek-V4: ``kv_proj`` and ``kv_norm`` (the shared key-value vector), and for CSA / HCA
      layers their compressor (``kv_proj``, ``gate_proj``, ``position_bias``, ``kv_norm``: what
      makes the cached entries) and CSA's indexer compressor (its cached keys; the indexer's
      query side, ``q_b_proj`` and ``weights_proj``, is left out as DSA's is). Its layer types
      differ, so this is the mean over its layers, rounded.

    Query-side and output projections are left out: every variant has them.
    """
    if any(isinstance(blk.self_attn, V4Attention) for blk in model.blocks):
        per_layer = [_v4_kv_parameters(blk.self_attn) for blk in model.blocks]
        return round(sum(per_layer) / len(per_layer))
    attn = model.blocks[0].self_attn
    parts: list[nn.Module]
    if isinstance(attn, GroupedQueryAttention):
        parts = [attn.k_proj, attn.v_proj]
    else:
        assert isinstance(attn, MultiHeadLatentAttention)
        parts = [attn.kv_a_proj_with_mqa, attn.kv_b_proj]
        if attn.kv_a_layernorm is not None:
            parts.append(attn.kv_a_layernorm)
        if isinstance(attn, SparseLatentAttention):
            parts += [attn.indexer.wk, attn.indexer.k_norm]
    return sum(p.numel() for m in parts for p in m.parameters())


def _v4_kv_parameters(attn: nn.Module) -> int:
    assert isinstance(attn, V4Attention)
    own = [attn.kv_proj.weight, attn.kv_norm.weight]
    # A compressor's key side (the indexer is a child of the main compressor: named apart).
    for comp in (attn.compressor, attn.indexer):
        if comp is not None:
            own += [comp.kv_proj.weight, comp.gate_proj.weight, comp.position_bias, comp.kv_norm.weight]
    return sum(p.numel() for p in own)


def kv_bytes_per_token(model: Transformer, dtype: torch.dtype | None = None) -> float:
    """Bytes per cached token over all layers that ``make_cache`` allocates (in the model's dtype
    unless given): the buffers' size, not a formula. A V4 cache holds a bounded window and
    compressor state beside entries that grow one per ``rate`` tokens, so its bytes per token
    depend on the context: they are taken at the model's training window (``max_seq_len``), the
    window and state amortised over it; the other caches grow linearly (64 tokens suffice)."""
    cfg = model.config
    v4 = any(isinstance(blk.self_attn, V4Attention) for blk in model.blocks)
    cache = model.make_cache(1, cfg.max_seq_len if v4 else min(64, cfg.max_seq_len), dtype=dtype)
    return cache.bytes_per_token


@torch.no_grad()
def decode_tokens_per_s(model: Transformer, context: int, steps: int = 32, warmup: int = 3,
                        seed: int = 0) -> float:
    """Batch-1 greedy decode speed with ``context`` tokens cached: tokens / second over ``steps``
    single-token forwards of the whole model (embedding to logits).

    The weights are loaded into a copy built with room for the context (the trained model's
    ``max_seq_len`` is its training window); the prompt is random bytes, prefilled through the
    cache in chunks. DSA runs in its inference form (indexer + top-k + gathered attention).
    """
    cfg = model.config.replace(max_seq_len=context + warmup + steps)
    fresh = Transformer(cfg).to(device=model.device, dtype=model.dtype)
    fresh.load_state_dict(model.state_dict())
    fresh.eval()
    g = torch.Generator().manual_seed(seed)
    prompt = torch.randint(0, cfg.vocab_size, (1, context), generator=g).to(model.device)
    cache = fresh.make_cache(1, cfg.max_seq_len)
    for start in range(0, context, PREFILL_CHUNK):
        logits = fresh(prompt[:, start : start + PREFILL_CHUNK], cache)
    nxt = logits[:, -1].argmax(-1, keepdim=True)  # (1, 1)
    for _ in range(warmup):
        nxt = fresh(nxt, cache)[:, -1].argmax(-1, keepdim=True)
    _sync(model.device)
    t0 = time.perf_counter()
    for _ in range(steps):
        nxt = fresh(nxt, cache)[:, -1].argmax(-1, keepdim=True)
    _sync(model.device)
    return steps / (time.perf_counter() - t0)


def _sync(device: torch.device) -> None:
    if device.type == "cuda":  # kernels run asynchronously: time them to their end
        torch.cuda.synchronize(device)


@torch.no_grad()
def dsa_recall(model: Transformer, val_tokens: torch.Tensor, seq_len: int, batch_size: int,
               batches: int, seed: int = 0) -> list[dict[str, float]]:
    """Per DSA layer, mean over ``batches`` validation batches of
    :func:`latentattn.train.dsa.selection_recall`: the dense attention mass inside the indexer's
    top-k ("indexer"), the k most recent keys ("recent") and k random keys ("uniform"). For a V4
    model, per CSA layer, :func:`latentattn.train.v4.v4_selection_recall`: the same over its
    compressed entries."""
    was_training = model.training
    model.eval()
    g = torch.Generator().manual_seed(seed)
    recall = v4_selection_recall if is_v4(model) else selection_recall
    runs = [recall(model, random_batch(val_tokens, batch_size, seq_len, g)[:, :-1].to(model.device))
            for _ in range(batches)]
    model.train(was_training)
    return [{key: statistics.mean(run[layer][key] for run in runs) for key in runs[0][layer]}
            for layer in range(len(runs[0]))]
