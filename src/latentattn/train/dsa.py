"""Training DeepSeek Sparse Attention in two stages (DeepSeek-V3.2 report, arXiv 2512.02556 s2.1).

A training loop needs two calls and the forward's returned loss::

    set_dsa_stage(model, "warmup")   # dense attention; everything but the indexers frozen
    logits, kl = model(ids, return_indexer_loss=True)  # kl: the indexer KL summed over layers
    set_dsa_stage(model, "sparse")   # top-k on, all weights train; add kl to the LM loss

(``indexer_loss(model)`` after a plain ``model(ids)`` gives the same KL, that forward's.)

and ``attention_mass_recall`` tells whether the indexer has learnt anything. ``retrofit_dsa``
is where V3.2 starts: a trained dense MLA model with an indexer added, fresh, beside its weights.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Literal

import torch

from latentattn.attention.dsa import SparseLatentAttention
from latentattn.config import IndexerConfig, MLAConfig
from latentattn.errors import ConfigError
from latentattn.model.transformer import Transformer

Stage = Literal["dense", "warmup", "sparse", "inference"]


def dsa_layers(model: Transformer) -> list[SparseLatentAttention]:
    layers = [blk.self_attn for blk in model.blocks if isinstance(blk.self_attn, SparseLatentAttention)]
    if not layers:
        raise ConfigError("the model has no DSA layers (MLAConfig.indexer is not set)")
    return layers


def set_dsa_stage(model: Transformer, stage: Stage, freeze: bool = True) -> None:
    """Configure every DSA layer (and which parameters train) for one stage.

    dense: dense main attention, no indexer loss, every parameter trains (the model before DSA).
    warmup: dense main attention, indexer KL over all visible keys; every parameter outside the
        indexers is frozen (requires_grad False), so the LM loss is not used. With
        ``freeze=False`` nothing is frozen: training from scratch, where there is no trained
        dense model to freeze, the model learns densely from the LM loss while the indexer
        learns from its KL (its input is detached, so the two losses do not mix).
    sparse: top-k selection, indexer KL over the selected keys, every parameter trains; the
        indexer's inputs are detached so it learns only from its KL, the model only from the LM loss.
    inference: top-k selection, no losses; parameters keep their requires_grad.
    """
    if stage not in ("dense", "warmup", "sparse", "inference"):
        raise ConfigError(f"DSA stage must be dense, warmup, sparse or inference, got {stage!r}")
    layers = dsa_layers(model)
    for layer in layers:
        layer.mode = "dense" if stage in ("dense", "warmup") else "sparse"
        layer.train_indexer = stage in ("warmup", "sparse")
    model.last_indexer_loss = None
    if stage == "inference":
        return
    if stage == "dense":
        for p in model.parameters():
            p.requires_grad_(True)
        return
    indexer_params = {id(p) for layer in layers for p in layer.indexer.parameters()}
    for p in model.parameters():
        p.requires_grad_(stage == "sparse" or not freeze or id(p) in indexer_params)


def retrofit_dsa(model: Transformer, indexer: IndexerConfig, seed: int = 0) -> Transformer:
    """DeepSeek-V3.2's starting point (arXiv 2512.02556 s2.1): the dense MLA ``model``'s weights,
    unchanged, in a DSA model whose lightning indexers are freshly initialised (seeded by
    ``seed``). Train it with ``set_dsa_stage(m, "warmup")`` (everything but the indexers
    frozen) before ``"sparse"``; ``latentattn train --model RUN --retrofit-dsa`` does both."""
    a = model.config.attention
    if not isinstance(a, MLAConfig) or a.indexer is not None:
        raise ConfigError(f"retrofit_dsa takes a dense MLA model; {model.config.name} is "
                          + ("DSA already" if isinstance(a, MLAConfig) else a.name.upper()))
    if a.q_lora_rank is None:
        raise ConfigError("retrofit_dsa needs an MLA with query compression (q_lora_rank): the "
                          "indexer's queries are projected from MLA's query latent")
    cfg = model.config.replace(attention=dataclasses.replace(a, indexer=indexer))
    torch.manual_seed(seed)
    dsa = Transformer(cfg).to(device=model.device, dtype=model.dtype)
    missing, unexpected = dsa.load_state_dict(model.state_dict(), strict=False)
    if unexpected or any(".indexer." not in k for k in missing):
        raise ConfigError(f"retrofit_dsa: the weights do not map onto the DSA model (missing "
                          f"{[k for k in missing if '.indexer.' not in k][:3]}, unexpected {unexpected[:3]})")
    return dsa


def required(loss: torch.Tensor | None) -> torch.Tensor:
    """The indexer loss a forward returned, or the error that says why there is none."""
    if loss is None:
        raise ConfigError(
            "no indexer loss: call set_dsa_stage(model, 'warmup' or 'sparse') and run a forward"
        )
    return loss


def indexer_loss(model: Transformer) -> torch.Tensor:
    """The indexer KL of the model's last forward, summed over DSA layers: what
    ``model(ids, return_indexer_loss=True)`` returned, for code that reads it afterwards."""
    dsa_layers(model)
    return required(model.last_indexer_loss)


def _mass(probs: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
    """(B, T, S) probabilities summed over the (B, T, K) selected keys; -1 slots add nothing."""
    return probs.gather(-1, idx.clamp(min=0)).masked_fill(idx < 0, 0.0).sum(-1)


@torch.no_grad()
def selection_recall(model: Transformer, input_ids: torch.Tensor) -> list[dict[str, float]]:
    """Per DSA layer, the share of the dense main attention's probability mass (averaged over
    heads) inside a k-key selection, averaged over the query tokens that see more than k keys
    (for the others any selection is everything and recall is trivially 1):

    * ``indexer``: the lightning indexer's top-k -- the number that tells whether it works;
    * ``recent``: the k most recent keys (a sliding window), the obvious cheap alternative;
    * ``uniform``: k keys drawn at random, in expectation k / (visible keys).

    Runs the model densely, so each layer's input is the dense model's (each layer's
    ``dense_selection`` of it, taken by a forward hook); restores the layers' state.
    """
    layers = dsa_layers(model)
    saved = [(layer.mode, layer.train_indexer) for layer in layers]
    seen: dict[SparseLatentAttention, tuple[torch.Tensor, torch.Tensor]] = {}

    def keep(layer: torch.nn.Module, args: tuple[Any, ...], _out: object) -> None:
        assert isinstance(layer, SparseLatentAttention)
        x, rope, step = args[:3]
        seen[layer] = layer.dense_selection(x, rope, step)

    hooks = [layer.register_forward_hook(keep) for layer in layers]
    try:
        for layer in layers:
            layer.mode, layer.train_indexer = "dense", False
        model(input_ids)
        out = []
        for layer in layers:
            probs, idx = seen[layer]  # (B, T, S), (B, T, K)
            t = torch.arange(probs.shape[1], device=probs.device)
            informative = t >= layer.topk  # query t sees t + 1 keys
            if not bool(informative.any()):
                informative = torch.ones_like(informative)
            k = min(layer.topk, probs.shape[-1])
            recent = (t[:, None] - torch.arange(k, device=t.device)[None, :])  # (T, K), < 0 invalid
            recent = recent.expand(probs.shape[0], -1, -1)
            uniform = (k / (t + 1).float()).clamp(max=1.0)
            out.append({
                "indexer": float(_mass(probs, idx)[:, informative].mean()),
                "recent": float(_mass(probs, recent)[:, informative].mean()),
                "uniform": float(uniform[informative].mean()),
            })
        return out
    finally:
        for hook in hooks:
            hook.remove()
        for layer, (mode, train) in zip(layers, saved, strict=True):
            layer.mode, layer.train_indexer = mode, train


def attention_mass_recall(model: Transformer, input_ids: torch.Tensor) -> list[float]:
    """Per DSA layer: the share of the dense main attention's mass inside the indexer's top-k
    (see :func:`selection_recall`)."""
    return [r["indexer"] for r in selection_recall(model, input_ids)]
