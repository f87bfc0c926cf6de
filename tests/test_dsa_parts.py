"""DSA's forward as three pieces (attention.dsa): select scores stored keys as the reference
scores their dequantised values, the indexer loss is returned by the forward (and the old
read-after-forward path gives the same tensor), the sparse stage's KL equals the dense stage's
when the selection holds every key, and the recall diagnostic leaves the layers as it found them."""

from __future__ import annotations

import dataclasses

import pytest
import torch

from conftest import assert_close
from latentattn import Transformer, get_preset
from latentattn.attention.dsa import SparseLatentAttention, attend_gathered, masked_step, select
from latentattn.cache.fp8 import dequantize_e4m3, quantize_e4m3
from latentattn.cache.step import fresh_step
from latentattn.config import MLAConfig, ModelConfig
from latentattn.kernels.reference import attention_ref
from latentattn.kernels.sparse import index_scores, topk_reference
from latentattn.train import attention_mass_recall, indexer_loss, set_dsa_stage


def dsa_config(topk: int) -> ModelConfig:
    cfg = get_preset("tiny-dsa")
    assert isinstance(cfg.attention, MLAConfig) and cfg.attention.indexer is not None
    indexer = dataclasses.replace(cfg.attention.indexer, index_topk=topk)
    return cfg.replace(attention=dataclasses.replace(cfg.attention, indexer=indexer))


@pytest.mark.parametrize("fp8", [False, True])
def test_select_scores_stored_keys_as_the_reference_scores_their_values(fp8: bool) -> None:
    g = torch.Generator().manual_seed(0)
    b, t, s, h, d = 2, 5, 37, 3, 128
    q, w = torch.randn(b, t, h, d, generator=g), torch.randn(b, t, h, generator=g)
    k = torch.randn(b, s, d, generator=g)
    positions = torch.arange(s - t, s).expand(b, t)
    stored, scale = quantize_e4m3(k) if fp8 else (k.bfloat16(), None)
    got = select(q, w, stored, positions, 7, 0.3, key_scale=scale, in_place=True)
    values = dequantize_e4m3(stored, scale) if scale is not None else stored.float()
    assert torch.equal(got, topk_reference(index_scores(q, w, values, 0.3), positions, 7))


def test_gathered_and_masked_attention_agree() -> None:
    g = torch.Generator().manual_seed(1)
    b, h, t, s, r, dr = 2, 3, 4, 19, 16, 8
    q, kv = torch.randn(b, h, t, r + dr, generator=g), torch.randn(b, s, r + dr, generator=g)
    step = fresh_step(b, s, torch.device("cpu"))
    step = dataclasses.replace(step, positions=step.positions[:, -t:])
    idx = topk_reference(torch.randn(b, t, s, generator=g), step.positions, 6)
    o_lat, probs = attend_gathered(q, kv, idx, 0.2, r, need_probs=True)
    masked = masked_step(step, idx, s)
    key = kv.unsqueeze(1)
    assert_close(o_lat, attention_ref(q, key, key[..., :r], 0.2, mask=masked.mask))
    assert probs is not None and probs.shape == (b, h, t, 6)
    assert_close(probs.sum(-1), torch.ones(b, h, t))


def test_the_forward_returns_the_indexer_loss() -> None:
    model = Transformer(dsa_config(topk=4))
    ids = torch.randint(0, 256, (2, 17))
    set_dsa_stage(model, "sparse")
    logits, kl = model(ids, return_indexer_loss=True)
    assert logits.shape == (2, 17, 256) and kl is not None and kl.requires_grad
    assert indexer_loss(model) is kl  # the read-after-forward path: that forward's loss
    set_dsa_stage(model, "inference")
    with torch.no_grad():
        _, none = model(ids, return_indexer_loss=True)
    assert none is None
    assert all(not hasattr(layer, "indexer_loss") for layer in model.modules()
               if isinstance(layer, SparseLatentAttention)), "the loss is returned, not kept on layers"


def test_the_sparse_stage_kl_equals_the_dense_stage_kl_when_every_key_is_selected() -> None:
    """topk 64 >= 20 keys: the selection is every visible key, and the sparse attention's
    probabilities are the dense ones, so the two stages' KLs are one number up to fp32 rounding."""
    torch.manual_seed(0)
    model = Transformer(dsa_config(topk=64))
    ids = torch.randint(0, 256, (2, 20))
    kls = []
    for stage in ("warmup", "sparse"):
        set_dsa_stage(model, stage)  # type: ignore[arg-type]
        kls.append(model(ids, return_indexer_loss=True)[1])
    assert kls[0] is not None and kls[1] is not None and float(kls[0].detach()) > 0
    assert_close(kls[1], kls[0])


def test_recall_leaves_the_layers_as_it_found_them() -> None:
    model = Transformer(dsa_config(topk=4))
    set_dsa_stage(model, "sparse")
    layers = [m for m in model.modules() if isinstance(m, SparseLatentAttention)]
    recall = attention_mass_recall(model, torch.randint(0, 256, (2, 12)))
    assert len(recall) == len(layers) and all(0 < r <= 1 for r in recall)
    assert all(layer.mode == "sparse" and layer.train_indexer for layer in layers)
    assert all(not layer._forward_hooks for layer in layers)
