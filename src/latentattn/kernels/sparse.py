"""DeepSeek Sparse Attention maths: indexer scores, top-k selection, gathered sparse attention.

Fast paths (what the model runs):
* ``select_topk``: the lightning indexer's scores computed per (query block, key block) with a
  running top-k, so the (T, S) score matrix never exists for a whole sequence.
* ``sparse_mqa``: attention that gathers only the selected latents, per query block. Work and
  memory grow with T * k, not T * S. Autograd flows through the gather, so it trains.

References (what the tests compare against): ``index_scores`` over all keys, ``topk_reference``,
``selection_mask`` and ``sparse_mqa_reference`` (dense scores + mask, as transformers'
DeepseekV32 and DeepSeek's reference code do it).

Indices are (B, T, k) int64; -1 marks an invalid slot (fewer than k visible keys), never read.
"""

from __future__ import annotations

import torch

from latentattn.kernels.reference import attention_ref


def index_scores(q: torch.Tensor, w: torch.Tensor, k: torch.Tensor, scale: float) -> torch.Tensor:
    """I[b,t,s] = sum_j w[b,t,j] * scale * relu(q[b,t,j] . k[b,s]) (DeepSeek-V3.2 Indexer).

    q (B, T, H_I, d_I), w (B, T, H_I), k (B, S, d_I); all fp32. Returns (B, T, S) fp32.
    """
    b, t, h, d = q.shape
    logits = torch.bmm(q.reshape(b, t * h, d), k.transpose(1, 2)).view(b, t, h, -1)  # (B,T,H,S)
    # Weighted sum over heads as a (1 x H) @ (H x S) matmul per token: a GEMM, not a reduction.
    return torch.matmul(w.unsqueeze(2), torch.relu_(logits)).squeeze(2) * scale


def visible(positions: torch.Tensor, start: int, stop: int) -> torch.Tensor:
    """(B, T, stop - start) bool: key j may be seen by the query at positions[b, t] (j <= pos)."""
    j = torch.arange(start, stop, device=positions.device)
    return j[None, None, :] <= positions[:, :, None]


def _mark_invalid(values: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
    return idx.masked_fill(values == float("-inf"), -1)


def _top(values: torch.Tensor, k: int, positions: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The k largest values along the last axis, ties going to the EARLIER position.

    ReLU scores tie exactly (every indexer head clipped to 0), and torch.topk breaks ties
    differently for different shapes -- prefill and decode would then select different keys.
    Ranking by one unique int64 key, (the score's order-preserving bits, then -position), makes the
    choice a function of (score, position) alone, at topk's cost (a stable sort is ~20x slower).
    ``positions`` (broadcastable to values) are the keys' positions, < 2^31.
    """
    bits = (values + 0.0).view(torch.int32)  # + 0.0 turns -0.0 into 0.0: they tie
    ordered = torch.where(bits < 0, bits ^ 0x7FFFFFFF, bits).long()  # int order == float order
    key = (ordered << 32) | (0x7FFFFFFF - positions).long()
    sel = key.topk(k, dim=-1).indices
    return values.gather(-1, sel), sel


def topk_reference(scores: torch.Tensor, positions: torch.Tensor, topk: int) -> torch.Tensor:
    """Top-k over a full (B, T, S) score matrix with causal masking; -1 for invalid slots."""
    s = scores.shape[-1]
    masked = scores.masked_fill(~visible(positions, 0, s), float("-inf"))
    values, idx = _top(masked, min(topk, s), torch.arange(s, device=scores.device))
    return _mark_invalid(values, idx)


@torch.no_grad()
def select_topk(
    q: torch.Tensor, w: torch.Tensor, k: torch.Tensor, positions: torch.Tensor, topk: int,
    scale: float, q_block: int = 256, block_elems: int = 1 << 25,
) -> torch.Tensor:
    """Running top-k of the indexer scores over key blocks, per query block.

    q (B, T, H_I, d_I), w (B, T, H_I), k (B, S, d_I) fp32; positions (B, T). Returns (B, T, K)
    with K = min(topk, S) and -1 in the slots of queries that see fewer than K keys. A key block
    holds at most ``block_elems`` per-head logits (128 MB in fp32), so peak memory does not grow
    with S; a decode step (T = 1) scores a whole 64k-token cache in two blocks.
    """
    b, t = positions.shape
    s = k.shape[1]
    kk = min(topk, s)
    k_block = max(1, block_elems // (b * min(q_block, t) * q.shape[2]))
    out = torch.empty(b, t, kk, dtype=torch.long, device=q.device)
    for t0 in range(0, t, q_block):
        t1 = min(t0 + q_block, t)
        pos = positions[:, t0:t1]
        # Keys past the block's last position are never visible. A decode step (one query a
        # row) scores all s keys instead of asking the device for that position: no host sync.
        last = s if t == 1 else min(int(pos.max()) + 1, s)
        best_v = torch.full((b, t1 - t0, 0), float("-inf"), device=q.device)
        best_i = torch.empty(b, t1 - t0, 0, dtype=torch.long, device=q.device)
        for s0 in range(0, last, k_block):
            s1 = min(s0 + k_block, last)
            sc = index_scores(q[:, t0:t1], w[:, t0:t1], k[:, s0:s1], scale)
            sc = sc.masked_fill(~visible(pos, s0, s1), float("-inf"))
            cand_v = torch.cat((best_v, sc), dim=-1)
            cand_i = torch.cat((best_i, torch.arange(s0, s1, device=q.device).expand_as(sc)), dim=-1)
            best_v, sel = _top(cand_v, min(kk, cand_v.shape[-1]), cand_i)
            best_i = cand_i.gather(-1, sel)
        if best_v.shape[-1] < kk:  # the whole visible range is shorter than K
            pad = kk - best_v.shape[-1]
            best_v = torch.nn.functional.pad(best_v, (0, pad), value=float("-inf"))
            best_i = torch.nn.functional.pad(best_i, (0, pad), value=-1)
        out[:, t0:t1] = _mark_invalid(best_v, best_i)
    return out


def selection_mask(idx: torch.Tensor, num_keys: int) -> torch.Tensor:
    """(B, T, K) indices -> (B, 1, T, S) bool, True at selected keys (invalid slots select nothing)."""
    b, t, _ = idx.shape
    spill = idx.masked_fill(idx < 0, num_keys)  # invalid slots land in a column we drop
    mask = torch.zeros(b, t, num_keys + 1, dtype=torch.bool, device=idx.device)
    return mask.scatter_(-1, spill, True)[..., :num_keys].unsqueeze(1)


def gather_rows(kv: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
    """kv (B, S, D), idx (B, T, K) -> (B, T, K, D); invalid (-1) slots read row 0 (masked later).

    One index_select over the flattened batch: several times faster than advanced indexing.
    """
    b, s, d = kv.shape
    flat = idx.clamp(min=0) + torch.arange(b, device=kv.device)[:, None, None] * s
    return kv.reshape(b * s, d).index_select(0, flat.flatten()).view(*idx.shape, d)


def sparse_mqa(
    q: torch.Tensor, kv: torch.Tensor, idx: torch.Tensor, scale: float, v_dim: int,
    q_block: int = 64, return_probs: bool = False,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Absorbed-MLA attention over the selected latents only.

    q (B, H, T, D) with D = d_c + d_r; kv (B, S, D), the value being kv[..., :v_dim]; idx
    (B, T, K). Returns o (B, H, T, v_dim) and, if asked, the probabilities (B, H, T, K) fp32.
    """
    outs, probs = [], []
    for t0 in range(0, q.shape[2], q_block):
        t1 = min(t0 + q_block, q.shape[2])
        sel = gather_rows(kv, idx[:, t0:t1])  # (B, Tb, K, D)
        scores = torch.einsum("bhtd,btkd->bhtk", q[:, :, t0:t1].float(), sel.float()) * scale
        scores = scores.masked_fill((idx[:, None, t0:t1] < 0), float("-inf"))
        p = torch.softmax(scores, dim=-1)
        outs.append(torch.einsum("bhtk,btkc->bhtc", p, sel[..., :v_dim].float()).to(q.dtype))
        if return_probs:
            probs.append(p)
    return torch.cat(outs, dim=2), (torch.cat(probs, dim=2) if return_probs else None)


def sparse_mqa_reference(
    q: torch.Tensor, kv: torch.Tensor, idx: torch.Tensor, scale: float, v_dim: int,
) -> torch.Tensor:
    """Dense scores over every key plus a mask outside the selection: O(T * S), obviously right."""
    key = kv.unsqueeze(1)
    return attention_ref(q, key, key[..., :v_dim], scale, mask=selection_mask(idx, kv.shape[1]))
