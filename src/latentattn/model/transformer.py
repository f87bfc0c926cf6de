"""A decoder-only transformer over any attention variant (DeepSeek-V3 ``inference/model.py`` order:
pre-norm attention, pre-norm FFN or MoE, residuals, final norm, untied LM head), and DeepSeek-V4's
form with mHC (the residual as ``hc_mult`` streams, :mod:`latentattn.model.hyper`)."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from typing import cast

import torch
from torch import nn

from latentattn.attention import MultiHeadLatentAttention
from latentattn.attention.dsa import SparseLatentAttention
from latentattn.cache.kv import FP8LatentKV, KVCache, LayerCache, fresh_step
from latentattn.cache.paged import PagedKVCache, PagedLatentKV, PagePool
from latentattn.config import ModelConfig
from latentattn.errors import ConfigError
from latentattn.model.block import Block, make_norm
from latentattn.model.ffn import Router
from latentattn.model.hyper import HyperConnection, HyperHead
from latentattn.rope import RotaryEmbedding

__all__ = ["Block", "Transformer"]


@contextmanager
def _parameters_on_meta() -> Iterator[None]:
    """Modules built inside get their parameters on the meta device (no memory, no init work)
    and their buffers for real: accelerate's ``init_empty_weights(include_buffers=False)``."""
    register = nn.Module.register_parameter

    def on_meta(module: nn.Module, name: str, param: nn.Parameter | None) -> None:
        if param is not None and not param.is_meta:
            param = nn.Parameter(param.to("meta"), requires_grad=param.requires_grad)
        register(module, name, param)

    nn.Module.register_parameter = on_meta  # type: ignore[method-assign,assignment]
    try:
        yield
    finally:
        nn.Module.register_parameter = register  # type: ignore[method-assign]


class Transformer(nn.Module):
    """``forward(input_ids (B, T), cache=None, lengths=None) -> logits (B, T, vocab)``.

    With a cache, the T tokens of each row are appended after the row's cached tokens;
    ``lengths`` (B,) marks how many of them are real in a right-padded ragged batch.
    """

    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.config = cfg
        self.embed_tokens = nn.Embedding(cfg.vocab_size, cfg.dim)
        self.layers = nn.ModuleList(Block(cfg, i) for i in range(cfg.n_layers))
        self.norm = make_norm(cfg)
        self.lm_head = nn.Linear(cfg.dim, cfg.vocab_size, bias=False)
        if cfg.tie_word_embeddings:
            self.lm_head.weight = self.embed_tokens.weight
        self.hc_head = HyperHead(cfg) if cfg.hyper is not None else None
        self.rotary = RotaryEmbedding(cfg.rope_dim, cfg.rope, cfg.max_seq_len)
        self.apply(self._init_weights)

    @classmethod
    def empty(cls, cfg: ModelConfig, dtype: torch.dtype, device: torch.device | str) -> Transformer:
        """The model with uninitialised weights (no random init, one copy of the weights), for
        loaders that fill every tensor from a checkpoint; buffers that are not saved (the RoPE
        tables) are rebuilt, and fp32-kept tensors stay fp32 (:mod:`latentattn.precision`)."""
        with torch.device("meta"):
            model = cls(cfg)
        model.to(dtype=dtype)
        model.to_empty(device=device)
        # to_empty replaces each module's parameters separately, which unties shared ones.
        if cfg.tie_word_embeddings:
            model.lm_head.weight = model.embed_tokens.weight
        model.rotary = RotaryEmbedding(cfg.rope_dim, cfg.rope, cfg.max_seq_len).to(device)
        saved = set(model.state_dict())
        unsaved = [n for n, _ in model.named_buffers() if n not in saved and not n.startswith("rotary.")]
        if unsaved:
            # Other computed buffers (V4's attention, compressors and indexer keep their RoPE
            # frequencies so): from the model built with its parameters on the meta device, in
            # the dtype the cast gave each (fp32 where kept), cast once from their exact values.
            with _parameters_on_meta():
                fresh = cls(cfg)
            for name in unsaved:
                owner, _, leaf = name.rpartition(".")
                buf = fresh.get_buffer(name).to(device=device, dtype=model.get_buffer(name).dtype)
                model.get_submodule(owner).register_buffer(leaf, buf, persistent=False)
        return model

    @staticmethod
    def _init_weights(module: nn.Module) -> None:
        if isinstance(module, (nn.Linear, nn.Embedding, Router)):
            nn.init.normal_(module.weight, mean=0.0, std=0.02)
        if isinstance(module, Router) and module.is_hash:
            nn.init.zeros_(module.tid2eid)  # a checkpoint's table replaces it (transformers: zeros)
        if isinstance(module, (HyperConnection, HyperHead)):
            module.reset_parameters()

    @property
    def blocks(self) -> list[Block]:
        return [cast(Block, blk) for blk in self.layers]

    @property
    def device(self) -> torch.device:
        return self.embed_tokens.weight.device

    @property
    def dtype(self) -> torch.dtype:
        return self.embed_tokens.weight.dtype

    def make_cache(
        self, batch: int, capacity: int | None = None, dtype: torch.dtype | None = None,
        device: torch.device | str | None = None, latent_fp8: bool = False,
        page_size: int | None = None, num_pages: int | None = None,
    ) -> KVCache:
        """Preallocate every layer's cache: the form follows the attention (and ``mla.impl``).
        ``latent_fp8``: MLA's latent in FlashMLA's fp8 record (cache.kv.FP8LatentKV; dense
        absorbed/auto MLA, or DSA beside its indexer keys), ``dtype`` then being what it is read
        back as. ``page_size``: the
        latent in pages of that many tokens from a pool of ``num_pages`` (default: room for every
        row at ``capacity``; cache.paged, dense absorbed/auto MLA only); both together: pages of
        fp8 records, FlashMLA's paged fp8 layout."""
        capacity = capacity or self.config.max_seq_len
        if capacity > self.config.max_seq_len:
            raise ConfigError(
                f"cache capacity {capacity} exceeds the model's max_seq_len {self.config.max_seq_len}"
            )
        dtype, device = dtype or self.dtype, device or self.device
        if latent_fp8 or page_size is not None:
            return self._latent_cache(batch, capacity, dtype, device, latent_fp8, page_size, num_pages)
        layers = [blk.self_attn.make_cache(batch, capacity, dtype, device) for blk in self.blocks]
        return KVCache(layers, batch, capacity, device)

    def _latent_cache(self, batch: int, capacity: int, dtype: torch.dtype,
                      device: torch.device | str | None, latent_fp8: bool, page_size: int | None,
                      num_pages: int | None) -> KVCache:
        """make_cache's fp8 and paged forms: fp8 records for dense MLA (auto or absorb) and for
        DSA (whose cache adds the indexer keys), pages for dense MLA."""
        mla = [blk.self_attn for blk in self.blocks if isinstance(blk.self_attn, MultiHeadLatentAttention)]
        dsa = [a for a in mla if isinstance(a, SparseLatentAttention)]
        dense = [a for a in mla if not isinstance(a, SparseLatentAttention) and a.cfg.impl != "naive"]
        if page_size is None:  # fp8 records, contiguous
            if len(dense) + len(dsa) != len(self.blocks):
                raise ConfigError(f"the fp8 latent cache holds the latent of MLA (impl auto or absorb) "
                                  f"or DSA; {self.config.name} has other attention")
            return KVCache([a.make_cache(batch, capacity, dtype, device, latent_fp8=True)
                            if isinstance(a, SparseLatentAttention)
                            else FP8LatentKV(batch, capacity, a.cfg.kv_lora_rank, a.cfg.qk_rope_head_dim,
                                             device) for a in mla], batch, capacity, device)
        if len(dense) != len(self.blocks):
            raise ConfigError(f"the paged latent cache holds dense MLA's latent (impl auto or absorb); "
                              f"{self.config.name} has other attention")
        pool = PagePool(num_pages or batch * -(-capacity // max(1, page_size)), page_size, batch,
                        capacity, device)
        paged: list[LayerCache] = [PagedLatentKV(pool, a.cfg.kv_lora_rank, a.cfg.qk_rope_head_dim,
                                                 dtype, device, fp8=latent_fp8) for a in dense]
        return PagedKVCache(paged, pool, batch, capacity, device)

    def forward(
        self, input_ids: torch.Tensor, cache: KVCache | None = None,
        lengths: torch.Tensor | None = None,
    ) -> torch.Tensor:
        b, t = input_ids.shape
        if cache is None:
            if t > self.config.max_seq_len:
                raise ConfigError(
                    f"input of {t} tokens exceeds the model's max_seq_len {self.config.max_seq_len}"
                )
            step = fresh_step(b, t, input_ids.device)
        else:
            step = cache.step(t, lengths)
        rope = self.rotary(step.positions)
        h = self.embed_tokens(input_ids)
        if self.hc_head is None:
            for i, blk in enumerate(self.blocks):
                h = blk.residual(h, rope, step, None if cache is None else cache[i], input_ids)
        else:
            # mHC: every stream starts as the embedding (transformers' DeepseekV4Model).
            h = h.unsqueeze(2).expand(-1, -1, self.hc_head.hc_mult, -1).contiguous()  # (B, T, N, dim)
            for i, blk in enumerate(self.blocks):
                h = blk.streams(h, rope, step, None if cache is None else cache[i], input_ids)
            h = self.hc_head(h)  # (B, T, dim)
        if cache is not None:
            cache.advance(t, lengths)
        return self.lm_head(self.norm(h))

    def num_parameters(self, exclude_embeddings: bool = False) -> int:
        n = sum(p.numel() for p in self.parameters())
        if exclude_embeddings:
            n -= self.embed_tokens.weight.numel()
        return n

    def generate(self, input_ids: torch.Tensor, max_new_tokens: int, **kwargs: object) -> torch.Tensor:
        """See :func:`latentattn.model.generate.generate`."""
        from latentattn.model.generate import generate

        return generate(self, input_ids, max_new_tokens, **kwargs)  # type: ignore[arg-type]
