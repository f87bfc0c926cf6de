"""Hugging Face DeepSeek-V4 config.json (``model_type: deepseek_v4``) <-> :class:`ModelConfig`.

The rules mirror transformers 5.25's ``configuration_deepseek_v4.py`` (``DeepseekV4Config``: its
defaults and the legacy keys its ``__post_init__`` folds in: ``compress_ratios``,
``compress_rate_csa``/``compress_rate_hca``, ``num_hash_layers``, ``qk_rope_head_dim``,
``rope_scaling``) and ``modeling_deepseek_v4.py`` (what each field does to the model). What the
library cannot build the way transformers does is refused with one line naming the field.

Quantised checkpoints (``quantization_config``) are checked by
:func:`latentattn.interop.v4_quant.v4_quantization` (re-exported here, with :class:`V4Quant`).
"""

from __future__ import annotations

import math
from typing import Any

from latentattn.config import (
    CSA,
    HCA,
    SLIDING,
    V4_LAYER_TYPES,
    HyperConfig,
    ModelConfig,
    MoEConfig,
    RopeConfig,
    V4AttentionConfig,
)
from latentattn.errors import ConfigError
from latentattn.interop.hf_config import CONFIG_NAME, _build, _Fields, _rope_from_hf, rope_to_hf
from latentattn.interop.v4_quant import V4Quant, v4_quantization

V4_MODEL_TYPE = "deepseek_v4"
HASH_MOE, MOE = "hash_moe", "moe"

# DeepseekV4Config's defaults for fields that shape no tensor. Shape fields (hidden_size, head_dim,
# n_routed_experts, index_head_dim, hc_mult, ...) have defaults there too (V4-Flash's), but a
# missing one is an error here rather than a guess, as for V2/V3 (latentattn.interop.hf_config).
_DEFAULTS: dict[str, Any] = {
    "rope_theta": 10000.0,
    "compress_rope_theta": 160000.0,
    "sliding_window": 128,
    "index_topk": 512,
    "hc_sinkhorn_iters": 20,
    "hc_eps": 1e-6,
    "rms_norm_eps": 1e-6,
    "routed_scaling_factor": 1.5,
    "swiglu_limit": 10.0,
    "n_shared_experts": 1,
}
# DeepseekV4Config.default_compress_rates (m = 4 for CSA, m' = 128 for HCA: report 2.3.1, 2.3.2),
# default_num_hash_layers and default_partial_rotary_factor (64 rotary dims of 512).
_DEFAULT_RATES = {CSA: 4, HCA: 128}
_DEFAULT_HASH_LAYERS = 3
_DEFAULT_PARTIAL_ROTARY = 64 / 512
# The legacy per-layer `compress_ratios` (DeepSeek's own config.json): transformers'
# _COMPRESS_RATIO_TO_LAYER_TYPE, a fixed table (any other value is a KeyError there).
_RATIO_TO_TYPE = {0: SLIDING, 4: CSA, 128: HCA}


# --------------------------------------------------------------------------- config.json -> ours
def _types(f: _Fields, key: str, n_layers: int, allowed: tuple[str, ...]) -> list[str] | None:
    """A per-layer list of names: at least one entry per layer, cut to n_layers as
    DeepseekV4Config does (DeepSeek's lists carry one more for the MTP layer)."""
    value = f.d.get(key)
    if value is None:
        return None
    if not isinstance(value, list) or len(value) < n_layers:
        raise ConfigError(f"{f.source}: field {key!r} must be a list of {n_layers} entries (one "
                          f"per layer), got {value!r}")
    bad = sorted({str(t) for t in value if t not in allowed})
    if bad:
        raise ConfigError(f"{f.source}: field {key!r} holds unknown type(s) {', '.join(bad)} "
                          f"(known: {', '.join(allowed)})")
    return list(value[:n_layers])


def _layer_types(f: _Fields, n_layers: int) -> tuple[str, ...]:
    explicit = _types(f, "layer_types", n_layers, V4_LAYER_TYPES)
    if explicit is not None:
        return tuple(explicit)
    ratios = f.d.get("compress_ratios")
    if ratios is not None:
        if not isinstance(ratios, list) or len(ratios) < n_layers:
            raise ConfigError(f"{f.source}: field 'compress_ratios' must be a list of at least "
                              f"{n_layers} entries (one per layer), got {ratios!r}")
        bad = sorted({repr(r) for r in ratios[:n_layers] if r not in _RATIO_TO_TYPE
                      or isinstance(r, bool)})
        if bad:
            raise ConfigError(f"{f.source}: field 'compress_ratios' holds {', '.join(bad)}; "
                              "transformers' DeepseekV4Config maps only 0 (sliding), 4 (CSA) and "
                              "128 (HCA)")
        return tuple(_RATIO_TO_TYPE[r] for r in ratios[:n_layers])
    # DeepseekV4Config's default schedule: two HCA layers, then CSA and HCA alternating.
    rest = [CSA if i % 2 else HCA for i in range(max(n_layers - 2, 0))]
    return tuple([HCA] * min(n_layers, 2) + rest)


def _compress_rates(f: _Fields) -> dict[str, int]:
    raw = f.d.get("compress_rates")
    rates = dict(_DEFAULT_RATES)
    if raw is not None:
        if not isinstance(raw, dict) or set(raw) - set(_DEFAULT_RATES):
            raise ConfigError(f"{f.source}: field 'compress_rates' must map {CSA} and/or {HCA} to "
                              f"rates, got {raw!r}")
        rates.update(raw)
    for key, name in (("compress_rate_csa", CSA), ("compress_rate_hca", HCA)):
        if f.d.get(key) is not None:
            rates[name] = f.d[key]
    for name, rate in rates.items():
        if not isinstance(rate, int) or isinstance(rate, bool) or rate <= 0:
            raise ConfigError(f"{f.source}: field 'compress_rates' {name} must be a positive "
                              f"integer, got {rate!r}")
    return rates


def _hash_layers(f: _Fields, n_layers: int) -> int:
    """How many leading MoE layers route by the token-id table (``hash_moe``)."""
    types = _types(f, "mlp_layer_types", n_layers, (HASH_MOE, MOE))
    if types is None:
        n = f.get("num_hash_layers", int, default=_DEFAULT_HASH_LAYERS)
        if n < 0:
            raise ConfigError(f"{f.source}: field 'num_hash_layers' must be >= 0, got {n}")
        return min(n, n_layers)
    n = types.count(HASH_MOE)
    if types != [HASH_MOE] * n + [MOE] * (n_layers - n):
        # MoEConfig.n_hash_layers: the first n MoE layers. transformers would build any pattern.
        raise ConfigError(f"{f.source}: field 'mlp_layer_types' must be hash_moe layers followed by "
                          f"moe layers, got {types!r}")
    return n


def _partial_rotary(f: _Fields, head_dim: int) -> float:
    prf = f.get("partial_rotary_factor", (int, float), default=None)
    if prf is not None:
        return float(prf)
    legacy = f.get("qk_rope_head_dim", int, default=None)
    return legacy / head_dim if legacy is not None else _DEFAULT_PARTIAL_ROTARY


def _rope_params(f: _Fields, prf: float) -> tuple[dict[str, Any], dict[str, Any], bool]:
    """(main, compress, nested) rope_parameters as DeepseekV4Config.__post_init__ builds them."""
    rp = f.d.get("rope_parameters") or {}
    if not isinstance(rp, dict):
        raise ConfigError(f"{f.source}: field 'rope_parameters' must be an object, got {rp!r}")
    if isinstance(rp.get("main"), dict) and isinstance(rp.get("compress"), dict):
        for label in ("main", "compress"):
            own = rp[label].get("partial_rotary_factor", prf)
            if not isinstance(own, (int, float)) or not math.isclose(own, prf, rel_tol=1e-12):
                raise ConfigError(f"{f.source}: field 'rope_parameters' {label} partial_rotary_factor "
                                  f"({own!r}) differs from the top-level one ({prf})")
        return dict(rp["main"]), dict(rp["compress"]), True
    # The flat form: PreTrainedConfig folds the legacy rope_scaling in, then the yarn keys go to
    # the compress rope only, whose theta is compress_rope_theta; the main rope is plain.
    flat: dict[str, Any] = {}
    for key in ("rope_scaling", "rope_parameters"):
        raw = f.d.get(key)
        if raw is not None:
            if not isinstance(raw, dict):
                raise ConfigError(f"{f.source}: field {key!r} must be an object, got {raw!r}")
            flat.update({k: v for k, v in raw.items() if k not in ("main", "compress")})
    main = {"rope_type": "default",
            "rope_theta": f.get("rope_theta", (int, float), default=_DEFAULTS["rope_theta"])}
    compress = {**flat, "rope_theta": f.get("compress_rope_theta", (int, float),
                                            default=_DEFAULTS["compress_rope_theta"])}
    return main, compress, False


def _rope(params: dict[str, Any], label: str, max_pos: int, source: str) -> RopeConfig:
    """One of V4's two rope tables: interleaved pairs (modeling_deepseek_v4.rotate_half)."""
    params = {k: v for k, v in params.items() if k not in ("partial_rotary_factor", "attention_factor")}
    return _rope_from_hf(_Fields({"rope_parameters": params, "max_position_embeddings": max_pos},
                                 f"{source} rope_parameters.{label}"), V4_MODEL_TYPE, interleaved=True)


def _refuse_unless(f: _Fields, key: str, allowed: tuple[Any, ...], why: str) -> None:
    value = f.d.get(key)
    if key in f.d and value not in allowed:
        raise ConfigError(f"{f.source}: field {key!r} is {value!r}; {why}")


def config_from_hf_v4(d: dict[str, Any], *, source: str = CONFIG_NAME, **overrides: Any) -> ModelConfig:
    """Map a ``deepseek_v4`` config.json dict onto a :class:`ModelConfig` (V4AttentionConfig,
    HyperConfig, MoEConfig with sqrtsoftplus routing and hash layers); ``overrides`` go to
    :meth:`ModelConfig.replace`."""
    f = _Fields(d, source)
    if f.get("model_type", str) != V4_MODEL_TYPE:
        raise ConfigError(f"{source}: model_type must be {V4_MODEL_TYPE!r}")
    # What DeepseekV4Config accepts but the library's V4 cannot build (or transformers ignores
    # and a reader of the file would not expect ignored).
    _refuse_unless(f, "num_key_value_heads", (1,),
                   "DeepSeek-V4 attention has one shared key/value head (num_key_value_heads 1)")
    _refuse_unless(f, "attention_bias", (False,), "V4's attention projections have no biases")
    _refuse_unless(f, "mlp_bias", (False,), "V4's experts have no biases")
    _refuse_unless(f, "hidden_act", ("silu",), "only silu (SwiGLU experts) is supported")
    _refuse_unless(f, "scoring_func", ("sqrtsoftplus",),
                   "latentattn's V4 MoE routes with sqrtsoftplus scores only")
    _refuse_unless(f, "topk_method", ("noaux_tc",),
                   "DeepseekV4TopKRouter picks the top-k of the bias-corrected scores (noaux_tc)")
    for key in ("n_group", "topk_group"):
        _refuse_unless(f, key, (None, 1), "DeepseekV4TopKRouter has no group-limited routing")
    _refuse_unless(f, "first_k_dense_replace", (None, 0),
                   "every DeepSeek-V4 layer is an MoE (transformers builds no dense layer)")
    _refuse_unless(f, "norm_topk_prob", (True,),
                   "DeepseekV4TopKRouter always renormalises the top-k weights")
    _refuse_unless(f, "n_shared_experts", (1,),
                   "DeepseekV4SparseMoeBlock builds exactly one shared expert")
    v4_quantization(d, source)  # refuse an unsupported format before any weight is read

    n_layers = f.get("num_hidden_layers", int)
    head_dim = f.get("head_dim", int)
    prf = _partial_rotary(f, head_dim)
    rope_dim = int(head_dim * prf)  # DeepseekV4Config.__post_init__: qk_rope_head_dim
    max_pos = f.get("max_position_embeddings", int)
    main_params, compress_params, nested = _rope_params(f, prf)
    main_type = main_params.get("rope_type", main_params.get("type", "default"))
    if main_type != "default":
        raise ConfigError(f"{source}: field 'rope_parameters' main rope_type is {main_type!r}; "
                          "DeepSeek-V4's sliding layers use plain RoPE (rope_type default)")
    compress_type = compress_params.get("rope_type", compress_params.get("type", "default"))
    if compress_type == "yarn":
        # __post_init__ sets attention_factor 1.0 for the flat form: V4 never rescales cos/sin.
        # A nested dict without it would make transformers scale them by 0.1 ln(factor) + 1.
        factor = compress_params.get("attention_factor", None if nested else 1.0)
        if factor != 1.0:
            raise ConfigError(
                f"{source}: field 'rope_parameters' compress YaRN attention_factor is {factor!r}; "
                "only 1.0 is supported (DeepSeek-V4 does not rescale cos/sin)")
    rates = _compress_rates(f)
    n_experts = f.get("n_routed_experts", int)
    attention = _build(
        source, V4AttentionConfig,
        n_heads=f.get("num_attention_heads", int),
        head_dim=head_dim,
        qk_rope_head_dim=rope_dim,
        q_lora_rank=f.get("q_lora_rank", int),
        o_groups=f.get("o_groups", int),
        o_lora_rank=f.get("o_lora_rank", int),
        layer_types=_layer_types(f, n_layers),
        sliding_window=f.get("sliding_window", int, default=_DEFAULTS["sliding_window"]),
        csa_rate=rates[CSA],
        hca_rate=rates[HCA],
        index_n_heads=f.get("index_n_heads", int),
        index_head_dim=f.get("index_head_dim", int),
        index_topk=f.get("index_topk", int, default=_DEFAULTS["index_topk"]),
        compress_rope=_rope(compress_params, "compress", max_pos, source),
    )
    moe = _build(
        source, MoEConfig,
        n_routed_experts=n_experts,
        n_shared_experts=1,
        num_experts_per_tok=f.get("num_experts_per_tok", int),
        moe_intermediate_size=f.get("moe_intermediate_size", int),
        first_k_dense_replace=0,
        scoring_func="sqrtsoftplus",
        topk_method="noaux_tc",
        n_group=1,
        topk_group=1,
        routed_scaling_factor=float(f.get("routed_scaling_factor", (int, float),
                                          default=_DEFAULTS["routed_scaling_factor"])),
        norm_topk_prob=True,
        n_hash_layers=_hash_layers(f, n_layers),
        swiglu_limit=float(f.get("swiglu_limit", (int, float), default=_DEFAULTS["swiglu_limit"])),
    )
    hyper = _build(
        source, HyperConfig,
        hc_mult=f.get("hc_mult", int),
        sinkhorn_iters=f.get("hc_sinkhorn_iters", int, default=_DEFAULTS["hc_sinkhorn_iters"]),
        eps=float(f.get("hc_eps", (int, float), default=_DEFAULTS["hc_eps"])),
    )
    cfg = _build(
        source, ModelConfig,
        name=str(d.get("_name_or_path") or V4_MODEL_TYPE),
        vocab_size=f.get("vocab_size", int),
        dim=f.get("hidden_size", int),
        n_layers=n_layers,
        attention=attention,
        # DeepseekV4Config.attribute_map reads intermediate_size as moe_intermediate_size (the
        # shared expert's width); no layer has a dense FFN.
        intermediate_size=f.get("moe_intermediate_size", int),
        rope=_rope(main_params, "main", max_pos, source),
        moe=moe,
        norm_eps=float(f.get("rms_norm_eps", (int, float), default=_DEFAULTS["rms_norm_eps"])),
        max_seq_len=max_pos,
        tie_word_embeddings=f.get("tie_word_embeddings", bool, default=False),
        hyper=hyper,
    )
    return cfg.replace(**overrides) if overrides else cfg


# --------------------------------------------------------------------------- ours -> config.json
def _rotary_factor(head_dim: int, rope_dim: int) -> float:
    """A partial_rotary_factor that transformers' ``int(head_dim * factor)`` maps back to
    ``rope_dim`` (the plain quotient can land a rounding step below it)."""
    factor = rope_dim / head_dim
    while int(head_dim * factor) < rope_dim:
        factor = math.nextafter(factor, math.inf)
    return factor


def _v4_rope_to_hf(rope: RopeConfig, what: str, prf: float, plain: bool) -> dict[str, Any]:
    if not rope.interleaved:
        raise ConfigError(f"DeepSeek-V4 rotates interleaved pairs; this model's {what} does not")
    if plain and (rope.yarn is not None or rope.scaling is not None):
        raise ConfigError(f"DeepSeek-V4's {what} (sliding layers) is unscaled in transformers; "
                          "this model's has YaRN or scaling")
    out = {**rope_to_hf(rope), "partial_rotary_factor": prf}
    if out["rope_type"] == "yarn":
        out["attention_factor"] = 1.0  # as DeepseekV4Config.__post_init__: cos/sin unscaled
    return out


def config_to_hf_v4(cfg: ModelConfig) -> dict[str, Any]:
    """A transformers-5 ``deepseek_v4`` config.json dict that rebuilds ``cfg``'s model
    (DeepseekV4Config accepts it; :func:`config_from_hf_v4` maps it back to ``cfg``)."""
    a, moe, hyper = cfg.attention, cfg.moe, cfg.hyper
    if not isinstance(a, V4AttentionConfig):
        raise ConfigError("config_to_hf_v4 writes DeepSeek-V4 models (a V4AttentionConfig)")
    if hyper is None:
        raise ConfigError("DeepSeek-V4's format has hyper-connections in every layer "
                          "(DeepseekV4HyperConnection); this model has none (ModelConfig.hyper)")
    if moe is None or moe.first_k_dense_replace != 0:
        raise ConfigError("DeepSeek-V4's format has an MoE in every layer (DeepseekV4SparseMoeBlock); "
                          "this model has dense layers")
    if moe.scoring_func != "sqrtsoftplus" or moe.n_group != 1 or moe.topk_group != 1:
        raise ConfigError("DeepSeek-V4's router scores with sqrtsoftplus and no group limit; this "
                          f"model's MoE uses {moe.scoring_func} with n_group {moe.n_group}")
    if moe.n_shared_experts != 1 or not moe.norm_topk_prob or moe.swiglu_limit is None:
        raise ConfigError("DeepSeek-V4's MoE has one shared expert, renormalised top-k weights and "
                          "a SwiGLU limit; this model's MoEConfig differs (n_shared_experts "
                          f"{moe.n_shared_experts}, norm_topk_prob {moe.norm_topk_prob}, "
                          f"swiglu_limit {moe.swiglu_limit})")
    prf = _rotary_factor(a.head_dim, a.qk_rope_head_dim)
    main = _v4_rope_to_hf(cfg.rope, "main rope", prf, plain=True)
    compress = _v4_rope_to_hf(a.compress_rope, "compress rope", prf, plain=False)
    n = cfg.n_layers
    return {
        "architectures": ["DeepseekV4ForCausalLM"],
        "model_type": V4_MODEL_TYPE,
        "vocab_size": cfg.vocab_size,
        "hidden_size": cfg.dim,
        "num_hidden_layers": n,
        "num_attention_heads": a.n_heads,
        "num_key_value_heads": 1,
        "head_dim": a.head_dim,
        "partial_rotary_factor": prf,
        # DeepseekV4Config's runtime attribute (transformers writes it too); readers of DeepSeek's
        # own config.json (vLLM, SGLang) take the rotary width from it.
        "qk_rope_head_dim": a.qk_rope_head_dim,
        "q_lora_rank": a.q_lora_rank,
        "o_groups": a.o_groups,
        "o_lora_rank": a.o_lora_rank,
        "layer_types": list(a.layer_types),
        "sliding_window": a.sliding_window,
        "compress_rates": {CSA: a.csa_rate, HCA: a.hca_rate},
        "index_n_heads": a.index_n_heads,
        "index_head_dim": a.index_head_dim,
        "index_topk": a.index_topk,
        "rope_theta": cfg.rope.theta,
        "compress_rope_theta": a.compress_rope.theta,
        "rope_parameters": {"main": main, "compress": compress},
        "hc_mult": hyper.hc_mult,
        "hc_sinkhorn_iters": hyper.sinkhorn_iters,
        "hc_eps": hyper.eps,
        "n_routed_experts": moe.n_routed_experts,
        "n_shared_experts": 1,
        "num_experts_per_tok": moe.num_experts_per_tok,
        "moe_intermediate_size": moe.moe_intermediate_size,
        "mlp_layer_types": [HASH_MOE] * moe.n_hash_layers + [MOE] * (n - moe.n_hash_layers),
        "scoring_func": "sqrtsoftplus",
        "norm_topk_prob": True,
        "routed_scaling_factor": moe.routed_scaling_factor,
        "swiglu_limit": moe.swiglu_limit,
        "hidden_act": "silu",
        "attention_bias": False,
        "mlp_bias": False,
        "attention_dropout": 0.0,
        "rms_norm_eps": cfg.norm_eps,
        "max_position_embeddings": cfg.max_seq_len,
        "tie_word_embeddings": cfg.tie_word_embeddings,
        "num_nextn_predict_layers": 0,  # we have no multi-token-prediction module
        "initializer_range": 0.02,
        "use_cache": True,
    }


__all__ = [
    "HASH_MOE",
    "MOE",
    "V4_MODEL_TYPE",
    "V4Quant",
    "config_from_hf_v4",
    "config_to_hf_v4",
    "v4_quantization",
]
