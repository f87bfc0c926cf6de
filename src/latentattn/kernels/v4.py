"""DeepSeek-V4's attention maths: one shared-KV head, a sliding window over the layer's own keys,
compressed entries (all of them for HCA, the indexer's top-k for CSA) and a per-head sink
(DeepSeek-V4 report section 2.3; transformers' ``DeepseekV4Attention`` with
``eager_attention_forward``).

* ``v4_attend``: what the model runs. Per block of queries it reads the window's keys (a slice of
  the cached ring followed by the new tokens), plus either every compressed entry (HCA) or the
  k entries it gathers (CSA: ``gather_rows`` of the DSA path), so work and memory grow with
  T * (window + k) for CSA, never T * L.
* ``v4_attend_reference``: dense scores over every token and every entry of a sequence from
  position 0 with masks, as transformers computes it: obviously right, O(T * (L + L / m)).
* ``select_entries``: the lightning indexer's top-k over the compressed entries, the result of
  ``kernels.sparse.select_topk`` (its reference) computed in one top-k per query block.
* ``linear``: ``F.linear`` (its reference), with a decode fast path for one fp32 row on a CPU.

Keys are values (shared-KV MQA): the output is the probability-weighted sum of the same vectors.
The sink is one extra logit per head in the softmax whose probability is dropped.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from latentattn.kernels.sparse import _top, gather_rows

# One block of per-head indexer logits (fp32). Under glibc's 32 MiB ceiling on its dynamic mmap
# threshold, so a freed block is reused from the heap instead of every block's pages being
# faulted in (and zeroed) anew; large enough that a block's GEMM runs at full rate.
SCORE_BLOCK_BYTES = 16 << 20
SCORE_ROWS = 2048  # query-head rows per block (32 queries at 64 indexer heads)
ROW_BLOCKS = 8  # weight row blocks of a one-row product on a CPU (2 to 16 measured the same)


def linear(x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """x (..., in) @ weight (out, in)^T, as ``F.linear`` without a bias.

    A decode step's projection is one row times the weight, bound by reading the weight. On a
    CPU, torch 2.13's fp32 one-row product (MKL's GEMV, two threads) read V4-Flash's weights at
    14-21 GB/s on this 2-core EPYC while a copy moved 30-47 GB/s; the same product as ``bmm``
    over ``ROW_BLOCKS`` row blocks of the weight (torch parallelises over the blocks, one
    single-threaded product each) read them at 30-43 GB/s, and each output is the same dot
    product. bf16 gains nothing that way (13-17 GB/s either way), so only fp32 takes it.
    """
    out = weight.shape[0]
    if (x.numel() != x.shape[-1] or x.device.type != "cpu" or x.dtype != torch.float32
            or weight.dtype != torch.float32 or out % ROW_BLOCKS):
        return F.linear(x, weight)
    g = ROW_BLOCKS
    y = torch.bmm(x.reshape(1, 1, -1).expand(g, 1, -1), weight.view(g, out // g, -1).transpose(1, 2))
    return y.reshape(*x.shape[:-1], out)  # (g, 1, out / g) -> (..., out)


def _softmax_with_sink(logits: torch.Tensor, sinks: torch.Tensor) -> torch.Tensor:
    """Softmax over the last axis of (B, H, T, S) fp32 logits with one sink logit per head
    appended (then dropped): rows may be fully masked, the sink keeps them finite."""
    b, h, t, _ = logits.shape
    sink = sinks.float().view(1, h, 1, 1).expand(b, h, t, 1)
    return torch.softmax(torch.cat((logits, sink), dim=-1), dim=-1)[..., :-1]


def v4_attend(
    q: torch.Tensor, window_keys: torch.Tensor, window_ok: torch.Tensor, window: int,
    sinks: torch.Tensor, scale: float, entries: torch.Tensor | None = None,
    visible_entries: torch.Tensor | None = None, selected: torch.Tensor | None = None,
    q_block: int = 16, entry_probs: list[torch.Tensor] | None = None,
) -> torch.Tensor:
    """V4 attention for T new queries per row.

    q (B, T, H, D), rotated. window_keys (B, W + T, D): the window ring in position order (the
    W positions before each row's first new token) then the T new keys; window_ok (B, W + T)
    False for ring slots before position 0. Query t sees window keys t + 1 .. t + W (its own key
    and the W - 1 before it). Compressed part, one of:
    * HCA: ``entries`` (B, E, D) and ``visible_entries`` (B, T): query t sees entries
      e < visible_entries[b, t];
    * CSA: ``entries`` and ``selected`` (B, T, k) entry indices, -1 for none.
    Returns (B, T, H, D) in q's dtype. ``entry_probs``, if given, receives per query block the
    compressed part's probabilities summed over heads, (B, Tb, k or E) fp32 with grad (the
    indexer's training target, DeepSeek-V3.2 report section 2.1).

    A block of ``q_block`` queries keeps its temporaries (the gathered entries, Tb * k * D) at
    16 MB at V4-Flash dims: under glibc's 32 MiB ceiling on its mmap threshold, so they are
    reused from the heap rather than faulted in anew each block (64-query blocks spent more time
    in page faults of the gather than in the attention's GEMMs on this CPU).
    """
    b, t, h, d = q.shape
    ninf = float("-inf")
    sink = sinks.float().view(1, 1, h, 1)
    buffers: dict[tuple[int, ...], torch.Tensor] = {}
    outs = []
    for t0 in range(0, t, q_block):
        t1 = min(t0 + q_block, t)
        n = t1 - t0
        qb = q[:, t0:t1]  # (B, n, H, D): logits are (B, n, H, S), the block's rows in one GEMM
        keys = window_keys[:, t0 + 1: t1 + window]  # (B, n + W - 1, D)
        s = keys.shape[1]
        i = torch.arange(t0 + 1, t1 + window, device=q.device)
        tq = torch.arange(t0, t1, device=q.device)
        ok = (i[None, :] > tq[:, None]) & (i[None, :] <= tq[:, None] + window)  # (n, n + W - 1)
        ok = ok[None] & window_ok[:, None, t0 + 1: t1 + window]  # (B, n, n + W - 1)
        win = torch.matmul(qb.reshape(b, n * h, d), keys.transpose(1, 2)).view(b, n, h, s).float()
        logits = [win.masked_fill_(~ok[:, :, None], ninf)]
        values = None
        if entries is not None and selected is not None:
            idx = selected[:, t0:t1]
            values = _gather(entries, idx, buffers)  # (B, n, k, D)
            comp = torch.matmul(qb, values.transpose(-1, -2)).float()  # per token (H, D) @ (D, k)
            logits.append(comp.masked_fill_((idx < 0)[:, :, None], ninf))
        elif entries is not None and visible_entries is not None:
            e = entries.shape[1]
            hidden = torch.arange(e, device=q.device)[None, None, :] >= visible_entries[:, t0:t1, None]
            comp = torch.matmul(qb.reshape(b, n * h, d), entries.transpose(1, 2)).view(b, n, h, e).float()
            logits.append(comp.masked_fill_(hidden[:, :, None], ninf))
        z = (logits[0] if len(logits) == 1 else torch.cat(logits, dim=-1)) * scale
        # Softmax with the sink: one more logit per head, its probability dropped.
        p = torch.softmax(torch.cat((z, sink.expand(b, n, h, 1)), dim=-1), dim=-1)[..., :-1]
        if entry_probs is not None:
            entry_probs.append(p[..., s:].sum(dim=2))
        o = torch.matmul(p[..., :s].to(q.dtype).reshape(b, n * h, s), keys).view(b, n, h, d)
        if values is not None:
            o = o + torch.matmul(p[..., s:].to(q.dtype), values)
        elif entries is not None and visible_entries is not None:
            o = o + torch.matmul(p[..., s:].to(q.dtype).reshape(b, n * h, -1), entries).view(b, n, h, d)
        outs.append(o)
    return torch.cat(outs, dim=1)


def _gather(entries: torch.Tensor, idx: torch.Tensor, buffers: dict[tuple[int, ...], torch.Tensor]
            ) -> torch.Tensor:
    """``gather_rows(entries, idx)`` (B, n, k, D). Without autograd, into one buffer per shape
    reused by every query block: a fresh 16 MB result per block took 1-5 ms here (two-thread
    ``index_select`` into new pages) against 0.3 ms into a buffer already touched."""
    if torch.is_grad_enabled() and entries.requires_grad:
        return gather_rows(entries, idx)
    b, s, d = entries.shape
    shape = (*idx.shape, d)
    buf = buffers.get(shape)
    if buf is None:
        buf = buffers[shape] = entries.new_empty(shape)
    flat = idx.clamp(min=0) + torch.arange(b, device=idx.device)[:, None, None] * s
    torch.index_select(entries.reshape(b * s, d), 0, flat.flatten(), out=buf.view(-1, d))
    return buf


def v4_attend_reference(
    q: torch.Tensor, keys: torch.Tensor, window: int, sinks: torch.Tensor, scale: float,
    entries: torch.Tensor | None = None, entry_mask: torch.Tensor | None = None,
) -> torch.Tensor:
    """Dense V4 attention over a whole sequence from position 0: q (B, T, H, D), keys (B, T, D)
    (key j seen by query t when t - window < j <= t), entries (B, E, D) with entry_mask
    (B, T, E) True where query t sees entry e. Returns (B, T, H, D)."""
    t = q.shape[1]
    pos = torch.arange(t, device=q.device)
    sliding = (pos[None, :] <= pos[:, None]) & (pos[None, :] > pos[:, None] - window)  # (T, T)
    kv = keys
    mask = sliding[None].expand(q.shape[0], -1, -1)
    if entries is not None and entry_mask is not None:
        kv = torch.cat((keys, entries), dim=1)
        mask = torch.cat((mask, entry_mask), dim=-1)
    logits = torch.einsum("bthd,bsd->bhts", q, kv).float() * scale
    p = _softmax_with_sink(logits.masked_fill(~mask[:, None], float("-inf")), sinks)
    return torch.einsum("bhts,bsd->bthd", p.to(q.dtype), kv)


def select_entries(
    q: torch.Tensor, w: torch.Tensor, keys: torch.Tensor, last: torch.Tensor, topk: int,
    scale: float, rows: int = SCORE_ROWS, block_bytes: int = SCORE_BLOCK_BYTES,
) -> torch.Tensor:
    """The indexer's top-k entries per query: what ``select_topk`` returns (the same scores
    sum_h w_h ReLU(q_h . k) * scale, ties to the earlier entry), computed differently.

    q (B, T, H, d) and w (B, T, H) fp32; keys (B, E, d), any float dtype (scored in fp32, one
    block at a time, so a bf16 store is never copied whole); last (B, T): the last entry each
    query sees (-1: none). Returns (B, T, K) int64, K = min(topk, E), -1 where fewer are visible.

    Per block of queries (``rows`` query-head rows) the scores of every visible entry go into one
    (Tb, S) buffer, key block by key block (logit blocks of at most ``block_bytes``, 2-D GEMMs),
    and one top-k ranks them all: no running top-k to merge, and a decode step over 1M tokens'
    262,144 entries scores four 16 MB blocks rather than one 64 MB block.
    """
    b, t, h, d = q.shape
    e = keys.shape[1]
    out = torch.full((b, t, min(topk, e)), -1, dtype=torch.long, device=q.device)
    tb = max(1, rows // h)
    for r in range(b):
        for t0 in range(0, t, tb):
            n = min(tb, t - t0)
            pos = last[r, t0: t0 + n]
            stop = min(int(pos.max()) + 1, e)  # entries past the block's last are never visible
            if stop <= 0:
                continue
            qb, wb = q[r, t0: t0 + n].reshape(n * h, d), w[r, t0: t0 + n].unsqueeze(1)  # (n H, d), (n, 1, H)
            kb = max(1, block_bytes // (4 * n * h))
            scores = torch.empty(n, stop, device=q.device)
            for s0 in range(0, stop, kb):
                s1 = min(s0 + kb, stop)
                kf = keys[r, s0:s1].float()
                if n == 1:  # decode: keys @ q^T streams the keys as stored (~15% faster here)
                    scores[0, s0:s1] = torch.mv(torch.mm(kf, qb.t()).relu_(), wb[0, 0]) * scale
                else:
                    logits = torch.mm(qb, kf.t()).view(n, h, s1 - s0).relu_()
                    scores[:, s0:s1] = torch.bmm(wb, logits).squeeze(1) * scale
            j = torch.arange(stop, device=q.device)
            scores.masked_fill_(j[None, :] > pos[:, None], float("-inf"))
            values, sel = _top(scores, min(topk, stop), j)
            out[r, t0: t0 + n, : sel.shape[-1]] = sel.masked_fill(values == float("-inf"), -1)
    return out


def entry_visibility(positions: torch.Tensor, rate: int) -> torch.Tensor:
    """(B, T) how many compressed entries the query at each position sees: entry e pools tokens up
    to (e + 1) * rate - 1, so it is visible once that token is, e < (p + 1) // rate
    (transformers' ``causal_threshold``)."""
    return torch.div(positions + 1, rate, rounding_mode="floor")


def selected_mask(selected: torch.Tensor, num_entries: int) -> torch.Tensor:
    """(B, T, k) entry indices (-1: none) -> (B, T, E) bool, True at the selected entries."""
    b, t, _ = selected.shape
    spill = selected.masked_fill(selected < 0, num_entries)
    mask = torch.zeros(b, t, num_entries + 1, dtype=torch.bool, device=selected.device)
    return mask.scatter_(-1, spill, True)[..., :num_entries]
