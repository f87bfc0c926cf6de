"""DeepSeek-V4's model around its attention, against transformers 5.25 (``modeling_deepseek_v4.py``)
on random weights copied across: mHC (HyperConnection, HyperHead, a decoder layer's two residual
updates), the MoE (sqrtsoftplus scores, hash routing, the SwiGLU clamp), and the Transformer's
wiring (streams, hc_head, fp32-kept parameters, names, init).

Shapes unlike the defaults (2 and 3 streams, odd widths) so that a swapped or transposed axis
shows. Tolerances: against transformers' own code run in float64 (conftest.assert_within_rounding)
where it runs in float64, else from the rounding of two fp32 computations (_assert_fp32_agree)."""

from __future__ import annotations

import contextlib
import copy
from collections.abc import Iterator
from typing import Any
from unittest import mock

import pytest
import torch
from torch import nn

from conftest import ROUNDING_FACTOR, assert_close, assert_within_rounding, max_error
from latentattn import Transformer
from latentattn.config import GQAConfig, HyperConfig, MLAConfig, ModelConfig, MoEConfig, RopeConfig
from latentattn.errors import ConfigError
from latentattn.model.block import Block, Float32RMSNorm
from latentattn.model.ffn import MoE, Router
from latentattn.model.hyper import HyperConnection, HyperHead

hf = pytest.importorskip("transformers.models.deepseek_v4.modeling_deepseek_v4",
                         reason="the oracle is transformers >= 5.23's DeepSeek-V4")

VOCAB = 50
EPS32 = torch.finfo(torch.float32).eps


# ---------------------------------------------------------------------------- configs and helpers
def _moe(limit: float | None = 0.7, hash_layers: int = 1) -> MoEConfig:
    """V4's MoE on a small scale: 8 experts of 19, top-3, one shared expert, one group."""
    return MoEConfig(n_routed_experts=8, n_shared_experts=1, num_experts_per_tok=3,
                     moe_intermediate_size=19, scoring_func="sqrtsoftplus", topk_method="noaux_tc",
                     routed_scaling_factor=1.5, norm_topk_prob=True, n_hash_layers=hash_layers,
                     swiglu_limit=limit)


def _cfg(dim: int, hc_mult: int, iters: int, moe: MoEConfig | None = None) -> ModelConfig:
    """Ours: two layers of GQA (the mHC and MoE modules never look at the attention)."""
    return ModelConfig(vocab_size=VOCAB, dim=dim, n_layers=2, intermediate_size=24,
                       attention=GQAConfig(n_heads=2, n_kv_heads=1, head_dim=8), moe=moe,
                       hyper=HyperConfig(hc_mult=hc_mult, sinkhorn_iters=iters, eps=1e-3))


def _hf_cfg(cfg: ModelConfig) -> Any:
    """transformers' config with the same mHC and MoE, and a small attention (unused here but
    for DeepseekV4DecoderLayer's constructor)."""
    from transformers import DeepseekV4Config

    assert cfg.hyper is not None
    m = cfg.moe or _moe()
    return DeepseekV4Config(
        vocab_size=cfg.vocab_size, hidden_size=cfg.dim, num_hidden_layers=cfg.n_layers,
        rms_norm_eps=cfg.norm_eps, hc_mult=cfg.hyper.hc_mult,
        hc_sinkhorn_iters=cfg.hyper.sinkhorn_iters, hc_eps=cfg.hyper.eps,
        n_routed_experts=m.n_routed_experts, num_experts_per_tok=m.num_experts_per_tok,
        moe_intermediate_size=m.moe_intermediate_size, n_shared_experts=m.n_shared_experts,
        routed_scaling_factor=m.routed_scaling_factor, swiglu_limit=m.swiglu_limit,
        mlp_layer_types=["hash_moe"] * m.n_hash_layers + ["moe"] * (cfg.n_layers - m.n_hash_layers),
        num_attention_heads=2, head_dim=16, q_lora_rank=8, o_groups=1, o_lora_rank=8,
        index_n_heads=2, index_head_dim=16, sliding_window=8,
        layer_types=["sliding_attention"] * cfg.n_layers)


@contextlib.contextmanager
def float64_oracle() -> Iterator[None]:
    """transformers' mHC casts to fp32 with ``.float()`` (the streams, fn, scales): lifted here,
    so that the same code, given float64 tensors, runs in float64: the exact reference."""
    real = torch.Tensor.float

    def keep64(self: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
        return self if self.dtype == torch.float64 else real(self, *args, **kwargs)

    with mock.patch.object(torch.Tensor, "float", keep64):
        yield


def _assert_fp32_agree(got: torch.Tensor, want: torch.Tensor, terms: int, what: str) -> None:
    """Two fp32 computations of one formula (ours, transformers') that differ only in rounding:
    each is within ~sqrt(terms) ulps of the exact result's size (a random walk along the longest
    chain of additions, conftest.assert_within_rounding's floor), so they are within twice that,
    times conftest's factor c for a maximum over many elements. A wrong axis, weight or clamp
    moves the result by orders of magnitude more."""
    bound = 2 * ROUNDING_FACTOR * terms**0.5 * EPS32 * float(want.abs().max())
    err = max_error(got.double(), want.double())
    assert err <= bound, f"{what}: max |ours - transformers'| = {err:.3g} exceeds {bound:.3g}"


def _randomise(module: nn.Module, gen: torch.Generator) -> None:
    """Every float parameter ~ N(0, 1/fan_in) (vectors: 1 + N(0, 0.3), as norm gains and scales
    are), so pre-activations are O(1) and both sigmoids' and the clamps' both sides are reached."""
    with torch.no_grad():
        for p in module.parameters():
            if p.dim() >= 2:
                p.copy_(torch.randn(p.shape, generator=gen) / p.shape[-1] ** 0.5)
            else:
                p.copy_(1 + 0.3 * torch.randn(p.shape, generator=gen))


def _randomise_router(router: Router, gen: torch.Generator) -> None:
    """A correction bias that moves choices (so choosing by score + bias is tested), or a hash
    table of k distinct experts per token."""
    c = router.cfg
    if router.is_hash:
        rows = [torch.randperm(c.n_routed_experts, generator=gen)[: c.num_experts_per_tok]
                for _ in range(router.tid2eid.shape[0])]
        router.tid2eid.copy_(torch.stack(rows))
    else:
        router.e_score_correction_bias.copy_(0.3 * torch.randn(c.n_routed_experts, generator=gen))


def _hf_moe_state(moe: MoE, prefix: str = "") -> dict[str, torch.Tensor]:
    """Our MoE's tensors under transformers' names: the routed experts fused, gate_up_proj
    (E, 2I, dim) = [gate; up] and down_proj (E, dim, I)."""
    out = {f"{prefix}{k}": v for k, v in moe.state_dict().items() if not k.startswith("experts.")}
    experts = [e for e in moe.experts if isinstance(e, nn.Module)]
    out[f"{prefix}experts.gate_up_proj"] = torch.stack(
        [torch.cat([e.gate_proj.weight, e.up_proj.weight]) for e in experts])
    out[f"{prefix}experts.down_proj"] = torch.stack([e.down_proj.weight for e in experts])
    return out


HYPER_SHAPES = [(2, 37, 20), (3, 53, 7)]  # (hc_mult, dim, sinkhorn_iters)


# ---------------------------------------------------------------------------- mHC
@pytest.mark.parametrize(("hc_mult", "dim", "iters"), HYPER_SHAPES)
def test_hyper_connection_matches_transformers(hc_mult: int, dim: int, iters: int) -> None:
    cfg = _cfg(dim, hc_mult, iters)
    gen = torch.Generator().manual_seed(hc_mult)
    ours = HyperConnection(cfg)
    _randomise(ours, gen)
    theirs = hf.DeepseekV4HyperConnection(_hf_cfg(cfg))
    theirs.load_state_dict(ours.state_dict())
    streams = 3 * torch.randn(2, 5, hc_mult, dim, generator=gen)
    with torch.no_grad():
        got, base = ours(streams), theirs(streams)
        with float64_oracle():
            exact = copy.deepcopy(theirs).double()(streams.double())
    # The longest chain: the RMS mean and fn's dot product over N * dim, then per Sinkhorn
    # round a row and a column sum of N (softmax's included).
    terms = 2 * hc_mult * dim + 2 * iters * hc_mult
    for name, g, b, e in zip(("post", "comb", "collapsed"), got, base, exact, strict=True):
        assert_within_rounding(g, e, b, terms=terms, what=name)
    comb = got[1]
    if hc_mult > 2:  # (a 2 x 2 doubly stochastic matrix is symmetric; 3 x 3 ones need not be)
        assert not torch.allclose(comb, comb.transpose(-1, -2), atol=1e-3), "would hide a transpose"
    # Sinkhorn ends on the columns: each sums to s / (s + eps) with s ~ 1 (the rows converge
    # towards 1 with the iterations, to 2e-2 after 7 here).
    assert float((comb.sum(-2) - 1).abs().max()) <= 2 * cfg.hyper.eps  # type: ignore[union-attr]


@pytest.mark.parametrize(("hc_mult", "dim", "iters"), HYPER_SHAPES)
def test_hyper_head_matches_transformers(hc_mult: int, dim: int, iters: int) -> None:
    cfg = _cfg(dim, hc_mult, iters)
    gen = torch.Generator().manual_seed(10 + hc_mult)
    ours = HyperHead(cfg)
    _randomise(ours, gen)
    theirs = hf.DeepseekV4HyperHead(_hf_cfg(cfg))
    theirs.load_state_dict(ours.state_dict())
    streams = 3 * torch.randn(2, 5, hc_mult, dim, generator=gen)
    with torch.no_grad():
        with float64_oracle():
            exact = copy.deepcopy(theirs).double()(streams.double())
        assert_within_rounding(ours(streams), exact, theirs(streams), terms=2 * hc_mult * dim + hc_mult)


def test_hyper_params_init_as_transformers_and_stay_fp32_in_bf16() -> None:
    """fn ~ N(0, 0.02), base 0, scale 1 (transformers' _init_weights); a bf16 model, cast or
    built empty for a loader, keeps them fp32 (its _keep_in_fp32_modules_strict)."""
    cfg = _cfg(64, 3, 5, _moe())
    model = Transformer(cfg)
    hc = model.blocks[1].ffn_hc
    assert hc is not None and model.hc_head is not None
    assert torch.equal(hc.base, torch.zeros_like(hc.base)) and torch.equal(hc.scale, torch.ones(3))
    # The sample std of 2880 N(0, 0.02) draws is within 1.3% of 0.02 (one sigma); 10% is 7 sigma.
    assert abs(float(hc.fn.detach().std()) - 0.02) < 0.002
    assert torch.equal(model.hc_head.hc_scale, torch.ones(1))
    for bf16 in (Transformer(cfg).to(torch.bfloat16), Transformer.empty(cfg, torch.bfloat16, "cpu")):
        assert bf16.embed_tokens.weight.dtype == torch.bfloat16
        kept = {n: p.dtype for n, p in bf16.named_parameters() if "_hc." in n or n.startswith("hc_head.")}
        assert len(kept) == 2 * 2 * 3 + 3 and set(kept.values()) == {torch.float32}, kept
        assert bf16.blocks[0].mlp.gate.tid2eid.dtype == torch.int64  # type: ignore[union-attr]
    with torch.no_grad():
        logits = Transformer(cfg).to(torch.bfloat16)(torch.randint(0, VOCAB, (2, 7)))
    assert logits.dtype == torch.bfloat16 and bool(logits.isfinite().all())


def test_v4_norm_keeps_fp32_weight_as_transformers() -> None:
    """A bf16 V4 model's norms: fp32 weight, applied before rounding, bit for bit transformers'."""
    ours = Float32RMSNorm(37, 1e-6).to(torch.bfloat16)
    theirs = hf.DeepseekV4RMSNorm(37, eps=1e-6).to(torch.float32)
    with torch.no_grad():
        ours.weight.normal_(1.0, 0.3)
        theirs.weight.copy_(ours.weight)
        x = torch.randn(3, 37).to(torch.bfloat16)
        assert ours.weight.dtype == torch.float32
        assert torch.equal(ours(x), theirs(x))


# ---------------------------------------------------------------------------- MoE
@pytest.mark.parametrize("layer", [0, 1], ids=["hash", "topk"])
@pytest.mark.parametrize("limit", [0.7, None], ids=["clamped", "unclamped"])
def test_moe_matches_transformers(layer: int, limit: float | None) -> None:
    cfg = _cfg(37, 2, 20, _moe(limit if limit is not None else 1e4))
    gen = torch.Generator().manual_seed(layer)
    assert cfg.moe is not None
    ours = MoE(cfg.dim, cfg.moe, VOCAB if cfg.is_hash_layer(layer) else None).eval()
    _randomise(ours, gen)
    _randomise_router(ours.gate, gen)
    theirs = hf.DeepseekV4SparseMoeBlock(_hf_cfg(cfg), layer).eval()
    theirs.load_state_dict(_hf_moe_state(ours))
    x = torch.randn(2, 7, cfg.dim, generator=gen)
    ids = torch.randint(0, VOCAB, (2, 7), generator=gen)
    with torch.no_grad():
        # The same experts, so the outputs compare the same sums.
        _, weights, theirs_idx = (theirs.gate(x, ids) if layer == 0 else theirs.gate(x))
        ours_weights, ours_idx = ours.gate(x.reshape(-1, cfg.dim), ids)
        assert torch.equal(ours_idx.sort(-1).values, theirs_idx.sort(-1).values)
        if layer == 1:  # the bias changed some choices: choosing by the scores alone differs
            scores = torch.nn.functional.softplus(x.reshape(-1, cfg.dim) @ ours.gate.weight.T).sqrt()
            plain = scores.topk(3, dim=-1).indices.sort(-1).values
            assert not torch.equal(plain, ours_idx.sort(-1).values)
        assert_close(ours_weights, weights)
        if limit is not None:  # the clamp is reached, above and below
            pre = x @ ours.shared_experts.gate_proj.weight.T  # type: ignore[union-attr]
            up = x @ ours.shared_experts.up_proj.weight.T  # type: ignore[union-attr]
            assert bool((pre > limit).any()) and bool((up < -limit).any()) and bool((up > limit).any())
        exact = copy.deepcopy(theirs).double()(x.double(), input_ids=ids)
        # Longest chain: an expert's gate dot (dim), its down dot (I), the k routed outputs and
        # the shared one summed.
        terms = cfg.dim + cfg.moe.moe_intermediate_size + cfg.moe.num_experts_per_tok + 1
        assert_within_rounding(ours(x, ids), exact, theirs(x, input_ids=ids), terms=terms)


def test_hash_routing_needs_the_token_ids() -> None:
    moe = MoE(16, _moe(), VOCAB)
    with pytest.raises(ConfigError, match="input_ids"):
        moe(torch.randn(2, 3, 16))
    with pytest.raises(ConfigError, match="tokens"):
        moe(torch.randn(2, 3, 16), torch.zeros(2, 4, dtype=torch.long))


def test_training_bookkeeping_for_hash_and_sqrtsoftplus_routers() -> None:
    """tokens_per_expert counts what was routed (the hash table's picks in a hash layer) and
    mean_scores, the scores normalised per token and averaged, sum to 1 and carry a gradient
    (latentattn.train.balance)."""
    from latentattn.train.balance import balance_loss, expert_loads, moe_routers

    cfg = _cfg(24, 2, 4, _moe())
    model = Transformer(cfg).train()
    gen = torch.Generator().manual_seed(3)
    for blk in model.blocks:
        assert isinstance(blk.mlp, MoE)
        _randomise_router(blk.mlp.gate, gen)
    ids = torch.randint(0, VOCAB, (2, 9), generator=gen)
    model(ids)
    hash_gate, topk_gate = (blk.mlp.gate for blk in model.blocks)  # type: ignore[union-attr]
    assert isinstance(hash_gate, Router) and hash_gate.is_hash and not topk_gate.is_hash
    want = torch.bincount(hash_gate.tid2eid[ids].flatten(), minlength=8)
    assert torch.equal(hash_gate.tokens_per_expert, want)  # type: ignore[arg-type]
    for gate in (hash_gate, topk_gate):
        assert gate.tokens_per_expert is not None and int(gate.tokens_per_expert.sum()) == 18 * 3
        assert gate.mean_scores is not None and gate.mean_scores.requires_grad
        # A mean of per-token distributions over 8 experts: 1 within a few ulps.
        assert abs(float(gate.mean_scores.sum()) - 1) < 8 * EPS32
    routers = moe_routers(model)
    loss = balance_loss(routers, expert_loads(routers))
    loss.backward()
    assert hash_gate.weight.grad is not None and bool(hash_gate.weight.grad.abs().sum() > 0)


# ---------------------------------------------------------------------------- the decoder layer
class _OurAttn(nn.Module):
    """A stand-in attention (our interface): the layer test is about what is around it."""

    def __init__(self, proj: nn.Linear) -> None:
        super().__init__()
        self.proj = proj

    def forward(self, x: torch.Tensor, rope: Any, step: Any, cache: Any) -> torch.Tensor:
        return torch.tanh(self.proj(x))


class _TheirAttn(_OurAttn):
    def forward(self, x: torch.Tensor, **kwargs: Any) -> tuple[torch.Tensor, None]:  # type: ignore[override]
        return torch.tanh(self.proj(x)), None


@pytest.mark.parametrize(("hc_mult", "dim", "iters"), HYPER_SHAPES)
@pytest.mark.parametrize("layer", [0, 1], ids=["hash", "topk"])
def test_block_streams_match_transformers_decoder_layer(hc_mult: int, dim: int, iters: int,
                                                        layer: int) -> None:
    """Block.streams is DeepseekV4DecoderLayer.forward around the same attention: mHC collapse,
    pre-norm, attention, expand + comb^T mix; then the same around the MoE (hash layers routed
    by the ids)."""
    cfg = _cfg(dim, hc_mult, iters, _moe())
    gen = torch.Generator().manual_seed(20 + layer)
    ours = Block(cfg, layer).eval()
    proj = nn.Linear(dim, dim, bias=False)
    ours.self_attn = _OurAttn(proj)  # type: ignore[assignment]
    _randomise(ours, gen)
    assert isinstance(ours.mlp, MoE)
    _randomise_router(ours.mlp.gate, gen)
    theirs = hf.DeepseekV4DecoderLayer(_hf_cfg(cfg), layer).eval()
    theirs.self_attn = _TheirAttn(copy.deepcopy(proj))
    state = {k: v for k, v in ours.state_dict().items() if not k.startswith("mlp.")}
    theirs.load_state_dict({**state, **_hf_moe_state(ours.mlp, "mlp.")})
    hs = torch.randn(2, 6, hc_mult, dim, generator=gen)
    ids = torch.randint(0, VOCAB, (2, 6), generator=gen)
    with torch.no_grad():
        got = ours.streams(hs, None, None, None, ids)  # type: ignore[arg-type]
        want = theirs(hs, input_ids=ids)
    # Per sub-block: the mHC chain (2 N dim + 2 iters N), the norm (dim), the attention's or an
    # expert's dot products (dim + I), the mix (N + k + 1); twice.
    terms = 2 * (2 * hc_mult * dim + 2 * iters * hc_mult + 3 * dim + 19 + hc_mult + 4)
    _assert_fp32_agree(got, want, terms, "streams after the layer")


# ---------------------------------------------------------------------------- the Transformer
def _hyper_mla(hc_mult: int = 3) -> ModelConfig:
    """Tiny MLA with mHC and V4's MoE (hash layer 0, top-k layer 1): the wiring without V4's
    attention."""
    return ModelConfig(
        vocab_size=VOCAB, dim=40, n_layers=2, intermediate_size=24,
        attention=MLAConfig(n_heads=2, q_lora_rank=16, kv_lora_rank=16, qk_nope_head_dim=8,
                            qk_rope_head_dim=8, v_head_dim=8),
        rope=RopeConfig(interleaved=True), moe=_moe(), max_seq_len=64,
        hyper=HyperConfig(hc_mult=hc_mult, sinkhorn_iters=6))


def test_hyper_model_names_follow_transformers() -> None:
    keys = Transformer(_hyper_mla()).state_dict()
    for name in ("layers.0.attn_hc.fn", "layers.1.ffn_hc.base", "layers.1.ffn_hc.scale",
                 "hc_head.hc_fn", "hc_head.hc_base", "hc_head.hc_scale", "layers.0.mlp.gate.tid2eid",
                 "layers.1.mlp.gate.e_score_correction_bias"):
        assert name in keys, name
    assert "layers.0.mlp.gate.e_score_correction_bias" not in keys  # a hash router has none
    assert keys["layers.0.mlp.gate.tid2eid"].shape == (VOCAB, 3)
    assert not keys["layers.0.mlp.gate.tid2eid"].any()  # zeros until a checkpoint fills it
    assert "hc_head.hc_fn" not in Transformer(_hyper_mla().replace(hyper=None)).state_dict()


@torch.no_grad()
def test_hyper_model_at_once_equals_token_by_token() -> None:
    """mHC and hash routing act per token: the cache sees the same model."""
    model = Transformer(_hyper_mla()).eval()
    _randomise_router(model.blocks[0].mlp.gate, torch.Generator().manual_seed(4))  # type: ignore[union-attr, arg-type]
    ids = torch.randint(0, VOCAB, (2, 11))
    full = model(ids)
    cache = model.make_cache(2, 16)
    steps = torch.cat([model(ids[:, i : i + 1], cache) for i in range(11)], 1)
    assert_close(steps, full)
    # The streams matter: without the hash table's routing the logits change.
    model.blocks[0].mlp.gate.tid2eid.zero_()  # type: ignore[union-attr, operator]
    assert not torch.allclose(model(ids), full)


def test_v4_model_built_empty_has_its_computed_buffers_and_fp32_norms() -> None:
    """Transformer.empty (what loaders fill) rebuilds what no checkpoint holds, V4's RoPE
    frequencies included, at their exact fp32 values in a bf16 model (not rounded through bf16),
    and a bf16 V4 model keeps its layer and final norms fp32."""
    from latentattn import get_preset

    cfg = get_preset("tiny-v4")
    fresh = Transformer(cfg)
    empty = Transformer.empty(cfg, torch.bfloat16, "cpu")
    saved = set(fresh.state_dict())
    computed = {n: b for n, b in fresh.named_buffers() if n not in saved and not n.startswith("rotary.")}
    assert any(".self_attn." in n for n in computed)
    for name, buf in computed.items():
        assert torch.equal(empty.get_buffer(name), buf), name
    ends = ("input_layernorm.weight", "post_attention_layernorm.weight")
    norms = {n: p.dtype for n, p in empty.named_parameters() if n.endswith(ends) or n == "norm.weight"}
    assert len(norms) == 2 * cfg.n_layers + 1 and set(norms.values()) == {torch.float32}
    loaded = Transformer.empty(cfg, torch.float32, "cpu")
    loaded.load_state_dict(fresh.state_dict())
    ids = torch.randint(0, cfg.vocab_size, (2, 9))
    with torch.no_grad():
        assert torch.equal(loaded(ids), fresh(ids))
