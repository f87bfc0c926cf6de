"""One decoder layer (DeepSeek-V3 ``inference/model.py`` order: pre-norm attention, pre-norm FFN
or MoE), with DeepSeek-V4's mHC around each when ``ModelConfig.hyper`` is set
(:mod:`latentattn.model.hyper`; transformers' DeepseekV4DecoderLayer).

Block has no forward of its own: the attention and the FFN are the modules that are called
(FSDP2 shards them one by one, latentattn.train.distributed), and :meth:`Block.residual` /
:meth:`Block.streams` call them in order."""

from __future__ import annotations

import torch
from torch import nn

from latentattn.attention import GroupedQueryAttention, MultiHeadLatentAttention, RMSNorm
from latentattn.attention.dsa import SparseLatentAttention
from latentattn.attention.norm import Float32RMSNorm
from latentattn.attention.v4 import V4Attention
from latentattn.cache.kv import LayerCache, Step
from latentattn.config import MLAConfig, ModelConfig, V4AttentionConfig
from latentattn.model.ffn import MLP, MoE
from latentattn.model.hyper import HyperConnection, hyper_residual


def make_norm(cfg: ModelConfig) -> RMSNorm:
    """The norm of the blocks and of the model's output: V4's in a V4 model."""
    if isinstance(cfg.attention, V4AttentionConfig):
        return Float32RMSNorm(cfg.dim, cfg.norm_eps)
    return RMSNorm(cfg.dim, cfg.norm_eps)


class Block(nn.Module):
    def __init__(self, cfg: ModelConfig, layer: int) -> None:
        super().__init__()
        self.input_layernorm = make_norm(cfg)
        a = cfg.attention
        self.self_attn: GroupedQueryAttention | MultiHeadLatentAttention | V4Attention
        if isinstance(a, V4AttentionConfig):
            self.self_attn = V4Attention(cfg, layer)
        elif isinstance(a, MLAConfig):
            self.self_attn = (MultiHeadLatentAttention(cfg) if a.indexer is None
                              else SparseLatentAttention(cfg))
        else:
            self.self_attn = GroupedQueryAttention(cfg)
        self.post_attention_layernorm = make_norm(cfg)
        self.mlp: MLP | MoE = (
            MoE(cfg.dim, cfg.moe, cfg.vocab_size if cfg.is_hash_layer(layer) else None)
            if cfg.moe is not None and cfg.is_moe_layer(layer)
            else MLP(cfg.dim, cfg.intermediate_size)
        )
        self.attn_hc = HyperConnection(cfg) if cfg.hyper is not None else None
        self.ffn_hc = HyperConnection(cfg) if cfg.hyper is not None else None

    def ffn(self, x: torch.Tensor, input_ids: torch.Tensor) -> torch.Tensor:
        """The FFN on x (B, T, dim); a MoE also gets the ids (B, T): hash layers route by them."""
        return self.mlp(x, input_ids) if isinstance(self.mlp, MoE) else self.mlp(x)

    def attention(self, x: torch.Tensor, rope: tuple[torch.Tensor, torch.Tensor], step: Step,
                  cache: LayerCache | None, losses: list[torch.Tensor] | None) -> torch.Tensor:
        """The attention on the normalised x; a layer with an indexer in training appends its KL
        to ``losses`` (returned by the layer, not stored on it; None: not collected)."""
        if losses is not None and isinstance(self.self_attn, (SparseLatentAttention, V4Attention)):
            out, loss = self.self_attn(x, rope, step, cache, with_loss=True)
            if loss is not None:
                losses.append(loss)
            return out
        return self.self_attn(x, rope, step, cache)

    def residual(self, h: torch.Tensor, rope: tuple[torch.Tensor, torch.Tensor], step: Step,
                 cache: LayerCache | None, input_ids: torch.Tensor,
                 losses: list[torch.Tensor] | None = None) -> torch.Tensor:
        """The plain residual layer: h (B, T, dim) -> (B, T, dim)."""
        h = h + self.attention(self.input_layernorm(h), rope, step, cache, losses)
        return h + self.ffn(self.post_attention_layernorm(h), input_ids)

    def streams(self, hs: torch.Tensor, rope: tuple[torch.Tensor, torch.Tensor], step: Step,
                cache: LayerCache | None, input_ids: torch.Tensor,
                losses: list[torch.Tensor] | None = None) -> torch.Tensor:
        """The layer under mHC: streams hs (B, T, N, dim) -> (B, T, N, dim); each sub-block reads
        its HyperConnection's collapse and writes back through :func:`hyper_residual`."""
        assert self.attn_hc is not None and self.ffn_hc is not None, "a Block built without mHC"
        post, comb, x = self.attn_hc(hs)
        out = self.attention(self.input_layernorm(x), rope, step, cache, losses)
        hs = hyper_residual(post, comb, out, hs)
        post, comb, x = self.ffn_hc(hs)
        return hyper_residual(post, comb, self.ffn(self.post_attention_layernorm(x), input_ids), hs)
