"""MLA with DeepSeek Sparse Attention (DeepSeek-V3.2, arXiv 2512.02556; FlashMLA's sparse kernels).

The indexer picks, for every query token, the top-k cached tokens of its own causal past; the
main attention then reads ONLY those latents, in MLA's absorbed (MQA) form. Forms:

* decode and long prefill: ``sparse_mqa`` gathers k latents per query -- O(T * k).
* short prefill: "masked MHA mode" -- the naive form with dense scores and a selection mask,
  which DeepSeek serves short prefills with. ``prefill_form`` picks one; ``auto`` uses masked
  mode up to ``masked_prefill_max_keys`` keys (``latentattn bench dsa`` at V3.2 dims on a 2-core
  CPU: masked faster through 8k-token prompts, gather from 16k) and only while the keys are at
  most 16x the new tokens: masked mode decompresses every cached latent (~33.5 MFLOP per key at
  V3.2 dims) where gather spends ~570 MFLOP per query, so a short chunk over a long cache gathers.

Training (V3.2 report, arXiv 2512.02556 section 2.1): ``mode = "dense"`` runs the main attention
densely (the indexer warm-up), ``mode = "sparse"`` selects. With ``train_indexer`` set, the
forward also computes the indexer loss and returns it (``with_loss=True``): KL(main attention's
head-averaged probabilities || softmax of the indexer's scores), over all visible keys (dense)
or over the selected ones (sparse); the indexer sees detached inputs, so it learns only from
that KL.

The layer is three pieces, plain functions returning their results, which DeepSeek-V4's CSA
reuses over its compressed entries: :func:`select` (indexer scores -> top-k), the attention
(:func:`attend_gathered`, or :func:`masked_step` for masked mode) and the indexer's KL
(:func:`dense_indexer_kl` for the warm-up stage, :func:`sparse_indexer_kl` for the sparse one).
"""

from __future__ import annotations

from typing import Literal, overload

import torch

from latentattn.attention.indexer import Indexer
from latentattn.attention.mla import MultiHeadLatentAttention
from latentattn.cache.build import LatentSpec
from latentattn.cache.fp8 import dequantize_e4m3
from latentattn.cache.layer import LayerCache
from latentattn.cache.step import Step
from latentattn.config import MLAConfig, ModelConfig
from latentattn.kernels.backend import runs_triton
from latentattn.kernels.indexer_logits import indexer_logits_triton
from latentattn.kernels.sparse import (
    gather_rows,
    index_scores,
    select_topk,
    selection_mask,
    sparse_mqa,
    topk_reference,
    visible,
)
from latentattn.kernels.sparse_mla import sparse_mla_fp8_triton, sparse_mla_triton


def select(q_i: torch.Tensor, w: torch.Tensor, keys: torch.Tensor, positions: torch.Tensor,
           topk: int, scale: float, key_scale: torch.Tensor | None = None,
           in_place: bool = False) -> torch.Tensor:
    """Top-k key indices (B, T, K), -1 where a query sees fewer than K keys.

    q_i (B, T, H_I, d_I) and w (B, T, H_I) fp32; keys (B, S, d_I) as stored: fp32/bf16 rows, or
    e4m3 bytes (uint8) with ``key_scale`` (B, S, d_I / 128). ``in_place``: a decode step over a
    cache's keys, which on a Triton backend the indexer kernel reads as stored (no fp32 copy of
    the whole key cache); otherwise the keys are scored in fp32 block by block (select_topk,
    whose full-matrix reference is topk_reference over index_scores)."""
    if in_place and q_i.shape[1] == 1 and runs_triton(q_i):
        logits = indexer_logits_triton(q_i, w, keys, positions, scale, k_scale=key_scale)
        return topk_reference(logits, positions, topk)
    k = keys.float() if key_scale is None else dequantize_e4m3(keys, key_scale)
    return select_topk(q_i, w, k, positions, topk, scale)


def attend_gathered(q_abs: torch.Tensor, kv: torch.Tensor, idx: torch.Tensor, scale: float,
                    rank: int, records: bool = False, need_probs: bool = False,
                    ) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Absorbed MLA over the selected latents only: q_abs (B, H, T, R + Dr), kv (B, S, R + Dr)
    (``records``: FlashMLA's fp8 records (B, S, bytes), decoded per selected row in the kernel),
    idx (B, T, K) -> o_lat (B, H, T, R) and, with ``need_probs``, the probabilities
    (B, H, T, K) fp32 (the sparse stage's KL target: no gradient needed).

    Triton (forward and backward) when the backend runs it, else ``sparse_mqa``. The selection
    is our own top-k (-1 or in range), so no host-side index check."""
    if records:
        return sparse_mla_fp8_triton(q_abs, kv, idx, scale, rank, check_indices=False)[0], None
    if runs_triton(q_abs) and q_abs.dtype == kv.dtype:
        o_lat, _ = sparse_mla_triton(q_abs, kv, idx, scale, rank, check_indices=False)
        probs = None
        if need_probs:
            with torch.no_grad():
                probs = sparse_mqa(q_abs, kv, idx, scale, rank, return_probs=True)[1]
        return o_lat, probs
    return sparse_mqa(q_abs, kv, idx, scale, rank, return_probs=need_probs)


def masked_step(step: Step, idx: torch.Tensor, num_keys: int) -> Step:
    """``step`` with the selection as its mask (B, 1, T, num_keys): the dense attention run
    under it reads every key and keeps the selected ones (masked MHA mode)."""
    return Step(step.positions, step.valid, step.kv_len, selection_mask(idx, num_keys))


def indexer_kl(target: torch.Tensor, logits: torch.Tensor, allowed: torch.Tensor) -> torch.Tensor:
    """Mean over tokens of KL(target || softmax(logits)) over the allowed keys (last axis)."""
    logq = torch.log_softmax(logits.masked_fill(~allowed, float("-inf")), dim=-1)
    terms = torch.where(target > 0, target * (target.clamp(min=1e-30).log() - logq), 0.0)
    return terms.sum(dim=-1).mean()


def dense_indexer_kl(q_i: torch.Tensor, w: torch.Tensor, keys: torch.Tensor, scale: float,
                     target: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
    """The warm-up stage's loss: ``target`` (B, T, S) the dense attention's head-mean
    probabilities, the indexer scoring every key (B, S, d_I) fp32 that each query sees."""
    allowed = visible(positions, 0, keys.shape[1])
    return indexer_kl(target, index_scores(q_i, w, keys, scale), allowed)


def sparse_indexer_kl(q_i: torch.Tensor, w: torch.Tensor, keys: torch.Tensor, idx: torch.Tensor,
                      scale: float, probs: torch.Tensor) -> torch.Tensor:
    """The sparse stage's loss, over the selected keys only: ``probs`` (B, H, T, K) the sparse
    attention's probabilities, keys (B, S, d_I) fp32, idx (B, T, K)."""
    k_sel = gather_rows(keys, idx)  # (B, T, K, d_I)
    logits = torch.relu(torch.einsum("bthd,btkd->bthk", q_i, k_sel))
    logits = torch.einsum("bth,bthk->btk", w, logits) * scale
    return indexer_kl(probs.detach().mean(dim=1), logits, idx >= 0)


class SparseLatentAttention(MultiHeadLatentAttention):
    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__(cfg)
        a = cfg.attention
        assert isinstance(a, MLAConfig) and a.indexer is not None
        self.indexer = Indexer(cfg)
        self.topk = a.indexer.index_topk
        # The training stage (train.dsa.set_dsa_stage) and the prefill form (loading.configure_dsa).
        self.mode: Literal["sparse", "dense"] = "sparse"
        self.train_indexer = False
        self.prefill_form: Literal["auto", "gather", "masked"] = "auto"
        self.masked_prefill_max_keys = 8192

    def cache_spec(self) -> LatentSpec:
        """What a token leaves in the cache: the latent and its indexer key (in the format
        ``IndexerConfig.key_cache`` names), whatever ``impl`` is."""
        a = self.cfg
        assert a.indexer is not None
        return LatentSpec(a.kv_lora_rank, a.qk_rope_head_dim, a.indexer.index_head_dim,
                          a.indexer.key_cache)

    @overload
    def forward(self, x: torch.Tensor, rope: tuple[torch.Tensor, torch.Tensor], step: Step,
                cache: LayerCache | None = None, *, with_loss: Literal[False] = False) -> torch.Tensor: ...

    @overload
    def forward(self, x: torch.Tensor, rope: tuple[torch.Tensor, torch.Tensor], step: Step,
                cache: LayerCache | None = None, *, with_loss: Literal[True]
                ) -> tuple[torch.Tensor, torch.Tensor | None]: ...

    def forward(
        self, x: torch.Tensor, rope: tuple[torch.Tensor, torch.Tensor], step: Step,
        cache: LayerCache | None = None, *, with_loss: bool = False,
    ) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor | None]:
        """x (B, T, dim) -> (B, T, dim); ``with_loss``: and the indexer KL, a scalar when
        ``train_indexer`` is set and None otherwise."""
        out, loss = self._attention(x, rope, step, cache)
        return (out, loss) if with_loss else out

    def _attention(
        self, x: torch.Tensor, rope: tuple[torch.Tensor, torch.Tensor], step: Step,
        cache: LayerCache | None,
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        a = self.cfg
        q, c_q = self.rotated_query(x, rope)
        assert c_q is not None
        c, k_rope = self.project_latent(x, rope)
        latent = torch.cat((c, k_rope), dim=-1)  # (B, T, d_c + d_r)
        if self.train_indexer:  # the indexer learns only from its KL (V3.2 report)
            x, c_q = x.detach(), c_q.detach()
        q_i, w = self.indexer.queries(x, c_q, rope)  # (B, T, H_I, d_I), (B, T, H_I) fp32
        k_i = self.indexer.keys(x, rope)  # (B, T, d_I)
        t = x.shape[1]
        keys: tuple[torch.Tensor, ...] = (k_i,)  # what is scored, as stored (+ e4m3 scales)
        records = None  # the fp8 latent records, when the sparse decode kernel reads them
        if cache is not None:
            cache.latent.write(step, latent)
            cache.index_keys.write(step, k_i)
            # Score the keys as cached even on a fresh prefill: with fp8 keys, prefill and decode
            # must score the same quantised keys or they select differently.
            keys = cache.index_keys.views(step)
            if (self.mode == "sparse" and cache.latent.fp8 and t == 1 and not self.train_indexer
                    and runs_triton(q)):
                (records,) = cache.latent.views(step)  # the kernel decodes the selected rows
            else:
                latent = cache.latent.read(step, latent.dtype)  # a view when the dtypes agree
        s = step.kv_len if cache is not None else t

        if self.mode == "dense":
            if self.use_absorbed(t):
                out = self.absorbed(q, latent, step)
            else:
                out = self.naive(q, *self._split(latent), step)
            loss = None
            if self.train_indexer:
                target = self.dense_head_mean_probs(q, latent, step)
                loss = dense_indexer_kl(q_i, w, self._keys_fp32(k_i, cache, step),
                                        self.indexer.scale, target, step.positions)
            return self.o_proj(out), loss

        idx = select(q_i, w, keys[0], step.positions, self.topk, self.indexer.scale,
                     key_scale=keys[1] if len(keys) > 1 else None,
                     in_place=cache is not None and not self.train_indexer)  # (B, T, K)
        if self.prefers_masked(t, s):
            return self.o_proj(self.naive(q, *self._split(latent), masked_step(step, idx, s))), None
        o_lat, probs = attend_gathered(self.absorb_query(q), latent if records is None else records,
                                       idx, self.scale, a.kv_lora_rank, records=records is not None,
                                       need_probs=self.train_indexer)
        loss = None
        if self.train_indexer:
            assert probs is not None
            loss = sparse_indexer_kl(q_i, w, self._keys_fp32(k_i, cache, step), idx,
                                     self.indexer.scale, probs)
        return self.o_proj(self.unabsorb(o_lat)), loss

    def prefers_masked(self, t: int, s: int) -> bool:
        """Whether a prefill of t tokens over s keys runs masked MHA mode (module docstring);
        never in training, whose KL needs the gathered attention's probabilities."""
        form, t_ok = self.prefill_form, not self.train_indexer and t > 1
        return t_ok and (form == "masked" or (
            form == "auto" and s <= self.masked_prefill_max_keys and s <= 16 * t))

    def _split(self, latent: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(B, S, d_c + d_r) -> c (B, S, d_c), k_rope (B, S, d_r)."""
        c, k_rope = latent.split([self.cfg.kv_lora_rank, self.cfg.qk_rope_head_dim], dim=-1)
        return c, k_rope

    @staticmethod
    def _keys_fp32(k_i: torch.Tensor, cache: LayerCache | None, step: Step) -> torch.Tensor:
        """The keys the KL scores, fp32: this call's own (with the indexer's gradient) without
        a cache, every cached one (dequantised) with it."""
        return k_i.float() if cache is None else cache.index_keys.read(step, torch.float32)

    @torch.no_grad()
    def dense_head_mean_probs(self, q: torch.Tensor, latent: torch.Tensor, step: Step) -> torch.Tensor:
        """The dense main attention's probabilities averaged over heads: (B, T, S) fp32, rows
        sum to 1. q (B, T, H, d_qk) rotated, latent (B, S, d_c + d_r)."""
        scores = torch.einsum("bhtd,bsd->bhts", self.absorb_query(q).float(), latent.float()) * self.scale
        allowed = visible(step.positions, 0, latent.shape[1]).unsqueeze(1)
        return torch.softmax(scores.masked_fill(~allowed, float("-inf")), dim=-1).mean(dim=1)

    @torch.no_grad()
    def dense_selection(self, x: torch.Tensor, rope: tuple[torch.Tensor, torch.Tensor], step: Step
                        ) -> tuple[torch.Tensor, torch.Tensor]:
        """For the same input without a cache: the dense main attention's head-mean
        probabilities (B, T, S) and the indexer's top-k (B, T, K), what
        ``train.dsa.selection_recall`` compares."""
        q, c_q = self.rotated_query(x, rope)
        assert c_q is not None
        latent = torch.cat(self.project_latent(x, rope), dim=-1)
        q_i, w = self.indexer.queries(x, c_q, rope)
        idx = select(q_i, w, self.indexer.keys(x, rope), step.positions, self.topk, self.indexer.scale)
        return self.dense_head_mean_probs(q, latent, step), idx
