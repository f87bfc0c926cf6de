"""Calibration for a conversion: each layer's attention inputs on a text, and from them MHA2MLA's
2-norm score of each RoPE frequency pair (arXiv 2502.14837 s3.1: the pairs whose query and key
norms multiply to the most are the ones attention relies on)."""

from __future__ import annotations

import torch

from latentattn.attention.gqa import GroupedQueryAttention
from latentattn.config import GQAConfig
from latentattn.errors import LatentAttnError
from latentattn.model.transformer import Transformer


@torch.no_grad()
def attention_inputs(model: Transformer, ids: torch.Tensor, seq_len: int,
                     batch_size: int = 4) -> list[torch.Tensor]:
    """Per layer, the (N, dim) inputs its attention saw (after input_layernorm) over ``ids``
    (1-D) cut into windows of ``seq_len`` (the tail shorter than a window is left out)."""
    n = (len(ids) // seq_len) * seq_len
    if n == 0:
        raise LatentAttnError(f"calibration: {len(ids)} tokens are fewer than one window of {seq_len}")
    windows = ids[:n].view(-1, seq_len).to(model.device)
    seen: list[list[torch.Tensor]] = [[] for _ in model.blocks]
    hooks = [blk.self_attn.register_forward_pre_hook(
        lambda _m, args, i=i: seen[i].append(args[0].reshape(-1, args[0].shape[-1]).float().cpu()))
        for i, blk in enumerate(model.blocks)]
    try:
        for batch in windows.split(batch_size):
            model(batch)
    finally:
        for h in hooks:
            h.remove()
    return [torch.cat(x) for x in seen]


@torch.no_grad()
def pair_scores(model: Transformer, inputs: list[torch.Tensor]) -> torch.Tensor:
    """(d / 2,) score per frequency pair p: over layers, query heads h and tokens, the mean of
    ||q_h,p|| times the mean of ||k_g(h),p|| (a pair is dims p and p + d/2, half-split)."""
    total: torch.Tensor | None = None
    for blk, x in zip(model.blocks, inputs, strict=True):
        attn = blk.self_attn
        assert isinstance(attn, GroupedQueryAttention)
        a = attn.cfg
        half = a.head_dim // 2
        x = x.to(device=attn.q_proj.weight.device, dtype=attn.q_proj.weight.dtype)
        q = _pair_norms(attn.q_proj(x), a.n_heads, half)
        k = _pair_norms(attn.k_proj(x), a.n_kv_heads, half)
        score = (q * k.repeat_interleave(a.n_heads // a.n_kv_heads, dim=0)).sum(0).cpu()
        total = score if total is None else total + score
    assert total is not None
    return total


def _pair_norms(y: torch.Tensor, heads: int, half: int) -> torch.Tensor:
    """(heads, half): mean over tokens of each pair's 2-norm (dims p and p + half)."""
    return y.float().view(-1, heads, 2, half).norm(dim=2).mean(0)


def choose_pairs(n_pairs: int, half: int, scores: torch.Tensor | None) -> tuple[int, ...]:
    """The ``n_pairs`` pairs to keep rotary, ascending: the top-scoring ones, or without scores
    the highest frequencies (pairs 0..n-1; MHA2MLA's S_high)."""
    if scores is None:
        return tuple(range(n_pairs))
    return tuple(sorted(int(i) for i in torch.topk(scores, n_pairs).indices))


def calib_span(ids: torch.Tensor, n: int, seed: int = 0) -> torch.Tensor:
    """``n`` consecutive calibration tokens of ``ids`` (1-D): the first ``n`` for ``seed`` 0,
    otherwise from an offset drawn uniformly with ``seed`` (another sample of the same text)."""
    if len(ids) < n:
        raise LatentAttnError(f"calibration: the text has {len(ids):,} tokens, fewer than {n:,}")
    if seed == 0:
        return ids[:n]
    start = int(torch.randint(0, len(ids) - n + 1, (1,), generator=torch.Generator().manual_seed(seed)))
    return ids[start : start + n]


CALIB_WINDOW = 256  # tokens per calibration window (capped at the model's max_seq_len)


def calibrate(model: Transformer, rope_dim: int, ids: torch.Tensor | None, rorope: bool = False
              ) -> tuple[tuple[int, ...], list[torch.Tensor] | None]:
    """(the frequency pairs to keep rotary for ``rope_dim`` rope dims, the per-layer attention
    inputs) for a GQA ``model``: chosen by 2-norm on the calibration tokens ``ids``, or without
    them the highest frequencies and no inputs. ``rorope``: every pair (RoRoPE keeps them all)."""
    a = model.config.attention
    assert isinstance(a, GQAConfig)
    half = a.head_dim // 2
    n_pairs = half if rorope else rope_dim // (2 * a.n_kv_heads)
    if ids is None:
        return choose_pairs(n_pairs, half, None), None
    inputs = attention_inputs(model, ids, min(CALIB_WINDOW, model.config.max_seq_len))
    if rorope:
        return choose_pairs(n_pairs, half, None), inputs
    return choose_pairs(n_pairs, half, pair_scores(model, inputs)), inputs


__all__ = ["CALIB_WINDOW", "attention_inputs", "calib_span", "calibrate", "choose_pairs", "pair_scores"]
