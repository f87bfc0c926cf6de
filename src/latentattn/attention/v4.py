"""DeepSeek-V4's attention (DeepSeek-V4 report section 2.3; transformers' ``DeepseekV4Attention``).
Parameter names are transformers'. Shapes: x (B, T, dim); H heads of D = head_dim; r = rope dims.

* Queries: q_a_proj -> RMSNorm (c_q) -> q_b_proj -> a weightless RMSNorm per head -> RoPE on the
  last r dims of each head.
* One shared-KV head: kv_proj -> RMSNorm -> RoPE on its last r dims; read as key AND value, so
  the output's rope slice carries each key's rotation: it is rotated back by the query's position
  (cos, -sin), leaving each key's contribution a function of relative distance only.
* Softmax with one learned sink logit per head (as gpt-oss), over the sliding window of the
  layer's own keys plus, for CSA, the k compressed entries the indexer picks, for HCA all of them.
* Output: o_a_proj, a grouped projection (o_groups groups of H * D / o_groups dims, each to
  o_lora_rank), then o_b_proj.

Sliding layers rotate with the model's RoPE, CSA/HCA layers (their compressors and indexer too)
with ``compress_rope``: transformers' "main" and "compress" rotary tables.

Training: with ``train_indexer`` set, a CSA layer's forward also computes its indexer's loss
(:meth:`V4Attention.indexer_kl`, DeepSeek-V3.2's sparse stage) and returns it with
``with_loss=True``, as DSA's layer does (``latentattn.attention.dsa``); other layers return None.
"""

from __future__ import annotations

from typing import Literal, overload

import torch
from torch import nn

from latentattn.attention.norm import Float32RMSNorm
from latentattn.attention.v4_compressor import Compressor, Indexer, rope_tables, rotate_tail
from latentattn.cache.layer import LayerCache
from latentattn.cache.step import Step
from latentattn.cache.v4 import CompressorSpec, V4LayerKV, V4Spec, row_starts
from latentattn.config import CSA, HCA, SLIDING, ModelConfig, V4AttentionConfig
from latentattn.errors import ConfigError
from latentattn.kernels.sparse import gather_rows
from latentattn.kernels.v4 import entry_visibility, selected_mask, v4_attend, v4_attend_reference
from latentattn.precision import KeepFloat32
from latentattn.rope import inv_frequencies


class GroupedLinear(nn.Linear):
    """Block-diagonal linear: x (..., G, in/G) -> (..., G, out/G), group g through weight rows
    [g * out/G, (g + 1) * out/G) (transformers' ``DeepseekV4GroupedLinear``)."""

    def __init__(self, in_per_group: int, out_features: int, groups: int) -> None:
        super().__init__(in_per_group, out_features, bias=False)
        self.groups = groups

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        w = self.weight.view(self.groups, -1, self.weight.shape[-1])  # (G, out/G, in/G)
        return torch.einsum("...gi,goi->...go", x, w)


class V4Attention(KeepFloat32):
    """One V4 layer's attention; ``layer`` picks its type from ``layer_types``. ``sinks`` stays
    fp32 in a bf16 model (transformers' ``_keep_in_fp32_modules_strict``)."""

    inv_freq: torch.Tensor

    def __init__(self, cfg: ModelConfig, layer: int) -> None:
        super().__init__()
        a = cfg.attention
        assert isinstance(a, V4AttentionConfig)
        self.cfg, self.eps = a, cfg.norm_eps
        self.layer_type = a.layer_types[layer]
        h, d = a.n_heads, a.head_dim
        self.q_a_proj = nn.Linear(cfg.dim, a.q_lora_rank, bias=False)
        self.q_a_norm = Float32RMSNorm(a.q_lora_rank, cfg.norm_eps)
        self.q_b_proj = nn.Linear(a.q_lora_rank, h * d, bias=False)
        self.kv_proj = nn.Linear(cfg.dim, d, bias=False)
        self.kv_norm = Float32RMSNorm(d, cfg.norm_eps)
        self.o_a_proj = GroupedLinear(h * d // a.o_groups, a.o_groups * a.o_lora_rank, a.o_groups)
        self.o_b_proj = nn.Linear(a.o_groups * a.o_lora_rank, cfg.dim, bias=False)
        self.sinks = nn.Parameter(torch.zeros(h))
        rope = cfg.rope if self.layer_type == SLIDING else a.compress_rope
        self.register_buffer("inv_freq", inv_frequencies(a.qk_rope_head_dim, rope), persistent=False)
        self.scale = d**-0.5
        self.train_indexer = False  # compute the indexer's KL in forward (training only)
        self.compressor: Compressor | None = None
        if self.layer_type != SLIDING:
            rate = a.rate(self.layer_type)
            self.compressor = Compressor(cfg.dim, d, rate, self.layer_type == CSA, a.qk_rope_head_dim,
                                         a.compress_rope, cfg.norm_eps)
            if self.layer_type == CSA:
                self.compressor.indexer = Indexer(
                    cfg.dim, a.q_lora_rank, a.index_n_heads, a.index_head_dim, a.index_topk, rate,
                    a.qk_rope_head_dim, a.compress_rope, cfg.norm_eps)

    @property
    def indexer(self) -> Indexer | None:
        idx = getattr(self.compressor, "indexer", None)
        return idx if isinstance(idx, Indexer) else None

    def cache_spec(self) -> V4Spec:
        """What this layer caches (``latentattn.cache.build.build_cache`` builds it): the window,
        and its compressor's (and indexer's) entries and pending tokens."""
        parts = [None if c is None else CompressorSpec(c.rate, c.width, c.kv_proj.out_features, c.span)
                 for c in (self.compressor, self.indexer)]
        return V4Spec(self.cfg.sliding_window, self.cfg.head_dim, *parts)

    # ----------------------------------------------------------------- projections
    def project(self, x: torch.Tensor, positions: torch.Tensor
                ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, tuple[torch.Tensor, torch.Tensor]]:
        """q (B, T, H, D) and kv (B, T, D), rotated; c_q (B, T, q_lora); the (cos, sin) used."""
        b, t, _ = x.shape
        a = self.cfg
        rope = rope_tables(self.inv_freq, positions)
        c_q = self.q_a_norm(self.q_a_proj(x))
        q = self.q_b_proj(c_q).view(b, t, a.n_heads, a.head_dim)
        # q_b_norm: a weightless RMSNorm per head (transformers' DeepseekV4UnweightedRMSNorm).
        q = q * torch.rsqrt(q.float().square().mean(-1, keepdim=True) + self.eps).to(q.dtype)
        kv = self.kv_norm(self.kv_proj(x)).unsqueeze(2)
        return rotate_tail(q, *rope), rotate_tail(kv, *rope).squeeze(2), c_q, rope

    def output(self, o: torch.Tensor, rope: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
        """o (B, T, H, D) -> (B, T, dim): un-rotate the rope slice at the query position, project."""
        cos, sin = rope
        o = rotate_tail(o, cos, -sin)
        o = self.o_a_proj(o.reshape(*o.shape[:2], self.cfg.o_groups, -1))
        return self.o_b_proj(o.flatten(2))

    @overload
    def forward(self, x: torch.Tensor, rope: object, step: Step, cache: LayerCache | None = None,
                *, with_loss: Literal[False] = False) -> torch.Tensor: ...

    @overload
    def forward(self, x: torch.Tensor, rope: object, step: Step, cache: LayerCache | None = None,
                *, with_loss: Literal[True]) -> tuple[torch.Tensor, torch.Tensor | None]: ...

    def forward(self, x: torch.Tensor, rope: object, step: Step, cache: LayerCache | None = None,
                *, with_loss: bool = False) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor | None]:
        """x (B, T, dim) -> (B, T, dim); ``with_loss``: and the indexer KL, a scalar for a CSA
        layer with ``train_indexer`` set, None otherwise."""
        q, kv, c_q, rot = self.project(x, step.positions)
        loss = None
        if self.train_indexer and self.indexer is not None:
            if cache is not None:
                raise ConfigError("a V4 indexer trains on whole sequences from position 0, not "
                                  "through a cache")
            probs: list[torch.Tensor] = []
            selection: list[torch.Tensor] = []
            o = self.attend(x, q, kv, c_q, step, None, entry_probs=probs, selection=selection)
            loss = self.indexer_kl(x, c_q, step, selection[0], torch.cat(probs, dim=1))
        else:
            o = self.attend(x, q, kv, c_q, step, cache)
        out = self.output(o, rot)
        return (out, loss) if with_loss else out

    def attend(self, x: torch.Tensor, q: torch.Tensor, kv: torch.Tensor, c_q: torch.Tensor,
               step: Step, cache: LayerCache | None,
               entry_probs: list[torch.Tensor] | None = None,
               selection: list[torch.Tensor] | None = None) -> torch.Tensor:
        """The fast form: window ring + new keys, and gathered (CSA) or all (HCA) entries.
        ``selection``, if given, receives CSA's (B, T, k) selected entries (the indexer's KL
        is over them)."""
        assert cache is None or isinstance(cache, V4LayerKV)
        a = self.cfg
        b, t = x.shape[:2]
        start, _ = row_starts(step)
        if cache is None:
            ring = kv.new_zeros(b, a.sliding_window, kv.shape[-1])
            ring_ok = torch.zeros(b, a.sliding_window, dtype=torch.bool, device=x.device)
        else:
            ring, ring_ok = cache.window.ordered(start)
            cache.window.write(step, kv.detach())
        keys = torch.cat((ring.to(kv.dtype), kv), dim=1)
        ok = torch.cat((ring_ok, torch.ones(b, t, dtype=torch.bool, device=x.device)), dim=1)
        entries = visible = selected = None
        if self.compressor is not None:
            entries = self.compressor(x, step, None if cache is None else cache.compressor)
            if self.indexer is not None:
                state = None if cache is None else cache.indexer
                selected, _ = self.indexer.select(x, c_q, step, state)
                if selection is not None:
                    selection.append(selected)
            else:
                visible = entry_visibility(step.positions, self.compressor.rate)
        return v4_attend(q, keys, ok, a.sliding_window, self.sinks, self.scale, entries,
                         visible, selected, entry_probs=entry_probs)

    def indexer_kl(self, x: torch.Tensor, c_q: torch.Tensor, step: Step, selected: torch.Tensor,
                   target: torch.Tensor) -> torch.Tensor:
        """The lightning indexer's training loss (DeepSeek-V3.2 report section 2.1, its sparse
        stage; the V4 report trains the indexer but gives no other loss): KL(the main attention's
        probability mass over the selected entries, summed over heads and renormalised || softmax
        of the indexer's scores over the same entries), averaged over queries. The indexer sees
        detached inputs and the target is detached, so it learns only from this loss and the
        model only from its own. A training forward has no cache (entries from position 0).
        ``target`` (B, T, k) is what :func:`v4_attend` hands back in ``entry_probs``."""
        indexer = self.indexer
        assert indexer is not None
        x, c_q = x.detach(), c_q.detach()
        keys = indexer(x, step, None)  # (B, E, d_I), with grad this time
        q, w = indexer.queries(x, c_q, step.positions)
        logits = torch.einsum("bthd,btkd->bthk", q, gather_rows(keys.float(), selected)).relu()
        scores = (logits * w[..., None]).sum(dim=2) * indexer.width**-0.5  # (B, T, k)
        allowed = selected >= 0
        target = target.detach().masked_fill(~allowed, 0.0)
        target = target / target.sum(dim=-1, keepdim=True).clamp(min=1e-30)
        # A finite floor, not -inf: a query with no entry yet would make its row NaN, and NaN
        # reaches the gradient through torch.where's unused branch.
        logq = torch.log_softmax(scores.masked_fill(~allowed, -1e30), dim=-1)
        terms = torch.where(target > 0, target * (target.clamp(min=1e-30).log() - logq), 0.0)
        return terms.sum(dim=-1).mean()

    def reference(self, x: torch.Tensor) -> torch.Tensor:
        """The dense form for a sequence from position 0 (no cache), as transformers computes it:
        masks over every token and entry. Tests hold ``forward`` to it."""
        b, t, _ = x.shape
        positions = torch.arange(t, device=x.device).expand(b, t)
        q, kv, c_q, rot = self.project(x, positions)
        entries = mask = None
        if self.compressor is not None:
            step = Step(positions=positions, valid=None, kv_len=t, mask=None)
            entries = self.compressor(x, step, None)
            if self.indexer is not None:
                selected, _ = self.indexer.select(x, c_q, step, None)
                mask = selected_mask(selected, entries.shape[1])
            else:
                e = torch.arange(entries.shape[1], device=x.device)
                mask = e[None, None, :] < entry_visibility(positions, self.compressor.rate)[..., None]
        o = v4_attend_reference(q, kv, self.cfg.sliding_window, self.sinks, self.scale, entries, mask)
        return self.output(o, rot)


__all__ = ["CSA", "HCA", "SLIDING", "GroupedLinear", "V4Attention"]
