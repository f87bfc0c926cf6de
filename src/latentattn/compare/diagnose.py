"""What separates an MLA run that learns fast from one that learns slowly: per-layer statistics
of the latent attention, taken while ``train()`` runs, by hooks (nothing in the loop changes).

At each of ``STEPS`` (the step about to be taken, on that step's training batch):

* ``latent_rms``: the RMS of the latent c = x W_DKV before its RMSNorm (DeepSeek-V2 eq. 9);
  a latent that starts small is scaled up by the norm, which changes how fast it moves;
* ``entropy``: the attention's entropy in nats, over heads and queries (query 0, which sees one
  key, left out); a layer that stays near log(t) has not learned where to look;
* ``prev_token``: the attention mass on the previous token, the first thing a byte-level model's
  heads learn (the first half of an induction head, Olsson et al. 2022, arXiv 2209.11895);

and over each window of steps ending there (``grad_*``, the mean of the per-step norms):

* ``grad_kv_a``, ``grad_kv_b``: the gradient norms of ``kv_a_proj_with_mqa`` (the down
  projection and the rope key) and ``kv_b_proj`` (the up projection), before clipping.

Only layers that are :class:`MultiHeadLatentAttention` (MLA, and DSA, whose dense scores these
are) are watched; a model without them gives no diagnostics.
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import torch

from latentattn.attention import MultiHeadLatentAttention
from latentattn.model.transformer import Transformer

# Snapshots early (where the issue saw the seeds part, by step 100) and a few later.
STEPS = (0, 25, 50, 100, 200, 400)
SNAPSHOT_KEYS = ("latent_rms", "entropy", "prev_token")
GRAD_KEYS = ("grad_kv_a", "grad_kv_b")


def mla_layers(model: Transformer) -> list[MultiHeadLatentAttention]:
    return [blk.self_attn for blk in model.blocks if isinstance(blk.self_attn, MultiHeadLatentAttention)]


@torch.no_grad()
def attention_stats(attn: MultiHeadLatentAttention, x: torch.Tensor,
                    rope: tuple[torch.Tensor, torch.Tensor]) -> tuple[float, float, float]:
    """(latent RMS before the norm, entropy, previous-token mass) of one causal forward over x
    (B, T, dim), recomputed densely from the layer's own projections (the naive form)."""
    a = attn.cfg
    raw = attn.kv_a_proj_with_mqa(x)[..., : a.kv_lora_rank]
    q, _ = attn.rotated_query(x, rope)
    c, k_rope = attn.project_latent(x, rope)
    k, _ = attn.decompress(c, k_rope)
    scores = torch.einsum("bthd,bshd->bhts", q.float(), k.float()) * attn.scale
    t = x.shape[1]
    causal = torch.ones(t, t, dtype=torch.bool, device=x.device).tril()
    p = scores.masked_fill(~causal, float("-inf")).softmax(-1)
    ent = -(p * p.clamp_min(1e-30).log()).sum(-1)  # (B, H, T)
    prev = p.diagonal(offset=-1, dim1=-2, dim2=-1)  # (B, H, T - 1): query t on key t - 1
    return (float(raw.float().pow(2).mean().sqrt()), float(ent[..., 1:].mean()),
            float(prev.mean()))


class SeedDiagnostics:
    """Hooks on every MLA layer of ``model`` while it trains (``watch``); ``as_dict()`` then
    gives ``{key: {step: [per layer]}}`` for the keys in the module docstring."""

    def __init__(self, model: Transformer, steps: tuple[int, ...] = STEPS) -> None:
        self.model = model
        self.layers = mla_layers(model)
        self.steps = steps
        self.step = -1  # the training step under way (its forward has started)
        self.snapshots: dict[str, dict[int, list[float]]] = {k: {} for k in SNAPSHOT_KEYS}
        self._grads: dict[str, list[list[float]]] = {k: [[] for _ in self.layers] for k in GRAD_KEYS}
        self.grads: dict[str, dict[int, list[float]]] = {k: {} for k in GRAD_KEYS}

    def _flush(self) -> None:
        """At a snapshot step's end: the mean gradient norms since the previous snapshot."""
        if self.step in self.steps and all(self._grads[GRAD_KEYS[0]]):
            for k in GRAD_KEYS:
                self.grads[k][self.step] = [sum(g) / len(g) for g in self._grads[k]]
                self._grads[k] = [[] for _ in self.layers]

    def _on_model_forward(self, *_: Any) -> None:
        if torch.is_grad_enabled():  # a training step (evaluation runs without gradients)
            self._flush()
            self.step += 1

    def _on_forward(self, index: int, module: torch.nn.Module, args: tuple[Any, ...]) -> None:
        if not torch.is_grad_enabled() or self.step not in self.steps:
            return  # evaluation, or not a snapshot step
        assert isinstance(module, MultiHeadLatentAttention)
        values = attention_stats(module, args[0], args[1])
        for key, value in zip(SNAPSHOT_KEYS, values, strict=True):
            self.snapshots[key].setdefault(self.step, [math.nan] * len(self.layers))[index] = value

    def _on_grad(self, key: str, index: int, p: torch.Tensor) -> None:
        if p.grad is not None:
            self._grads[key][index].append(float(p.grad.float().norm()))

    @contextmanager
    def watch(self) -> Iterator[SeedDiagnostics]:
        if not self.layers:
            yield self
            return
        handles: list[Any] = [self.model.register_forward_pre_hook(self._on_model_forward)]
        for i, layer in enumerate(self.layers):
            handles.append(layer.register_forward_pre_hook(
                lambda m, args, i=i: self._on_forward(i, m, args)))
            for key, proj in (("grad_kv_a", layer.kv_a_proj_with_mqa), ("grad_kv_b", layer.kv_b_proj)):
                handles.append(proj.weight.register_post_accumulate_grad_hook(
                    lambda p, key=key, i=i: self._on_grad(key, i, p)))
        try:
            yield self
        finally:
            self._flush()
            for h in handles:
                h.remove()

    def as_dict(self) -> dict[str, dict[str, list[float]]]:
        """Steps as text keys (JSON); empty when the model has no MLA layer."""
        if not self.layers:
            return {}
        out = {k: {str(s): v for s, v in sorted(d.items())} for k, d in self.snapshots.items()}
        out.update({k: {str(s): v for s, v in sorted(d.items())} for k, d in self.grads.items()})
        return out


def layer_mean(diagnostics: dict[str, dict[str, list[float]]], key: str, step: int) -> float | None:
    """The mean over layers of one diagnostic at one step (None when it was not recorded)."""
    values = diagnostics.get(key, {}).get(str(step))
    if not values:
        return None
    finite = [v for v in values if math.isfinite(v)]
    return sum(finite) / len(finite) if finite else None


__all__ = ["GRAD_KEYS", "SNAPSHOT_KEYS", "STEPS", "SeedDiagnostics", "attention_stats", "layer_mean",
           "mla_layers"]
