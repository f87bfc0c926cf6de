"""A decoder-only transformer over any attention variant (DeepSeek-V3 ``inference/model.py`` order:
pre-norm attention, pre-norm FFN or MoE, residuals, final norm, untied LM head), and DeepSeek-V4's
form with mHC (the residual as ``hc_mult`` streams, :mod:`latentattn.model.hyper`)."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Literal, cast, overload

import torch
from torch import nn

from latentattn.cache.build import build_cache
from latentattn.cache.kv import KVCache
from latentattn.cache.step import Step, fresh_step
from latentattn.config import ModelConfig
from latentattn.errors import ConfigError
from latentattn.model.block import Block, make_norm
from latentattn.model.ffn import Router
from latentattn.model.hyper import HyperConnection, HyperHead
from latentattn.rope import RotaryEmbedding

__all__ = ["Block", "CompiledSteps", "Transformer"]

# Transformer.run's signature: (input_ids, step, cache, logits_at) -> (logits, indexer loss).
Runner = Callable[[torch.Tensor, Step, "KVCache | None", "torch.Tensor | None"],
                  tuple[torch.Tensor, "torch.Tensor | None"]]


@dataclass(frozen=True)
class CompiledSteps:
    """What :func:`latentattn.compile` made of a model: its prefill and decode steps."""

    prefill: Runner
    decode: Runner


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
    ``return_indexer_loss=True`` returns ``(logits, indexer_loss)``: the DSA layers' indexer KL
    summed over layers, None when no layer trains its indexer (``train.dsa.set_dsa_stage``).
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
        # The indexer loss of the last forward, for train.dsa.indexer_loss(model): code that
        # reads it after model(ids). Training takes the returned one instead.
        self.last_indexer_loss: torch.Tensor | None = None
        # Set by latentattn.compile: the compiled prefill and decode steps.
        self.compiled_steps: CompiledSteps | None = None

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
        page_size: int | None = None, num_pages: int | None = None, static: bool | None = None,
    ) -> KVCache:
        """Preallocate every layer's cache (:func:`latentattn.cache.build.build_cache`): each
        attention says what it caches (``cache_spec``: per-head K/V, the MLA latent, DSA's
        latent and indexer keys). ``dtype`` (default the model's): what the cache holds, or what
        fp8 stores are read back as. ``latent_fp8``: the latent in FlashMLA's fp8 record (MLA
        with impl auto or absorb, or DSA beside its indexer keys). ``page_size``: the latent in
        pages of that many tokens from a pool of ``num_pages`` (default: room for every row at
        ``capacity``; dense MLA only); both together: FlashMLA's paged fp8 layout. ``static``
        (default: whether the model is compiled): every step reads the whole capacity, so a
        decode step's shapes never change (:class:`~latentattn.cache.kv.KVCache`)."""
        capacity = capacity or self.config.max_seq_len
        if capacity > self.config.max_seq_len:
            raise ConfigError(
                f"cache capacity {capacity} exceeds the model's max_seq_len {self.config.max_seq_len}"
            )
        return build_cache([blk.self_attn.cache_spec() for blk in self.blocks], batch, capacity,
                           dtype or self.dtype, device or self.device,
                           latent_format="fp8" if latent_fp8 else "model", page_size=page_size,
                           num_pages=num_pages, name=self.config.name,
                           static=self.compiled_steps is not None if static is None else static)

    @overload
    def forward(self, input_ids: torch.Tensor, cache: KVCache | None = None,
                lengths: torch.Tensor | None = None, *, return_indexer_loss: Literal[False] = False,
                logits_at: torch.Tensor | None = None) -> torch.Tensor: ...

    @overload
    def forward(self, input_ids: torch.Tensor, cache: KVCache | None = None,
                lengths: torch.Tensor | None = None, *, return_indexer_loss: Literal[True],
                logits_at: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor | None]: ...

    def forward(
        self, input_ids: torch.Tensor, cache: KVCache | None = None,
        lengths: torch.Tensor | None = None, *, return_indexer_loss: bool = False,
        logits_at: torch.Tensor | None = None,
    ) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor | None]:
        """``logits_at`` (B,): the logits of that position of each row only, (B, vocab) (what
        generation needs of a prefill: the LM head over one position instead of T)."""
        b, t = input_ids.shape
        if cache is None:
            if t > self.config.max_seq_len:
                raise ConfigError(
                    f"input of {t} tokens exceeds the model's max_seq_len {self.config.max_seq_len}"
                )
            step = fresh_step(b, t, input_ids.device)
        else:
            step = cache.step(t, lengths)  # host bookkeeping: nothing read back from the device
        logits, self.last_indexer_loss = self._runner(t, cache)(input_ids, step, cache, logits_at)
        if cache is not None:
            cache.advance(t, lengths)
        return (logits, self.last_indexer_loss) if return_indexer_loss else logits

    def run(self, input_ids: torch.Tensor, step: Step, cache: KVCache | None,
            logits_at: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor | None]:
        """The tensor work of one planned forward: (logits, indexer loss or None). Nothing here
        reads a tensor back to the host or changes the cache's counts, so with a static cache a
        decode step has the same graph every call (what :func:`latentattn.compile` compiles)."""
        rope = self.rotary(step.positions)
        h = self.embed_tokens(input_ids)
        losses: list[torch.Tensor] = []  # the indexer KLs of DSA / V4 CSA layers that train one
        if self.hc_head is None:
            for i, blk in enumerate(self.blocks):
                h = blk.residual(h, rope, step, None if cache is None else cache[i], input_ids, losses)
        else:
            # mHC: every stream starts as the embedding (transformers' DeepseekV4Model).
            h = h.unsqueeze(2).expand(-1, -1, self.hc_head.hc_mult, -1).contiguous()  # (B, T, N, dim)
            for i, blk in enumerate(self.blocks):
                h = blk.streams(h, rope, step, None if cache is None else cache[i], input_ids, losses)
            h = self.hc_head(h)  # (B, T, dim)
        if logits_at is not None:
            h = h[torch.arange(h.shape[0], device=h.device), logits_at]  # (B, dim)
        logits = self.lm_head(self.norm(h))
        return logits, (torch.stack(losses).sum() if losses else None)

    def _runner(self, seq_len: int, cache: KVCache | None) -> Runner:
        """``run``, or its compiled form for this kind of step after :func:`latentattn.compile`
        (a compiled decode step needs a static cache: its shapes must not change)."""
        steps = self.compiled_steps
        if steps is None or (self.training and torch.is_grad_enabled()):
            return self.run
        if seq_len == 1 and cache is not None and cache.static:
            return steps.decode
        return steps.prefill

    def num_parameters(self, exclude_embeddings: bool = False) -> int:
        n = sum(p.numel() for p in self.parameters())
        if exclude_embeddings:
            n -= self.embed_tokens.weight.numel()
        return n

    def generate(self, input_ids: torch.Tensor, max_new_tokens: int, **kwargs: object) -> torch.Tensor:
        """See :func:`latentattn.model.generate.generate`."""
        from latentattn.model.generate import generate

        return generate(self, input_ids, max_new_tokens, **kwargs)  # type: ignore[arg-type]
