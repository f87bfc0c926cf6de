"""DeepSeek-V4's token compressors and lightning indexer (DeepSeek-V4 report section 2.3.1, eqs.
9-17 for CSA, section 2.3.2, eqs. 20-23 for HCA; transformers' ``DeepseekV4CSACompressor``,
``DeepseekV4HCACompressor`` and ``DeepseekV4Indexer``). Parameter names are transformers'.

A compressor turns every ``rate`` tokens into one entry: per dimension, a softmax over the
window's slots of the projected gates (plus a learned per-slot ``position_bias``) weights the
projected values; the sum is RMSNormed and its last ``rope_dim`` dims rotated at the window's
first position. With ``overlap`` (CSA) each token is projected to two series, Ca and Cb: entry e
pools window e - 1's Ca and window e's Cb over 2 * rate slots (window -1 has weight 0).

Entries are computed only for complete windows; the tokens of an incomplete one (and for CSA the
previous window) wait in the cache (:class:`latentattn.cache.v4.CompressorState`), so a prefill in
one chunk, in several, or token by token produces the same entries.
"""

from __future__ import annotations

import torch
from torch import nn

from latentattn.attention.norm import Float32RMSNorm
from latentattn.cache.step import Step
from latentattn.cache.v4 import CompressorState, row_starts
from latentattn.config import RopeConfig
from latentattn.kernels.v4 import entry_visibility, linear, select_entries
from latentattn.precision import KeepFloat32
from latentattn.rope import apply_rope, inv_frequencies

ENTRY_BLOCK = 2048  # entries pooled at once: bounds the (entries, slots, width) gather in prefill


def rope_tables(inv_freq: torch.Tensor, positions: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """cos, sin (..., rope_dim / 2) fp32 at integer positions, computed on the fly (a table for
    V4's 1M positions would be 256 MB per RoPE); YaRN's cos/sin factor is not applied: V4 forces
    its attention_factor to 1.0 (transformers' DeepseekV4Config)."""
    freqs = positions.float()[..., None] * inv_freq
    return freqs.cos(), freqs.sin()


def rotate_tail(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate the last 2 * cos.shape[-1] dims of x (B, T, H, D) in interleaved pairs (V4 lays each
    head out [nope | rope]); cos/sin (B, T, r / 2)."""
    r = 2 * cos.shape[-1]
    return torch.cat((x[..., :-r], apply_rope(x[..., -r:], cos, sin, interleaved=True)), dim=-1)


class Compressor(KeepFloat32):
    """Compresses ``rate`` tokens into one ``width``-dim entry (``overlap``: CSA's two series).
    ``position_bias`` stays fp32 in a bf16 model (transformers keeps it in fp32 strictly)."""

    inv_freq: torch.Tensor

    def __init__(self, dim: int, width: int, rate: int, overlap: bool, rope_dim: int,
                 rope: RopeConfig, eps: float) -> None:
        super().__init__()
        self.width, self.rate, self.overlap = width, rate, overlap
        proj = 2 * width if overlap else width
        self.kv_proj = nn.Linear(dim, proj, bias=False)
        self.gate_proj = nn.Linear(dim, proj, bias=False)
        self.position_bias = nn.Parameter(torch.zeros(rate, proj))
        self.kv_norm = Float32RMSNorm(width, eps)
        self.register_buffer("inv_freq", inv_frequencies(rope_dim, rope), persistent=False)

    @property
    def span(self) -> int:
        """Tokens an entry reads: its window, and the one before it with overlap."""
        return 2 * self.rate if self.overlap else self.rate

    def forward(self, x: torch.Tensor, step: Step, state: CompressorState | None) -> torch.Tensor:
        """x (B, T, dim) of the step's tokens -> every entry available after the step,
        (B, E, width) (without a cache: the T // rate entries of a sequence from position 0)."""
        # linear: a decode step's one-row products read the weights at the copy rate (kernels.v4)
        kv, gate = linear(x, self.kv_proj.weight), linear(x, self.gate_proj.weight)
        start, new = row_starts(step)
        b, t, _ = x.shape
        first = torch.div(start, self.rate, rounding_mode="floor")
        done = torch.div(start + new, self.rate, rounding_mode="floor")  # entries complete after
        # The most entries one row completes in this call: none in m - 1 of every m decode steps,
        # which skip the pooling. Rows that complete fewer drop the rest when storing.
        candidates = int((done - first).max())
        entries = kv.new_zeros(b, 0, self.width)
        if candidates:
            entries = self._complete(kv, gate, state, start, first, candidates)  # (B, J, width)
        if state is None:
            return entries[:, : t // self.rate]
        if candidates:
            e = first[:, None] + torch.arange(candidates, device=x.device)
            state.store_entries(entries.detach(), e, e < done[:, None])
        state.kv.write(step, kv.detach())
        state.gate.write(step, gate.detach())
        return state.entries[:, : step.kv_len // self.rate].to(x.dtype)

    def _complete(self, kv: torch.Tensor, gate: torch.Tensor, state: CompressorState | None,
                  start: torch.Tensor, first: torch.Tensor, candidates: int) -> torch.Tensor:
        """Entries first .. first + candidates - 1 of each row (B, J, width), pooled from the
        pending tokens in the cache (none without one) followed by this call's kv (B, T, proj)."""
        b, t, _ = kv.shape
        if state is None:
            ring_kv = kv.new_zeros(b, self.span, kv.shape[-1])
            ring_gate = ring_kv
            ring_ok = torch.zeros(b, self.span, dtype=torch.bool, device=kv.device)
        else:
            ring_kv, ring_ok = state.kv.ordered(start)
            ring_gate, _ = state.gate.ordered(start)
            ring_kv, ring_gate = ring_kv.to(kv.dtype), ring_gate.to(gate.dtype)
        # ext index i holds position start - span + i: the ring, then the new tokens.
        ext_kv, ext_gate = torch.cat((ring_kv, kv), dim=1), torch.cat((ring_gate, gate), dim=1)
        ext_ok = torch.cat((ring_ok, torch.ones(b, t, dtype=torch.bool, device=kv.device)), dim=1)
        pooled = []
        for j0 in range(0, candidates, ENTRY_BLOCK):
            e = first[:, None] + torch.arange(j0, min(j0 + ENTRY_BLOCK, candidates), device=kv.device)
            pooled.append(self._pool(ext_kv, ext_gate, ext_ok, e, start))
        return torch.cat(pooled, dim=1)

    def _pool(self, ext_kv: torch.Tensor, ext_gate: torch.Tensor, ext_ok: torch.Tensor,
              e: torch.Tensor, start: torch.Tensor) -> torch.Tensor:
        """Entries e (B, J) pooled from the ext series; candidates past the data read clamped
        slots and are dropped by the caller."""
        m, w = self.rate, self.width
        s = torch.arange(self.span, device=e.device)
        pos = (e[..., None] - (1 if self.overlap else 0)) * m + s  # (B, J, span) source positions
        i = (pos - start[:, None, None] + self.span).clamp(0, ext_kv.shape[1] - 1)
        flat = i.flatten(1)
        kv = ext_kv.gather(1, flat[..., None].expand(-1, -1, ext_kv.shape[-1])).view(*i.shape, -1)
        gate = ext_gate.gather(1, flat[..., None].expand(-1, -1, ext_gate.shape[-1])).view(*i.shape, -1)
        ok = ext_ok.gather(1, flat).view(i.shape) & (pos >= 0)
        gate = gate.float() + self.position_bias[pos % m]
        if self.overlap:  # slots 0..m-1: window e-1's Ca (first half); m..2m-1: window e's Cb
            kv = torch.cat((kv[:, :, :m, :w], kv[:, :, m:, w:]), dim=2)
            gate = torch.cat((gate[:, :, :m, :w], gate[:, :, m:, w:]), dim=2)
        gate = gate.masked_fill(~ok[..., None], float("-inf"))
        pooled = self.kv_norm((kv * torch.softmax(gate, dim=2).to(kv.dtype)).sum(dim=2))
        cos, sin = rope_tables(self.inv_freq, e * m)
        return rotate_tail(pooled.unsqueeze(2), cos, sin).squeeze(2)


class IndexScorer(KeepFloat32):
    """The indexer's per-head weights w_{t,h} = weights_proj(x) * n_heads^-0.5 (eq. 15)."""

    def __init__(self, dim: int, n_heads: int) -> None:
        super().__init__()
        self.weights_proj = nn.Linear(dim, n_heads, bias=False)


class Indexer(Compressor):
    """CSA's lightning indexer: its own overlapping compressor at ``index_head_dim``, queries from
    the attention's normalised query latent, scores sum_h w_{t,h} ReLU(q_{t,h} . k_e) / sqrt(d_I)
    (eqs. 13-16), and the top-k visible entries per query (eq. 17; -1 where fewer exist)."""

    def __init__(self, dim: int, q_lora_rank: int, n_heads: int, head_dim: int, topk: int,
                 rate: int, rope_dim: int, rope: RopeConfig, eps: float) -> None:
        super().__init__(dim, head_dim, rate, True, rope_dim, rope, eps)
        self.n_heads, self.topk = n_heads, topk
        self.q_b_proj = nn.Linear(q_lora_rank, n_heads * head_dim, bias=False)
        self.scorer = IndexScorer(dim, n_heads)

    def queries(self, x: torch.Tensor, c_q: torch.Tensor, positions: torch.Tensor
                ) -> tuple[torch.Tensor, torch.Tensor]:
        """q (B, T, H_I, d_I) rotated at the query positions, w (B, T, H_I), both fp32."""
        b, t, _ = x.shape
        q = linear(c_q, self.q_b_proj.weight).view(b, t, self.n_heads, self.width)
        q = rotate_tail(q, *rope_tables(self.inv_freq, positions))
        w = linear(x, self.scorer.weights_proj.weight).float() * self.n_heads**-0.5
        return q.float(), w

    def select(self, x: torch.Tensor, c_q: torch.Tensor, step: Step, state: CompressorState | None
               ) -> tuple[torch.Tensor, torch.Tensor]:
        """(top-k entry indices (B, T, k) with -1 for none, the indexer's keys (B, E, d_I))."""
        keys = self(x, step, state)
        q, w = self.queries(x, c_q, step.positions)
        last = entry_visibility(step.positions, self.rate) - 1  # the last entry each query sees
        idx = select_entries(q, w, keys, last, self.topk, self.width**-0.5)
        return idx, keys
