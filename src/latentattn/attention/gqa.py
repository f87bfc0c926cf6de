"""One module for MHA (n_kv_heads == n_heads), GQA and MQA (n_kv_heads == 1)."""

from __future__ import annotations

import torch
from torch import nn

from latentattn.cache.build import DenseSpec
from latentattn.cache.layer import LayerCache
from latentattn.cache.step import Step
from latentattn.config import GQAConfig, ModelConfig
from latentattn.kernels import attention
from latentattn.rope import apply_rope


class GroupedQueryAttention(nn.Module):
    """Llama-style attention; parameter names q/k/v/o_proj as in Hugging Face's Llama."""

    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        a = cfg.attention
        assert isinstance(a, GQAConfig)
        self.cfg = a
        self.interleaved = cfg.rope.interleaved
        self.scale = a.head_dim**-0.5
        self.q_proj = nn.Linear(cfg.dim, a.n_heads * a.head_dim, bias=a.qkv_bias)
        self.k_proj = nn.Linear(cfg.dim, a.n_kv_heads * a.head_dim, bias=a.qkv_bias)
        self.v_proj = nn.Linear(cfg.dim, a.n_kv_heads * a.head_dim, bias=a.qkv_bias)
        self.o_proj = nn.Linear(a.n_heads * a.head_dim, cfg.dim, bias=a.o_bias)

    def cache_spec(self) -> DenseSpec:
        """What a token leaves in the cache: its n_kv_heads keys and values."""
        a = self.cfg
        return DenseSpec(a.n_kv_heads, a.head_dim, a.head_dim)

    def forward(
        self, x: torch.Tensor, rope: tuple[torch.Tensor, torch.Tensor], step: Step,
        cache: LayerCache | None = None,
    ) -> torch.Tensor:
        """x (B, T, dim) -> (B, T, dim)."""
        a = self.cfg
        b, t, _ = x.shape
        q = apply_rope(self.q_proj(x).view(b, t, a.n_heads, a.head_dim), *rope, self.interleaved)
        k = apply_rope(self.k_proj(x).view(b, t, a.n_kv_heads, a.head_dim), *rope, self.interleaved)
        v = self.v_proj(x).view(b, t, a.n_kv_heads, a.head_dim)
        if cache is not None:
            cache.keys.write(step, k)
            cache.values.write(step, v)
            if not step.causal:  # (B, S, Hkv, D) in the compute dtype, whatever the cache's
                k, v = cache.keys.read(step, k.dtype), cache.values.read(step, v.dtype)
        o = attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), self.scale,
                      mask=step.mask, causal=step.causal)  # (B, H, T, D)
        return self.o_proj(o.transpose(1, 2).reshape(b, t, a.n_heads * a.head_dim))
