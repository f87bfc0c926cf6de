"""MLA with DeepSeek Sparse Attention (DeepSeek-V3.2; facts file section 4).

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
layer stores ``indexer_loss``: KL(main attention's head-averaged probabilities || softmax of
the indexer's scores), over all visible keys (dense) or over the selected ones (sparse), and the
indexer sees detached inputs, so it learns only from that KL.
"""

from __future__ import annotations

from typing import Literal

import torch

from latentattn.attention.indexer import Indexer
from latentattn.attention.mla import MultiHeadLatentAttention
from latentattn.cache.build import LatentSpec
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


def kl_to_indexer(target: torch.Tensor, logits: torch.Tensor, allowed: torch.Tensor) -> torch.Tensor:
    """mean over tokens of KL(target || softmax(logits)) over the allowed keys (last axis)."""
    logq = torch.log_softmax(logits.masked_fill(~allowed, float("-inf")), dim=-1)
    terms = torch.where(target > 0, target * (target.clamp(min=1e-30).log() - logq), 0.0)
    return terms.sum(dim=-1).mean()


class SparseLatentAttention(MultiHeadLatentAttention):
    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__(cfg)
        a = cfg.attention
        assert isinstance(a, MLAConfig) and a.indexer is not None
        self.indexer = Indexer(cfg)
        self.topk = a.indexer.index_topk
        self.mode: Literal["sparse", "dense"] = "sparse"
        self.train_indexer = False
        self.indexer_loss: torch.Tensor | None = None
        self.prefill_form: Literal["auto", "gather", "masked"] = "auto"
        self.masked_prefill_max_keys = 8192
        self.record = False  # keep (dense head-mean probs, selection) for attention_mass_recall
        self.recorded: tuple[torch.Tensor, torch.Tensor] | None = None

    def cache_spec(self) -> LatentSpec:
        """What a token leaves in the cache: the latent and its indexer key (in the format
        ``IndexerConfig.key_cache`` names), whatever ``impl`` is."""
        a = self.cfg
        assert a.indexer is not None
        return LatentSpec(a.kv_lora_rank, a.qk_rope_head_dim, a.indexer.index_head_dim,
                          a.indexer.key_cache)

    def forward(
        self, x: torch.Tensor, rope: tuple[torch.Tensor, torch.Tensor], step: Step,
        cache: LayerCache | None = None,
    ) -> torch.Tensor:
        """x (B, T, dim) -> (B, T, dim)."""
        a = self.cfg
        q, c_q = self.rotated_query(x, rope)
        assert c_q is not None
        c, k_rope = self.project_latent(x, rope)
        latent = torch.cat((c, k_rope), dim=-1)  # (B, T, d_c + d_r)
        if self.train_indexer:  # the indexer learns only from its KL (V3.2 report)
            x, c_q = x.detach(), c_q.detach()
        q_i, w = self.indexer.queries(x, c_q, rope)
        k_i = self.indexer.keys(x, rope)
        t = x.shape[1]
        need_selection = self.mode == "sparse" or self.record
        idx = None
        records = None  # the cache's fp8 latent records, when decode reads them in place
        if cache is not None:
            cache.latent.write(step, latent)
            cache.index_keys.write(step, k_i)
            if need_selection and t == 1 and not self.train_indexer and runs_triton(q_i):
                # Decode through the Triton indexer, straight from the cache: it reads the keys
                # as stored (fp8 bytes and their scales, or the cache dtype) in place, where a
                # read would first copy the whole key cache out in fp32.
                keys, *key_scale = cache.index_keys.views(step)
                if cache.latent.fp8 and self.mode == "sparse":
                    # the sparse kernel decodes the selected records itself
                    (records,) = cache.latent.views(step)
                else:
                    latent = cache.latent.read(step, latent.dtype)  # a view when dtypes agree
                logits = indexer_logits_triton(q_i, w, keys, step.positions, self.indexer.scale,
                                               k_scale=key_scale[0] if key_scale else None)
                idx = topk_reference(logits, step.positions, self.topk)
            else:
                # Read back even on a fresh prefill: with the fp8 key cache, prefill and decode
                # must score the same quantised keys or they select differently.
                latent = cache.latent.read(step, latent.dtype)
                k_i = cache.index_keys.read(step, torch.float32)  # as scored
        k_i = k_i.float()
        s = step.kv_len if cache is not None else latent.shape[1]
        if need_selection and idx is None:
            idx = select_topk(q_i, w, k_i, step.positions, self.topk, self.indexer.scale)

        if self.mode == "dense":
            if self.use_absorbed(t):
                out = self.absorbed(q, latent, step)
            else:
                c_all, k_rope_all = latent.split([a.kv_lora_rank, a.qk_rope_head_dim], -1)
                out = self.naive(q, c_all, k_rope_all, step)
            if self.train_indexer or self.record:
                target = self._dense_head_mean_probs(q, latent, step)
                allowed = visible(step.positions, 0, s)
                if self.train_indexer:
                    logits = index_scores(q_i, w, k_i, self.indexer.scale)
                    self.indexer_loss = kl_to_indexer(target, logits, allowed)
                if self.record and idx is not None:
                    self.recorded = (target, idx)
            return self.o_proj(out)

        assert idx is not None
        q_abs = self.absorb_query(q)  # (B, H, T, d_c + d_r)
        use_masked = not self.train_indexer and t > 1 and (
            self.prefill_form == "masked"
            or (self.prefill_form == "auto" and s <= self.masked_prefill_max_keys and s <= 16 * t)
        )
        if use_masked:
            masked = Step(step.positions, step.valid, step.kv_len, selection_mask(idx, s))
            c_all, k_rope_all = latent.split([a.kv_lora_rank, a.qk_rope_head_dim], -1)
            return self.o_proj(self.naive(q, c_all, k_rope_all, masked))
        if records is not None:  # decode over fp8 records: the selected ones decoded in the kernel
            o_lat, _ = sparse_mla_fp8_triton(q_abs, records, idx, self.scale, a.kv_lora_rank,
                                             check_indices=False)
            probs = None
        elif runs_triton(q_abs) and q_abs.dtype == latent.dtype:
            # The Triton kernel (forward and backward); the indexer's target, the selection's
            # head-mean probabilities, needs no gradient.
            # The selection is our own top-k (-1 or in range): no host-side index check.
            o_lat, _ = sparse_mla_triton(q_abs, latent, idx, self.scale, a.kv_lora_rank,
                                         check_indices=False)
            probs = None
            if self.train_indexer:
                with torch.no_grad():
                    _, probs = sparse_mqa(q_abs, latent, idx, self.scale, a.kv_lora_rank,
                                          return_probs=True)
        else:
            o_lat, probs = sparse_mqa(q_abs, latent, idx, self.scale, a.kv_lora_rank,
                                      return_probs=self.train_indexer)
        if self.train_indexer:
            assert probs is not None
            k_sel = gather_rows(k_i, idx)  # (B, T, K, d_I)
            logits = torch.relu(torch.einsum("bthd,btkd->bthk", q_i, k_sel))
            logits = torch.einsum("bth,bthk->btk", w, logits) * self.indexer.scale
            self.indexer_loss = kl_to_indexer(probs.detach().mean(dim=1), logits, idx >= 0)
        return self.o_proj(self.unabsorb(o_lat))

    @torch.no_grad()
    def _dense_head_mean_probs(self, q: torch.Tensor, latent: torch.Tensor, step: Step) -> torch.Tensor:
        """The dense main attention's probabilities averaged over heads: (B, T, S) fp32, rows sum to 1."""
        scores = torch.einsum("bhtd,bsd->bhts", self.absorb_query(q).float(), latent.float()) * self.scale
        allowed = visible(step.positions, 0, latent.shape[1]).unsqueeze(1)
        return torch.softmax(scores.masked_fill(~allowed, float("-inf")), dim=-1).mean(dim=1)
