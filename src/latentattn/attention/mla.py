"""Multi-head latent attention (DeepSeek-V2 section 2.1; DeepSeek-V3 ``inference/model.py``).

Parameter names are DeepSeek's/Hugging Face's. Shapes: x (B, T, dim); H heads; d_c latent;
d_n/d_r the nope/rope parts of a query/key head; d_v value head.

Two inference forms, equal in exact arithmetic (DeepSeek-V2, arXiv 2405.04434, s2.1.2: W_UK
absorbed into the query, W_UV into the output):
* naive ("MHA mode"): k_nope, v = W_UK c, W_UV c per head; attention over H heads of
  d_qk-dim keys. Compute-friendly: prefill and training.
* absorb ("MQA mode"): q_lat[h] = W_UK[h]^T q_nope[h]; one shared (d_c + d_r)-dim key
  [c | k_rope] and d_c-dim value c; o[h] = W_UV[h] o_lat[h]. Only the latent is cached and read
  once for all heads: bandwidth-friendly decode.
"""

from __future__ import annotations

import torch
from torch import nn

from latentattn.attention.norm import RMSNorm
from latentattn.cache.build import CacheSpec, DenseSpec, LatentSpec
from latentattn.cache.layer import LayerCache
from latentattn.cache.step import Step
from latentattn.cache.store import Store
from latentattn.config import MLAConfig, ModelConfig
from latentattn.kernels import attention
from latentattn.kernels.backend import runs_triton
from latentattn.kernels.mla_decode import mla_decode_fp8_triton, mla_decode_triton
from latentattn.rope import apply_rope, softmax_scale


def latent_attention(q_abs: torch.Tensor, kv: torch.Tensor, scale: float, rank: int,
                     step: Step) -> torch.Tensor:
    """The absorbed form's attention, what ``absorbed`` runs between ``absorb_query`` and
    ``unabsorb`` (and ``latentattn bench kernels`` times as the PyTorch path): q_abs
    (B, H, T, d_c + d_r), kv (B, S, d_c + d_r) -> o_lat (B, H, T, d_c), with rank = d_c."""
    key = kv.unsqueeze(1)  # (B, 1, S, d_c + d_r): one key shared by all heads
    # The value is c = key[..., :d_c]. Passing the whole key as the value keeps q/k/v head
    # dims equal (the fused kernels' condition) without copying the cache; the extra d_r
    # output dims are dropped.
    return attention(q_abs, key, key, scale, mask=step.mask, causal=step.causal)[..., :rank]


class MultiHeadLatentAttention(nn.Module):
    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        a = cfg.attention
        assert isinstance(a, MLAConfig)
        self.cfg = a
        self.interleaved = cfg.rope.interleaved
        self.scale = softmax_scale(a.qk_head_dim, cfg.rope)
        h, dqk = a.n_heads, a.qk_head_dim
        if a.q_lora_rank is None:
            self.q_proj = nn.Linear(cfg.dim, h * dqk, bias=a.qkv_bias)
        else:
            self.q_a_proj = nn.Linear(cfg.dim, a.q_lora_rank, bias=False)
            self.q_a_layernorm = RMSNorm(a.q_lora_rank)  # eps 1e-6 as DeepSeek, not norm_eps
            self.q_b_proj = nn.Linear(a.q_lora_rank, h * dqk, bias=False)
        self.kv_a_proj_with_mqa = nn.Linear(cfg.dim, a.kv_lora_rank + a.qk_rope_head_dim,
                                            bias=a.qkv_bias)
        # None: a converted GQA model, whose latent is a linear map of x (MLAConfig.latent_norm).
        self.kv_a_layernorm = RMSNorm(a.kv_lora_rank) if a.latent_norm else None
        self.kv_b_proj = nn.Linear(a.kv_lora_rank, h * (a.qk_nope_head_dim + a.v_head_dim), bias=False)
        self.o_proj = nn.Linear(h * a.v_head_dim, cfg.dim, bias=a.o_bias)

    # ----------------------------------------------------------------- projections
    def project_query(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
        """x (B, T, dim) -> q (B, T, H, d_qk) (nope first, rope last, not yet rotated) and the
        normalised query latent c_q (B, T, d_q), or None without query compression."""
        a = self.cfg
        if a.q_lora_rank is None:
            return self.q_proj(x).view(*x.shape[:2], a.n_heads, a.qk_head_dim), None
        c_q = self.q_a_layernorm(self.q_a_proj(x))
        return self.q_b_proj(c_q).view(*x.shape[:2], a.n_heads, a.qk_head_dim), c_q

    def rotated_query(
        self, x: torch.Tensor, rope: tuple[torch.Tensor, torch.Tensor]
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """project_query with the rope part rotated."""
        a = self.cfg
        q, c_q = self.project_query(x)
        q_nope, q_rope = q.split([a.qk_nope_head_dim, a.qk_rope_head_dim], dim=-1)
        return torch.cat((q_nope, apply_rope(q_rope, *rope, self.interleaved)), dim=-1), c_q

    def project_latent(
        self, x: torch.Tensor, rope: tuple[torch.Tensor, torch.Tensor]
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """x (B, T, dim) -> c (B, T, d_c) normalised, k_rope (B, T, d_r) rotated: what is cached."""
        a = self.cfg
        c, k_rope = self.kv_a_proj_with_mqa(x).split([a.kv_lora_rank, a.qk_rope_head_dim], dim=-1)
        k_rope = apply_rope(k_rope.unsqueeze(2), *rope, self.interleaved).squeeze(2)
        return (c if self.kv_a_layernorm is None else self.kv_a_layernorm(c)), k_rope

    def up_weights(self) -> tuple[torch.Tensor, torch.Tensor]:
        """W_UK (H, d_n, d_c) and W_UV (H, d_v, d_c): kv_b_proj viewed per head."""
        a = self.cfg
        w = self.kv_b_proj.weight.view(a.n_heads, a.qk_nope_head_dim + a.v_head_dim, a.kv_lora_rank)
        return w[:, : a.qk_nope_head_dim], w[:, a.qk_nope_head_dim :]

    # ----------------------------------------------------------------- the two forms
    def decompress(self, c: torch.Tensor, k_rope: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """c (B, S, d_c), k_rope (B, S, d_r) -> k (B, S, H, d_qk), v (B, S, H, d_v)."""
        a = self.cfg
        b, s, _ = c.shape
        kv = self.kv_b_proj(c).view(b, s, a.n_heads, a.qk_nope_head_dim + a.v_head_dim)
        k_nope, v = kv.split([a.qk_nope_head_dim, a.v_head_dim], dim=-1)
        k = torch.cat((k_nope, k_rope.unsqueeze(2).expand(b, s, a.n_heads, a.qk_rope_head_dim)), -1)
        return k, v

    def naive(
        self, q: torch.Tensor, c: torch.Tensor, k_rope: torch.Tensor, step: Step
    ) -> torch.Tensor:
        """Decompress c (B, S, d_c) into per-head K/V and attend. q (B, T, H, d_qk) rotated."""
        return self._attend_heads(q, *self.decompress(c, k_rope), step)

    def absorb_query(self, q: torch.Tensor) -> torch.Tensor:
        """q (B, T, H, d_qk) rotated -> (B, H, T, d_c + d_r): [W_UK[h]^T q_nope[h] | q_rope[h]]."""
        a = self.cfg
        w_uk, _ = self.up_weights()
        q_nope, q_rope = q.split([a.qk_nope_head_dim, a.qk_rope_head_dim], dim=-1)
        q_lat = torch.einsum("bthn,hnc->bhtc", q_nope, w_uk)  # (B, H, T, d_c)
        return torch.cat((q_lat, q_rope.transpose(1, 2)), dim=-1)

    def unabsorb(self, o_lat: torch.Tensor) -> torch.Tensor:
        """o_lat (B, H, T, d_c) -> (B, T, H * d_v): o[h] = W_UV[h] o_lat[h]."""
        _, w_uv = self.up_weights()
        o = torch.einsum("bhtc,hvc->bthv", o_lat, w_uv)
        return o.flatten(2)

    def absorbed(self, q: torch.Tensor, kv: torch.Tensor, step: Step) -> torch.Tensor:
        """MQA over the latent: q (B, T, H, d_qk) rotated, kv (B, S, d_c + d_r) -> (B, T, H*d_v)."""
        return self.unabsorb(latent_attention(self.absorb_query(q), kv, self.scale,
                                              self.cfg.kv_lora_rank, step))

    def _attend_heads(
        self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, step: Step
    ) -> torch.Tensor:
        """Per-head attention: q (B, T, H, d_qk), k (B, S, H, d_qk), v (B, S, H, d_v)."""
        b, t, h, _ = q.shape
        o = attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), self.scale,
                      mask=step.mask, causal=step.causal)
        return o.transpose(1, 2).reshape(b, t, h * v.shape[-1])

    # ----------------------------------------------------------------- forward
    def cache_spec(self) -> CacheSpec:
        """What a token leaves in the cache: the decompressed per-head K/V for the naive form,
        the latent [c | k_rope] otherwise."""
        a = self.cfg
        if a.impl == "naive":
            return DenseSpec(a.n_heads, a.qk_head_dim, a.v_head_dim)
        return LatentSpec(a.kv_lora_rank, a.qk_rope_head_dim)

    def use_absorbed(self, seq_len: int) -> bool:
        """auto: naive for prefill/training (T > 1), absorbed for decode (T == 1)."""
        impl = self.cfg.impl
        return impl == "absorb" or (impl == "auto" and seq_len == 1)

    def forward(
        self, x: torch.Tensor, rope: tuple[torch.Tensor, torch.Tensor], step: Step,
        cache: LayerCache | None = None,
    ) -> torch.Tensor:
        """x (B, T, dim) -> (B, T, dim)."""
        a = self.cfg
        q, _ = self.rotated_query(x, rope)
        c, k_rope = self.project_latent(x, rope)

        if cache is not None and not cache.holds("latent"):  # naive form, decompressed K/V cached
            k, v = self.decompress(c, k_rope)
            cache.keys.write(step, k)
            cache.values.write(step, v)
            if not step.causal:  # the compute dtype, whatever the cache's
                k, v = cache.keys.read(step, k.dtype), cache.values.read(step, v.dtype)
            return self.o_proj(self._attend_heads(q, k, v, step))

        latent = torch.cat((c, k_rope), dim=-1)  # (B, T, d_c + d_r)
        if cache is not None:
            cache.latent.write(step, latent)
            # Decode through the kernel before any read: it reads the cache in place, and a read
            # would copy (or dequantise) the whole cache for nothing.
            if x.shape[1] == 1 and step.valid is None and self.use_absorbed(1):
                o_lat = self._decode_kernel(q, cache.latent, step)
                if o_lat is not None:
                    return self.o_proj(self.unabsorb(o_lat.unsqueeze(2)))
            if not step.causal:
                latent = cache.latent.read(step, latent.dtype)
        if self.use_absorbed(x.shape[1]):
            return self.o_proj(self.absorbed(q, latent, step))
        c_all, k_rope_all = latent.split([a.kv_lora_rank, a.qk_rope_head_dim], dim=-1)
        return self.o_proj(self.naive(q, c_all, k_rope_all, step))

    def _decode_kernel(self, q: torch.Tensor, latent: Store, step: Step) -> torch.Tensor | None:
        """One decode step through the Triton kernel, straight from the latent store (no read
        copy): the latent-space output (B, H, R), or None when the backend is torch or the store
        is not one the kernel reads (rows in q's dtype, or fp8 records; contiguous or paged)."""
        buf, fp8, table = latent.buffers[0], latent.fp8, latent.block_table
        one_row = len(latent.buffers) == 1  # latent rows or fp8 records, one tensor either way
        if not one_row or (not fp8 and buf.dtype != q.dtype) or not runs_triton(q):
            return None
        lengths = (step.positions[:, 0] + 1).to(torch.int32)
        qa = self.absorb_query(q)[:, :, 0]
        rank = self.cfg.kv_lora_rank
        # step.kv_len is the longest row, known on the host: the kernel then syncs nothing.
        decode = mla_decode_fp8_triton if fp8 else mla_decode_triton
        o_lat, _ = decode(qa, buf, lengths, self.scale, rank, block_table=table, max_len=step.kv_len)
        return o_lat
