"""DeepSeek Sparse Attention: selection, sparse attention, caches, training, against references."""

from __future__ import annotations

import dataclasses

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from conftest import assert_close, assert_same_greedy
from latentattn import ConfigError, Transformer, get_preset
from latentattn.attention.dsa import SparseLatentAttention
from latentattn.cache.fp8 import bytes_per_vector, dequantize_e4m3, quantize_e4m3
from latentattn.config import IndexerConfig, MLAConfig, ModelConfig
from latentattn.kernels.sparse import (
    index_scores,
    select_topk,
    selection_mask,
    sparse_mqa,
    sparse_mqa_reference,
    topk_reference,
)
from latentattn.train import attention_mass_recall, indexer_loss, set_dsa_stage


def dsa_config(topk: int = 8, fp8: bool = False, **mla: object) -> ModelConfig:
    cfg = get_preset("tiny-dsa")
    assert isinstance(cfg.attention, MLAConfig) and cfg.attention.indexer is not None
    indexer = dataclasses.replace(cfg.attention.indexer, index_topk=topk, key_cache="fp8" if fp8 else "model")
    return cfg.replace(attention=dataclasses.replace(cfg.attention, indexer=indexer, **mla))


def dsa_layers_of(model: Transformer) -> list[SparseLatentAttention]:
    return [b.self_attn for b in model.blocks if isinstance(b.self_attn, SparseLatentAttention)]


def set_form(model: Transformer, form: str) -> None:
    for layer in dsa_layers_of(model):
        layer.prefill_form = form  # type: ignore[assignment]


def dense_twin(model: Transformer) -> Transformer:
    """The same weights as plain MLA (no indexer): what DSA must equal when k >= L."""
    a = model.config.attention
    assert isinstance(a, MLAConfig)
    dense = Transformer(model.config.replace(attention=dataclasses.replace(a, indexer=None))).eval()
    missing, unexpected = dense.load_state_dict(model.state_dict(), strict=False)
    assert not missing and all(".indexer." in k for k in unexpected)
    return dense


# ---------------------------------------------------------------- selection
@given(b=st.integers(1, 2), t=st.integers(1, 23), extra=st.integers(0, 30), h=st.integers(1, 5),
       d=st.integers(1, 12), topk=st.integers(1, 40), q_block=st.integers(1, 9), k_block=st.integers(1, 17))
@settings(max_examples=60, deadline=None)
def test_blockwise_topk_equals_full_topk(
    b: int, t: int, extra: int, h: int, d: int, topk: int, q_block: int, k_block: int
) -> None:
    """Running top-k over key blocks selects the full-matrix top-k, causal, -1 padded.

    ReLU makes exact ties common (several keys score 0), so the selected SCORES are compared:
    any tie-break is a correct top-k.
    """
    s = t + extra
    q, w, k = torch.randn(b, t, h, d), torch.randn(b, t, h), torch.randn(b, s, d)
    positions = torch.arange(extra, s).expand(b, t)
    # block_elems chosen so that key blocks hold k_block keys
    elems = k_block * b * min(q_block, t) * h
    got = select_topk(q, w, k, positions, topk, 0.5, q_block=q_block, block_elems=elems)
    scores = index_scores(q, w, k, 0.5)
    want = topk_reference(scores, positions, topk)
    assert got.shape == want.shape == (b, t, min(topk, s))

    def picked(idx: torch.Tensor) -> torch.Tensor:
        return scores.gather(-1, idx.clamp(min=0)).masked_fill(idx < 0, float("-inf")).sort(-1).values

    assert torch.equal(picked(got), picked(want))
    assert torch.equal(got, want), "ties must break the same way (earliest position first)"
    assert bool((got <= positions[..., None]).all()), "a future position was selected"
    n_valid = (got >= 0).sum(-1)
    assert torch.equal(n_valid, (positions + 1).clamp(max=min(topk, s))), "wrong number of valid slots"


def test_selection_mask_ignores_invalid_slots() -> None:
    idx = torch.tensor([[[2, -1, 0]]])
    assert selection_mask(idx, 4)[0, 0, 0].tolist() == [True, False, True, False]


# ---------------------------------------------------------------- sparse attention
@given(b=st.integers(1, 2), h=st.integers(1, 4), t=st.integers(1, 11), s_extra=st.integers(0, 20),
       topk=st.integers(1, 12), q_block=st.integers(1, 5))
@settings(max_examples=40, deadline=None)
def test_sparse_mqa_equals_dense_plus_mask(
    b: int, h: int, t: int, s_extra: int, topk: int, q_block: int
) -> None:
    s, d, dv = t + s_extra, 10, 7
    q, kv = torch.randn(b, h, t, d), torch.randn(b, s, d)
    positions = torch.arange(s_extra, s).expand(b, t)
    idx = topk_reference(torch.randn(b, t, s), positions, topk)
    got, _ = sparse_mqa(q, kv, idx, 0.4, dv, q_block=q_block)
    assert_close(got, sparse_mqa_reference(q, kv, idx, 0.4, dv))


def test_sparse_gradients_equal_masked_dense_gradients() -> None:
    b, h, t, s, d, dv = 2, 3, 9, 21, 12, 8
    positions = torch.arange(s - t, s).expand(b, t)
    idx = topk_reference(torch.randn(b, t, s), positions, 5)
    q, kv = torch.randn(b, h, t, d, requires_grad=True), torch.randn(b, s, d, requires_grad=True)
    weight = torch.randn(b, h, t, dv)
    (sparse_mqa(q, kv, idx, 0.3, dv, q_block=4)[0] * weight).sum().backward()
    g_sparse = (q.grad.clone(), kv.grad.clone())  # type: ignore[union-attr]
    q.grad, kv.grad = None, None
    (sparse_mqa_reference(q, kv, idx, 0.3, dv) * weight).sum().backward()
    assert_close(g_sparse[0], q.grad)  # type: ignore[arg-type]
    assert_close(g_sparse[1], kv.grad)  # type: ignore[arg-type]
    assert kv.grad is not None and bool((kv.grad != 0).any())


# ---------------------------------------------------------------- the model
@pytest.mark.parametrize("form", ["gather", "masked"])
@torch.no_grad()
def test_topk_at_least_length_equals_dense_mla(form: str) -> None:
    model = Transformer(dsa_config(topk=64)).eval()
    set_form(model, form)
    dense = dense_twin(model)
    ids = torch.randint(0, 256, (2, 40))
    assert_close(model(ids), dense(ids))
    cache, dense_cache = model.make_cache(2, 48), dense.make_cache(2, 48)
    model(ids, cache), dense(ids, dense_cache)
    new = torch.randint(0, 256, (2, 1))
    assert_close(model(new, cache), dense(new, dense_cache))


@torch.no_grad()
def test_topk_below_length_equals_dense_plus_mask_and_differs_from_dense() -> None:
    model = Transformer(dsa_config(topk=6)).eval()
    ids = torch.randint(0, 256, (2, 30))
    set_form(model, "gather")
    gathered = model(ids)
    set_form(model, "masked")
    assert_close(gathered, model(ids))
    assert (gathered - dense_twin(model)(ids)).abs().max() > 1e-3, "top-k changed nothing"


@pytest.mark.parametrize("fp8", [False, True])
@torch.no_grad()
def test_prefill_at_once_equals_token_by_token(fp8: bool) -> None:
    model = Transformer(dsa_config(topk=6, fp8=fp8)).eval()
    ids = torch.randint(0, 256, (2, 25))
    # With fp8 keys the prefill must score the same quantised keys that decode reads back.
    prefill = model(ids, model.make_cache(2, 32)) if fp8 else model(ids)
    cache = model.make_cache(2, 32)
    steps = torch.cat([model(ids[:, i : i + 1], cache) for i in range(25)], 1)
    assert_close(steps, prefill)


@torch.no_grad()
def test_ragged_rows_equal_rows_alone_and_never_select_padding() -> None:
    model = Transformer(dsa_config(topk=5)).eval()
    lengths = torch.tensor([20, 9])
    ids = torch.randint(0, 256, (2, 20))
    cache = model.make_cache(2, 24)
    out = model(ids, cache, lengths)
    new = torch.randint(0, 256, (2, 1))
    layer = dsa_layers_of(model)[0]
    layer.record = True  # keep the selection of the decode step
    step = model(new, cache)
    layer.record = False
    for r, n in enumerate(lengths.tolist()):
        alone = model(torch.cat([ids[r : r + 1, :n], new[r : r + 1]], 1))[0]
        assert_close(out[r, :n], alone[:n])
        assert_close(step[r, 0], alone[-1])
    # Selection of the decode step: row 1 holds 10 tokens, so no index may reach 10 or beyond.
    cache2 = model.make_cache(2, 24)
    model(ids, cache2, lengths)
    latent, k_i = cache2[0].read(cache2.step(1))
    del latent
    q_i, w = torch.randn(2, 1, 4, 16), torch.randn(2, 1, 4)
    positions = cache2.lengths[:, None]
    idx = select_topk(q_i, w, k_i.float(), positions, 5, 0.25)
    assert bool((idx[1] < 10).all()) and bool((idx[1] >= -1).all())


def test_generation_with_cache_equals_without() -> None:
    model = Transformer(dsa_config(topk=4)).eval()
    ids = torch.randint(0, 256, (2, 9))
    assert_same_greedy(model.generate(ids, 12), model.generate(ids, 12, use_cache=False), model, 9)


@pytest.mark.parametrize("fp8", [False, True])
@pytest.mark.parametrize(("model_dtype", "cache_dtype"), [(torch.float32, torch.bfloat16),
                                                          (torch.bfloat16, torch.float32)])
@torch.no_grad()
def test_cache_in_another_dtype(model_dtype: torch.dtype, cache_dtype: torch.dtype, fp8: bool) -> None:
    # The latent is read back in the compute dtype, the indexer keys in fp32 (fp8: dequantised).
    # topk 16 >= every key of the run: a bf16 key cache must not make the test hinge on a near
    # tie in the selection; the sparse (gather) decode and masked prefill paths still run.
    model = Transformer(dsa_config(topk=16, fp8=fp8)).eval().to(model_dtype)
    own, other = model.make_cache(2, 16), model.make_cache(2, 16, dtype=cache_dtype)
    assert other[0].buffers[0].dtype == cache_dtype
    x = torch.randint(0, 256, (2, 7))
    for _ in range(6):
        want, got = model(x, own)[:, -1], model(x, other)[:, -1]
        assert got.dtype == model_dtype
        assert_close(got, want, dtype=torch.bfloat16)
        x = want.argmax(-1, keepdim=True)


def test_indexer_cache_bytes() -> None:
    """bf16 model: 2 * d_I bytes per token per layer for indexer keys; fp8: d_I + 4 per 128."""
    assert bytes_per_vector(128) == 132
    for fp8, key_bytes in [(False, 2 * 16), (True, 16 + 4)]:
        model = Transformer(dsa_config(fp8=fp8)).to(torch.bfloat16)
        cache = model.make_cache(2, 10)
        assert cache.bytes_per_token_per_layer == (32 + 8) * 2 + key_bytes


def test_fp8_round_trip_is_within_e4m3_precision() -> None:
    x = torch.randn(4, 7, 256) * torch.logspace(-3, 3, 256)
    values, scales = quantize_e4m3(x)
    assert values.dtype == torch.uint8 and scales.shape == (4, 7, 2)
    assert bool((torch.log2(scales) == torch.log2(scales).round()).all()), "scales are powers of two"
    err = (dequantize_e4m3(values, scales) - x).abs()
    block_max = x.abs().unflatten(-1, (2, 128)).amax(-1, keepdim=True).expand(4, 7, 2, 128).flatten(-2)
    assert bool((err <= block_max * 2**-3).all())  # e4m3: 3 mantissa bits


def test_sparse_training_step_has_gradients_for_model_and_indexer_separately() -> None:
    model = Transformer(dsa_config(topk=4))
    set_dsa_stage(model, "sparse")
    ids = torch.randint(0, 256, (2, 24))
    logits = model(ids[:, :-1])
    lm = torch.nn.functional.cross_entropy(logits.flatten(0, 1), ids[:, 1:].flatten())
    layer = dsa_layers_of(model)[0]
    lm.backward(retain_graph=True)
    assert all(p.grad is None or not bool(p.grad.any()) for p in layer.indexer.parameters()), \
        "the LM loss reached the indexer"
    assert layer.kv_b_proj.weight.grad is not None
    model.zero_grad()
    indexer_loss(model).backward()
    assert layer.indexer.wq_b.weight.grad is not None and bool(layer.indexer.wq_b.weight.grad.any())
    assert layer.kv_b_proj.weight.grad is None or not bool(layer.kv_b_proj.weight.grad.any()), \
        "the indexer KL reached the main attention"


def test_warmup_lowers_kl_and_raises_attention_mass_recall() -> None:
    """Small synthetic task: repeated random segments, main attention sharpened by larger weights."""
    torch.manual_seed(0)
    model = Transformer(dsa_config(topk=8))
    with torch.no_grad():
        for layer in dsa_layers_of(model):
            layer.q_b_proj.weight.mul_(8)
            layer.kv_a_proj_with_mqa.weight.mul_(8)
            layer.kv_b_proj.weight.mul_(4)
    base = torch.randint(0, 256, (4, 16))
    ids = torch.cat([base] * 3, dim=1)
    before = attention_mass_recall(model, ids)
    frozen = model.embed_tokens.weight.clone()
    set_dsa_stage(model, "warmup")
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=2e-2)
    losses = []
    for _ in range(30):
        model(ids)
        loss = indexer_loss(model)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    after = attention_mass_recall(model, ids)
    assert losses[-1] < 0.3 * losses[0]
    assert all(a > b + 0.05 for a, b in zip(after, before, strict=True)), (before, after)
    assert torch.equal(model.embed_tokens.weight, frozen), "warm-up trained a frozen weight"


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"index_topk": 0}, "IndexerConfig.index_topk must be a positive integer"),
        ({"index_head_dim": 4}, r"index_head_dim \(4\) must be at least qk_rope_head_dim \(8\)"),
    ],
)
def test_bad_indexer_configs(change: dict[str, int], message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        MLAConfig(n_heads=2, kv_lora_rank=8, qk_nope_head_dim=8, qk_rope_head_dim=8, v_head_dim=8,
                  q_lora_rank=8,
                  indexer=IndexerConfig(**{"index_n_heads": 2, "index_head_dim": 16, **change}))


def test_indexer_needs_query_compression() -> None:
    with pytest.raises(ConfigError, match="q_lora_rank must be set when indexer is"):
        MLAConfig(n_heads=2, kv_lora_rank=8, qk_nope_head_dim=8, qk_rope_head_dim=8, v_head_dim=8,
                  indexer=IndexerConfig(index_n_heads=2, index_head_dim=16))


def test_indexer_head_weights_and_routing_bias_stay_fp32_in_bf16_models() -> None:
    """DeepSeek keeps these in fp32: top-k choices hinge on their sums."""
    cfg = dsa_config()
    moe_cfg = get_preset("tiny-mla-moe")
    model = Transformer(cfg.replace(moe=moe_cfg.moe)).to(torch.bfloat16)
    layer = dsa_layers_of(model)[0]
    assert layer.indexer.weights_proj.weight.dtype == torch.float32
    assert layer.q_b_proj.weight.dtype == torch.bfloat16
    router = model.blocks[1].mlp.gate  # type: ignore[union-attr]
    assert router.e_score_correction_bias.dtype == torch.float32
    assert router.weight.dtype == torch.float32
    ids = torch.randint(0, 256, (1, 12))
    assert model(ids).dtype == torch.bfloat16
