"""DeepSeek Sparse Attention's lightning indexer (DeepSeek-V3.2-Exp ``inference/model.py``,
class Indexer; transformers' ``DeepseekV32Indexer``). Parameter names are transformers'.

q_I = W_q c_q (from MLA's normalised query latent), k_I = LayerNorm(W_k x) (one key per token),
w = W_w x * H_I^-0.5 (fp32). RoPE on the FIRST d_r dims of q_I and k_I, half-split (NOT
interleaved: the interleaved first release lost long-context recall; sglang #13530).
The FP8/Hadamard of the deployed kernel are a precision optimisation (the Hadamard is
orthonormal, so dot products are unchanged) and are not applied to activations here.
"""

from __future__ import annotations

import torch
from torch import nn

from latentattn.config import IndexerConfig, MLAConfig, ModelConfig
from latentattn.precision import Float32Linear
from latentattn.rope import apply_rope


class Indexer(nn.Module):
    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        a = cfg.attention
        assert isinstance(a, MLAConfig) and a.indexer is not None and a.q_lora_rank is not None
        self.cfg: IndexerConfig = a.indexer
        self.rope_dim = a.qk_rope_head_dim
        h, d = self.cfg.index_n_heads, self.cfg.index_head_dim
        self.scale = d**-0.5
        self.wq_b = nn.Linear(a.q_lora_rank, h * d, bias=False)
        self.wk = nn.Linear(cfg.dim, d, bias=False)
        self.k_norm = nn.LayerNorm(d, eps=1e-6)
        self.weights_proj = Float32Linear(cfg.dim, h, bias=False)  # fp32, as DeepSeek keeps it

    def _rope(self, x: torch.Tensor, rope: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
        x_rot, x_pass = x.split([self.rope_dim, x.shape[-1] - self.rope_dim], dim=-1)
        return torch.cat((apply_rope(x_rot, *rope, interleaved=False), x_pass), dim=-1)

    def queries(
        self, x: torch.Tensor, c_q: torch.Tensor, rope: tuple[torch.Tensor, torch.Tensor]
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """x (B, T, dim), c_q (B, T, d_q) -> q (B, T, H_I, d_I) fp32, w (B, T, H_I) fp32."""
        b, t, _ = x.shape
        q = self.wq_b(c_q).view(b, t, self.cfg.index_n_heads, self.cfg.index_head_dim)
        w = self.weights_proj(x) * self.cfg.index_n_heads**-0.5
        return self._rope(q, rope).float(), w

    def keys(self, x: torch.Tensor, rope: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
        """x (B, T, dim) -> k (B, T, d_I), the one indexer key per token that is cached."""
        k = self.k_norm(self.wk(x)).unsqueeze(2)
        return self._rope(k, rope).squeeze(2)
