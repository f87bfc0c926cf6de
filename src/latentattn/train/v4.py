"""Training DeepSeek-V4's lightning indexers (CSA layers) alongside the model.

The V4 report trains the indexer but gives no loss of its own; latentattn trains it as
DeepSeek-V3.2's sparse stage (arXiv 2512.02556 s2.1): top-k selection from the first step, the
LM loss for the model and, for each indexer, the KL of the main attention's mass over the selected
entries to the indexer's softmax (:meth:`latentattn.attention.v4.V4Attention.indexer_kl`), its
inputs detached so the two losses do not mix. There is no dense V4 to warm the indexer up in, so
there is no warm-up stage and nothing is frozen. A training loop needs::

    set_v4_indexer_training(model, True)   # CSA layers compute their KL in forward
    logits, kl = model(ids, return_indexer_loss=True)   # kl: summed over layers
    set_v4_indexer_training(model, False)  # evaluation and decode: no KL

and :func:`v4_selection_recall` tells whether the indexers have learnt anything.
"""

from __future__ import annotations

from typing import Any

import torch

from latentattn.attention.v4 import V4Attention
from latentattn.cache.kv import Step
from latentattn.kernels.v4 import entry_visibility, v4_attend
from latentattn.model.transformer import Transformer


def v4_layers(model: Transformer) -> list[V4Attention]:
    """The model's V4 attention layers (every layer of a V4 model, none of another)."""
    return [blk.self_attn for blk in model.blocks if isinstance(blk.self_attn, V4Attention)]


def is_v4(model: Transformer) -> bool:
    return bool(v4_layers(model))


def set_v4_indexer_training(model: Transformer, on: bool) -> None:
    """Turn the indexer KL of every CSA layer on (training) or off (evaluation, decode)."""
    for layer in v4_layers(model):
        layer.train_indexer = on and layer.indexer is not None


def entry_mass(layer: V4Attention, x: torch.Tensor, step: Step
               ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """A CSA layer read as if it were HCA, on its input x (B, T, dim) from position 0: the main
    attention's probabilities over EVERY visible compressed entry (window keys and sink in the
    same softmax), summed over heads, (B, T, E); the indexer's selection (B, T, k); and the
    entries each query sees (B, T)."""
    indexer, compressor = layer.indexer, layer.compressor
    assert indexer is not None and compressor is not None, "entry_mass takes a CSA layer"
    a = layer.cfg
    q, kv, c_q, _ = layer.project(x, step.positions)
    b, t = x.shape[:2]
    keys = torch.cat((kv.new_zeros(b, a.sliding_window, kv.shape[-1]), kv), dim=1)
    ok = torch.cat((torch.zeros(b, a.sliding_window, dtype=torch.bool, device=x.device),
                    torch.ones(b, t, dtype=torch.bool, device=x.device)), dim=1)
    entries = compressor(x, step, None)
    visible = entry_visibility(step.positions, compressor.rate)
    probs: list[torch.Tensor] = []
    v4_attend(q, keys, ok, a.sliding_window, layer.sinks, layer.scale, entries, visible, None,
              entry_probs=probs)
    selected, _ = indexer.select(x, c_q, step, None)
    return torch.cat(probs, dim=1), selected, visible


def _share(mass: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
    """(B, T, E) shares summed over the (B, T, k) indices; -1 slots add nothing."""
    return mass.gather(-1, idx.clamp(min=0)).masked_fill(idx < 0, 0.0).sum(-1)


@torch.no_grad()
def v4_selection_recall(model: Transformer, input_ids: torch.Tensor) -> list[dict[str, float]]:
    """Per CSA layer, the share of the compressed entries' attention mass (the main attention
    over every visible entry, :func:`entry_mass`) that the indexer's k entries hold, averaged
    over the queries that see more than k entries (for the others any k is all of them):

    * ``indexer``: the lightning indexer's top-k;
    * ``recent``: the k most recent entries, the cheap alternative (next to the window);
    * ``uniform``: k of the visible entries at random, in expectation k / visible.

    As :func:`latentattn.train.dsa.selection_recall` for DSA; each layer's input is the model's
    own (top-k) forward's, taken by a forward hook removed after. The indexer KL is off meanwhile.
    """
    layers = [layer for layer in v4_layers(model) if layer.indexer is not None]
    seen: dict[V4Attention, tuple[torch.Tensor, torch.Tensor, torch.Tensor]] = {}

    def keep(layer: torch.nn.Module, args: tuple[Any, ...], _out: object) -> None:
        assert isinstance(layer, V4Attention)
        x, _rope, step = args[:3]
        seen[layer] = entry_mass(layer, x, step)

    saved = [layer.train_indexer for layer in layers]
    hooks = [layer.register_forward_hook(keep) for layer in layers]
    try:
        for layer in layers:
            layer.train_indexer = False
        model(input_ids)
        out = []
        for layer in layers:
            mass, idx, visible = seen[layer]
            k = layer.cfg.index_topk
            mass = mass / mass.sum(-1, keepdim=True).clamp(min=1e-30)
            informative = visible > k  # (B, T)
            if not bool(informative.any()):
                informative = visible > 0
            recent = visible[..., None] - 1 - torch.arange(k, device=idx.device)  # < 0 invalid
            out.append({
                "indexer": float(_share(mass, idx)[informative].mean()),
                "recent": float(_share(mass, recent)[informative].mean()),
                "uniform": float((k / visible[informative].float()).clamp(max=1.0).mean()),
            })
        return out
    finally:
        for hook in hooks:
            hook.remove()
        for layer, train in zip(layers, saved, strict=True):
            layer.train_indexer = train


__all__ = ["entry_mass", "is_v4", "set_v4_indexer_training", "v4_layers", "v4_selection_recall"]
