"""Training DeepSeek Sparse Attention in two stages (DeepSeek-V3.2 report, arXiv 2512.02556 s2.1).

A training loop needs three calls::

    set_dsa_stage(model, "warmup")   # dense attention; everything but the indexers frozen
    loss = indexer_loss(model)       # after a forward: sum over layers of the indexer KL
    set_dsa_stage(model, "sparse")   # top-k on, all weights train; add indexer_loss to the LM loss

and ``attention_mass_recall`` tells whether the indexer has learnt anything.
"""

from __future__ import annotations

from typing import Literal

import torch

from latentattn.attention.dsa import SparseLatentAttention
from latentattn.errors import ConfigError
from latentattn.model.transformer import Transformer

Stage = Literal["warmup", "sparse", "inference"]


def dsa_layers(model: Transformer) -> list[SparseLatentAttention]:
    layers = [blk.self_attn for blk in model.blocks if isinstance(blk.self_attn, SparseLatentAttention)]
    if not layers:
        raise ConfigError("the model has no DSA layers (MLAConfig.indexer is not set)")
    return layers


def set_dsa_stage(model: Transformer, stage: Stage) -> None:
    """Configure every DSA layer (and which parameters train) for one stage.

    warmup: dense main attention, indexer KL over all visible keys; every parameter outside the
        indexers is frozen (requires_grad False), so the LM loss is not used.
    sparse: top-k selection, indexer KL over the selected keys, every parameter trains; the
        indexer's inputs are detached so it learns only from its KL, the model only from the LM loss.
    inference: top-k selection, no losses; parameters keep their requires_grad.
    """
    if stage not in ("warmup", "sparse", "inference"):
        raise ConfigError(f"DSA stage must be warmup, sparse or inference, got {stage!r}")
    layers = dsa_layers(model)
    for layer in layers:
        layer.mode = "dense" if stage == "warmup" else "sparse"
        layer.train_indexer = stage != "inference"
        layer.indexer_loss = None
    if stage == "inference":
        return
    indexer_params = {id(p) for layer in layers for p in layer.indexer.parameters()}
    for p in model.parameters():
        p.requires_grad_(stage == "sparse" or id(p) in indexer_params)


def indexer_loss(model: Transformer) -> torch.Tensor:
    """Sum over DSA layers of the indexer KL stored by the last forward pass."""
    losses = [layer.indexer_loss for layer in dsa_layers(model)]
    if any(loss is None for loss in losses):
        raise ConfigError(
            "no indexer loss: call set_dsa_stage(model, 'warmup' or 'sparse') and run a forward"
        )
    return torch.stack([loss for loss in losses if loss is not None]).sum()


@torch.no_grad()
def attention_mass_recall(model: Transformer, input_ids: torch.Tensor) -> list[float]:
    """Per DSA layer: the share of the dense main attention's probability mass (averaged over
    heads) that falls inside the indexer's top-k, averaged over the query tokens that see more
    than k keys (for the others the selection is everything and recall is trivially 1).

    Runs the model densely, so each layer's input is the dense model's; restores the layers' state.
    """
    layers = dsa_layers(model)
    saved = [(layer.mode, layer.train_indexer, layer.record) for layer in layers]
    try:
        for layer in layers:
            layer.mode, layer.train_indexer, layer.record = "dense", False, True
        model(input_ids)
        recalls = []
        for layer in layers:
            assert layer.recorded is not None
            probs, idx = layer.recorded  # (B, T, S), (B, T, K)
            mass = probs.gather(-1, idx.clamp(min=0)).masked_fill(idx < 0, 0.0).sum(-1)  # (B, T)
            informative = (idx >= 0).sum(-1) < (probs > 0).sum(-1)
            informative |= torch.arange(probs.shape[1], device=probs.device) >= layer.topk
            if not bool(informative.any()):
                informative = torch.ones_like(informative)
            recalls.append(float(mass[informative].mean()))
        return recalls
    finally:
        for layer, (mode, train, record) in zip(layers, saved, strict=True):
            layer.mode, layer.train_indexer, layer.record = mode, train, record
            layer.recorded = None
