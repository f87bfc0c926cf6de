"""Hugging Face DeepSeek-V2/V3/V3.2 config.json <-> :class:`ModelConfig` (DeepSeek-V4's:
:mod:`latentattn.interop.hf_v4_config`, dispatched from here).

The rules here mirror transformers 5.x: ``configuration_deepseek_v2.py``,
``configuration_deepseek_v3.py`` and ``configuration_deepseek_v32.py`` (field names and defaults),
the matching ``modeling_*.py`` (routing, RoPE layout, which layers are MoE, the V3.2 indexer) and
``modeling_rope_utils.py`` (``standardize_rope_params``, ``_compute_yarn_parameters``).
"""

from __future__ import annotations

import math
from typing import Any, TypeVar

from latentattn.config import (
    IndexerConfig,
    MLAConfig,
    ModelConfig,
    MoEConfig,
    RopeConfig,
    RopeScaling,
    V4AttentionConfig,
    YarnConfig,
)
from latentattn.errors import ConfigError

SUPPORTED_MODEL_TYPES = ("deepseek_v2", "deepseek_v3", "deepseek_v32", "deepseek_v4")
# Read (into GQA attention) by latentattn.interop.llama_config; never written.
LLAMA_MODEL_TYPES = ("llama", "qwen2", "mistral")
CONFIG_NAME = "config.json"

_MISSING = object()
_T = TypeVar("_T")

# Defaults transformers uses when config.json omits a field (the dataclass defaults of
# DeepseekV2Config / DeepseekV3Config / DeepseekV32Config). Only fields that do not change tensor
# shapes get one; a missing shape field (hidden_size, kv_lora_rank, index_head_dim, ...) is an
# error rather than a guess.
_HF_DEFAULTS: dict[str, dict[str, Any]] = {
    "deepseek_v2": {
        "first_k_dense_replace": 0,
        "routed_scaling_factor": 1.0,
        "norm_topk_prob": False,
        "topk_method": "greedy",
        "n_group": None,
        "topk_group": None,
        "num_nextn_predict_layers": 0,  # DeepseekV2Config has no multi-token prediction
    },
    "deepseek_v3": {
        "first_k_dense_replace": 3,
        "routed_scaling_factor": 2.5,
        "norm_topk_prob": True,
        "topk_method": "noaux_tc",
        "n_group": 8,
        "topk_group": 4,
        "num_nextn_predict_layers": 1,  # DeepseekV3Config.num_mtp_layers, its alias
    },
}
# DeepseekV32Config: V3's defaults plus the number of keys selected (no tensor depends on it).
_HF_DEFAULTS["deepseek_v32"] = {**_HF_DEFAULTS["deepseek_v3"], "index_topk": 2048}


# --------------------------------------------------------------------------- config.json
def _build(source: str, cls: type[_T], **kwargs: Any) -> _T:
    """``cls(**kwargs)`` with the file named in the dataclass's own validation errors."""
    try:
        return cls(**kwargs)
    except ConfigError as e:
        raise ConfigError(f"{source}: {e}") from None


class _Fields:
    """Typed access to a config.json dict; errors name the field and the file."""

    def __init__(self, d: dict[str, Any], source: str) -> None:
        self.d = d
        self.source = source

    def _check(self, key: str, value: Any, kind: type | tuple[type, ...], where: str) -> Any:
        kinds = kind if isinstance(kind, tuple) else (kind,)
        # bool is an int subclass: accept it only where a bool is asked for.
        ok = isinstance(value, kinds) and not (isinstance(value, bool) and bool not in kinds)
        if not ok:
            names = " or ".join(k.__name__ for k in kinds)
            raise ConfigError(
                f"{self.source}: field {where}{key!r} must be {names}, got {type(value).__name__} "
                f"{value!r}"
            )
        return float(value) if float in kinds and int not in kinds else value

    def get(
        self, key: str, kind: type | tuple[type, ...], default: Any = _MISSING, nullable: bool = False
    ) -> Any:
        if key not in self.d:
            if default is _MISSING:
                raise ConfigError(f"{self.source}: required field {key!r} is missing")
            return default
        value = self.d[key]
        if value is None:
            if nullable:
                return None
            if default is not _MISSING:
                return default
            raise ConfigError(f"{self.source}: field {key!r} must not be null")
        return self._check(key, value, kind, "")


def _rope_from_hf(f: _Fields, model_type: str, interleaved: bool | None = None) -> RopeConfig:
    """Both layouts: transformers-5 ``rope_parameters`` (theta inside) and the older
    ``rope_scaling`` + top-level ``rope_theta`` (what DeepSeek's own config.json files hold);
    transformers' ``standardize_rope_params`` merges them the same way. Types: default, linear,
    llama3 and yarn. ``interleaved``: the pair layout when the caller knows it (Llama-family
    models are half-split); None applies DeepSeek's rules below."""
    d = f.d
    params: dict[str, Any] = {}
    for key in ("rope_scaling", "rope_parameters"):
        raw = d.get(key)
        if raw is not None:
            if not isinstance(raw, dict):
                raise ConfigError(f"{f.source}: field {key!r} must be an object, got {raw!r}")
            params.update(raw)
    if "rope_theta" not in params and d.get("rope_theta") is not None:
        params["rope_theta"] = d["rope_theta"]
    p = _Fields(params, f"{f.source} rope_parameters")
    theta = p.get("rope_theta", (int, float), default=10000.0)
    # Old configs say "type", new ones "rope_type" (standardize_rope_params reads both).
    rope_type = params.get("rope_type", params.get("type")) or "default"
    # DeepseekV2's apply_rotary_emb multiplies complex pairs (x[2i], x[2i+1]): always interleaved.
    # DeepseekV3Attention: rope_interleave (default True) picks apply_rotary_pos_emb_interleave,
    # else the half-split apply_rotary_pos_emb. DeepseekV32Attention always calls
    # apply_rotary_pos_emb_interleave (its config has no rope_interleave field); its indexer's
    # half-split RoPE is fixed by the architecture, not by the config.
    if interleaved is None:
        interleaved = model_type == "deepseek_v2" or f.get("rope_interleave", bool, default=True)
    if model_type == "deepseek_v32" and not interleaved:
        raise ConfigError(
            f"{f.source}: rope_interleave=false is not supported for deepseek_v32 (transformers' "
            f"DeepseekV32Attention ignores it and always uses interleaved RoPE)"
        )
    if rope_type == "default":
        return _build(f.source, RopeConfig, theta=float(theta), interleaved=interleaved)
    if rope_type in ("linear", "llama3"):
        # transformers' _compute_linear_scaling_rope_parameters / _compute_llama3_parameters:
        # llama3 needs all four of its fields.
        scaling = _build(
            f.source, RopeScaling, type=rope_type, factor=float(p.get("factor", (int, float))),
            **({} if rope_type == "linear" else {
                "low_freq_factor": float(p.get("low_freq_factor", (int, float))),
                "high_freq_factor": float(p.get("high_freq_factor", (int, float))),
                "original_max_position_embeddings": p.get("original_max_position_embeddings", int),
            }))
        return _build(f.source, RopeConfig, theta=float(theta), interleaved=interleaved,
                      scaling=scaling)
    if rope_type != "yarn":
        raise ConfigError(
            f"{f.source}: rope_type {rope_type!r} is not supported (supported: default, linear, "
            "llama3, yarn)"
        )
    if params.get("truncate", True) is not True:
        raise ConfigError(f"{f.source}: YaRN with truncate=false is not supported")
    max_pos = f.get("max_position_embeddings", int)
    # standardize_rope_params: original_max_position_embeddings defaults to max_position_embeddings.
    original = p.get("original_max_position_embeddings", int, default=max_pos)
    # _compute_yarn_parameters: a missing factor is max_position_embeddings / original.
    factor = p.get("factor", (int, float), default=max_pos / original)
    mscale_all_dim = float(p.get("mscale_all_dim", (int, float), default=0.0))
    # transformers uses mscale/mscale_all_dim for the cos/sin factor only when both are truthy,
    # else get_mscale(factor); our YarnConfig does the same, so a missing mscale next to a set
    # mscale_all_dim must become 0 (not YarnConfig's default 1.0) to keep that behaviour.
    mscale = p.get("mscale", (int, float), default=None)
    if mscale is None:
        mscale = 0.0 if mscale_all_dim else 1.0
    yarn = _build(
        f.source, YarnConfig,
        factor=float(factor),
        original_max_position_embeddings=original,
        # `get("beta_fast") or 32` in _compute_yarn_parameters: null and 0 mean the default.
        beta_fast=float(params.get("beta_fast") or 32.0),
        beta_slow=float(params.get("beta_slow") or 1.0),
        mscale=float(mscale),
        mscale_all_dim=mscale_all_dim,
    )
    attention_factor = params.get("attention_factor")
    if attention_factor is not None:
        from latentattn.rope import yarn_attention_factor

        if not math.isclose(float(attention_factor), yarn_attention_factor(yarn), rel_tol=1e-6):
            raise ConfigError(
                f"{f.source}: an explicit YaRN attention_factor ({attention_factor}) different "
                f"from the one implied by factor/mscale is not supported"
            )
    return _build(f.source, RopeConfig, theta=float(theta), interleaved=interleaved, yarn=yarn)


def _first_dense(f: _Fields, model_type: str, n_layers: int) -> int:
    """How many leading layers have a dense FFN.

    DeepseekV32Config derives ``mlp_layer_types`` from first_k_dense_replace when it is null, and
    DeepseekV32DecoderLayer then reads only mlp_layer_types: when present it wins. We represent
    dense layers followed by MoE layers only.
    """
    first = f.get("first_k_dense_replace", int,
                  default=_HF_DEFAULTS[model_type]["first_k_dense_replace"])
    if model_type != "deepseek_v32":
        return first
    types = f.d.get("mlp_layer_types")
    if types is None:
        return first
    if (not isinstance(types, list) or len(types) != n_layers
            or not all(t in ("dense", "sparse") for t in types)):
        raise ConfigError(
            f"{f.source}: field 'mlp_layer_types' must be a list of {n_layers} 'dense'/'sparse' "
            f"entries (one per layer), got {types!r}"
        )
    n_dense = types.count("dense")
    if types != ["dense"] * n_dense + ["sparse"] * (n_layers - n_dense):
        raise ConfigError(
            f"{f.source}: field 'mlp_layer_types' must be dense layers followed by sparse (MoE) "
            f"layers, got {types!r}"
        )
    return n_dense


def _moe_from_hf(f: _Fields, model_type: str, n_layers: int) -> MoEConfig | None:
    defaults = _HF_DEFAULTS[model_type]
    first_dense = _first_dense(f, model_type, n_layers)
    # Required (DeepseekV2/V3Config would default it to 64/256 experts); null or 0 means dense.
    n_routed = f.get("n_routed_experts", int, nullable=True)
    if not n_routed:
        return None
    # Decoder layers build an MoE only when layer_idx >= first_k_dense_replace
    # (DeepseekV2DecoderLayer / DeepseekV3DecoderLayer): beyond the last layer, none is MoE.
    if first_dense >= n_layers:
        return None
    if model_type == "deepseek_v2":
        # DeepSeek's own V2 config.json has moe_layer_freq; transformers ignores it and makes
        # every layer from first_k_dense_replace on an MoE, which is right only for freq 1.
        freq = f.get("moe_layer_freq", int, default=1)
        if freq != 1:
            raise ConfigError(f"{f.source}: moe_layer_freq={freq} is not supported (only 1)")
        scoring = f.get("scoring_func", str, default="softmax")
        if scoring != "softmax":
            raise ConfigError(
                f"{f.source}: deepseek_v2 routes with softmax (DeepseekV2TopkRouter); "
                f"scoring_func {scoring!r} is not supported"
            )
        method = f.get("topk_method", str, default=defaults["topk_method"])
        if method not in ("greedy", "group_limited_greedy"):
            raise ConfigError(
                f"{f.source}: deepseek_v2 topk_method must be greedy or group_limited_greedy, "
                f"got {method!r}"
            )
    else:
        # DeepseekV3TopkRouter (and DeepseekV32TopkRouter, the same code) always scores with
        # sigmoid + correction bias (noaux_tc); real V3/V3.2 configs say so, configs written by
        # transformers may leave the fields out.
        scoring = f.get("scoring_func", str, default="sigmoid")
        method = f.get("topk_method", str, default="noaux_tc")
        if scoring != "sigmoid" or method != "noaux_tc":
            raise ConfigError(
                f"{f.source}: {model_type} routes with scoring_func 'sigmoid' and topk_method "
                f"'noaux_tc', got {scoring!r} and {method!r}"
            )
    n_group = f.get("n_group", int, default=defaults["n_group"], nullable=True)
    topk_group = f.get("topk_group", int, default=defaults["topk_group"], nullable=True)
    return _build(
        f.source, MoEConfig,
        n_routed_experts=n_routed,
        n_shared_experts=f.get("n_shared_experts", int),
        num_experts_per_tok=f.get("num_experts_per_tok", int),
        moe_intermediate_size=f.get("moe_intermediate_size", int),
        first_k_dense_replace=first_dense,
        scoring_func=scoring,
        topk_method=method,
        n_group=1 if n_group is None else n_group,
        topk_group=1 if topk_group is None else topk_group,
        routed_scaling_factor=float(
            f.get("routed_scaling_factor", (int, float), default=defaults["routed_scaling_factor"])
        ),
        norm_topk_prob=f.get("norm_topk_prob", bool, default=defaults["norm_topk_prob"]),
    )


def config_from_hf(d: dict[str, Any], *, source: str = CONFIG_NAME, **overrides: Any) -> ModelConfig:
    """Map a Hugging Face DeepSeek-V2/V3/V3.2 config.json dict onto a :class:`ModelConfig`
    (Llama, Qwen2 and Mistral ones: :mod:`latentattn.interop.llama_config`; DeepSeek-V4:
    :mod:`latentattn.interop.hf_v4_config`).

    ``deepseek_v32`` (DeepSeek-V3.2: V3 plus DSA's lightning indexer in every layer) sets
    ``attention.indexer``; ``index_n_heads`` and ``index_head_dim`` are required (they shape
    tensors), a missing ``index_topk`` is transformers' default 2048.

    ``overrides`` go to :meth:`ModelConfig.replace` (fields, ``mla_impl``, ``index_topk``, ...),
    applied last; ``source`` names the file in error messages.
    """
    if not isinstance(d, dict):
        raise ConfigError(f"{source}: expected a JSON object, got {type(d).__name__}")
    f = _Fields(d, source)
    model_type = f.get("model_type", str)
    if model_type in LLAMA_MODEL_TYPES:
        from latentattn.interop.llama_config import llama_config_from_hf

        return llama_config_from_hf(d, source=source, **overrides)
    if model_type == "deepseek_v4":
        from latentattn.interop.hf_v4_config import config_from_hf_v4

        return config_from_hf_v4(d, source=source, **overrides)
    if model_type not in SUPPORTED_MODEL_TYPES:
        raise ConfigError(
            f"{source}: model_type {model_type!r} is not supported "
            f"(supported: {', '.join(SUPPORTED_MODEL_TYPES + LLAMA_MODEL_TYPES)})"
        )
    if f.get("attention_bias", bool, default=False):
        raise ConfigError(f"{source}: attention_bias=true is not supported (MLA has no biases)")
    if model_type == "deepseek_v2" and f.get("mlp_bias", bool, default=False):
        raise ConfigError(f"{source}: mlp_bias=true is not supported")
    act = f.get("hidden_act", str, default="silu")
    if act != "silu":
        raise ConfigError(f"{source}: hidden_act {act!r} is not supported (only silu)")
    quant = d.get("quantization_config")
    if quant is not None:
        method = quant.get("quant_method") if isinstance(quant, dict) else None
        if method != "fp8":
            raise ConfigError(
                f"{source}: quantization_config quant_method {method!r} is not supported "
                f"(only fp8 block-scaled weights, which are dequantized on load)"
            )
    n_layers = f.get("num_hidden_layers", int)
    n_heads = f.get("num_attention_heads", int)
    kv_heads = f.get("num_key_value_heads", int, default=n_heads, nullable=False)
    if kv_heads != n_heads:
        # MLA has one latent shared by all heads; transformers only uses this field for caches.
        raise ConfigError(
            f"{source}: num_key_value_heads ({kv_heads}) must equal num_attention_heads "
            f"({n_heads}) for MLA"
        )
    if "q_lora_rank" not in d:
        # DeepseekV2/V3Config would silently default it to 1536; a guess that changes shapes.
        raise ConfigError(f"{source}: required field 'q_lora_rank' is missing (null means none)")
    indexer = None
    if model_type == "deepseek_v32":
        # DeepseekV32Config defaults them to 64 heads of 128 dims; shape fields are not guessed.
        indexer = _build(
            source, IndexerConfig,
            index_n_heads=f.get("index_n_heads", int),
            index_head_dim=f.get("index_head_dim", int),
            index_topk=f.get("index_topk", int, default=_HF_DEFAULTS[model_type]["index_topk"]),
        )
    attention = _build(
        source, MLAConfig,
        n_heads=n_heads,
        kv_lora_rank=f.get("kv_lora_rank", int),
        qk_nope_head_dim=f.get("qk_nope_head_dim", int),
        qk_rope_head_dim=f.get("qk_rope_head_dim", int),
        v_head_dim=f.get("v_head_dim", int),
        q_lora_rank=f.get("q_lora_rank", int, nullable=True),
        indexer=indexer,
    )
    cfg = _build(
        source, ModelConfig,
        name=str(d.get("_name_or_path") or model_type),
        vocab_size=f.get("vocab_size", int),
        dim=f.get("hidden_size", int),
        n_layers=n_layers,
        attention=attention,
        intermediate_size=f.get("intermediate_size", int),
        rope=_rope_from_hf(f, model_type),
        moe=_moe_from_hf(f, model_type, n_layers),
        norm_eps=float(f.get("rms_norm_eps", (int, float), default=1e-6)),
        max_seq_len=f.get("max_position_embeddings", int),
        tie_word_embeddings=f.get("tie_word_embeddings", bool, default=False),
    )
    return cfg.replace(**overrides) if overrides else cfg


def mtp_layers_from_hf(d: dict[str, Any], *, source: str = CONFIG_NAME) -> range:
    """The layer indices of the multi-token-prediction modules config.json declares.

    DeepSeek-V3 (report arXiv 2412.19437 s2.2) stores its MTP module(s) after the decoder, as
    ``model.layers.{num_hidden_layers + i}`` for i < ``num_nextn_predict_layers`` (layer 61 of
    the release). latentattn has no MTP, so loading skips exactly these layers; any other layer
    beyond ``num_hidden_layers`` is a checkpoint that does not match its config. A missing field
    is transformers' default (1 for V3/V3.2, whose DeepseekV3Config writes its ``num_mtp_layers``
    under this name; 0 for V2, which has none). Call after :func:`config_from_hf` has checked
    the file.
    """
    f = _Fields(d, source)
    n_layers = f.get("num_hidden_layers", int)
    if f.get("model_type", str) in LLAMA_MODEL_TYPES:
        return range(n_layers, n_layers)  # no multi-token prediction
    if f.get("model_type", str) == "deepseek_v4":
        # V4 stores its MTP module as mtp.* (not as extra layers): latentattn.interop.hf_v4.
        return range(n_layers, n_layers)
    default = _HF_DEFAULTS[f.get("model_type", str)]["num_nextn_predict_layers"]
    n_mtp = f.get("num_nextn_predict_layers", int, default=default)
    if n_mtp < 0:
        raise ConfigError(f"{source}: field 'num_nextn_predict_layers' must be >= 0, got {n_mtp}")
    return range(n_layers, n_layers + n_mtp)


def rope_to_hf(rope_cfg: RopeConfig) -> dict[str, Any]:
    """``rope_parameters`` (transformers 5) for ``rope_cfg``'s theta and scaling."""
    rope: dict[str, Any] = {"rope_theta": rope_cfg.theta, "rope_type": "default"}
    if rope_cfg.yarn is not None:
        y = rope_cfg.yarn
        rope.update(
            rope_type="yarn", factor=y.factor,
            original_max_position_embeddings=y.original_max_position_embeddings,
            beta_fast=y.beta_fast, beta_slow=y.beta_slow, mscale=y.mscale,
            mscale_all_dim=y.mscale_all_dim,
        )
    if rope_cfg.scaling is not None:
        sc = rope_cfg.scaling
        rope.update(rope_type=sc.type, factor=sc.factor)
        if sc.type == "llama3":
            rope.update(low_freq_factor=sc.low_freq_factor, high_freq_factor=sc.high_freq_factor,
                        original_max_position_embeddings=sc.original_max_position_embeddings)
    return rope


def config_to_hf(cfg: ModelConfig) -> dict[str, Any]:
    """A transformers-5 style config.json dict that rebuilds ``cfg``'s model.

    Softmax routing is DeepSeek-V2's (``deepseek_v2``); sigmoid routing or a dense FFN is written
    as ``deepseek_v3``; a model with DSA's indexer as ``deepseek_v32`` (which transformers builds
    with interleaved MLA RoPE and sigmoid routing only). The indexer's ``key_cache`` form is a
    runtime choice and is not written. A DeepSeek-V4 model is ``deepseek_v4``
    (:func:`latentattn.interop.hf_v4_config.config_to_hf_v4`).
    """
    a = cfg.attention
    if isinstance(a, V4AttentionConfig):
        from latentattn.interop.hf_v4_config import config_to_hf_v4

        return config_to_hf_v4(cfg)
    if not isinstance(a, MLAConfig):
        raise ConfigError(
            "save_pretrained writes DeepSeek checkpoints; GQA models have no DeepSeek format"
        )
    if not a.latent_norm or a.qkv_bias or a.o_bias or cfg.rope.blocks > 1 or cfg.rope.pairs:
        what = ("it has no RMSNorm on the latent" if not a.latent_norm else
                "it has attention biases" if a.qkv_bias or a.o_bias else
                "its RoPE is per-KV-head blocks (a converted GQA model)")
        raise ConfigError(f"DeepSeek's format cannot hold this MLA: {what}; save it with "
                          "latentattn.interop.native.save_native (what latentattn convert writes)")
    moe = cfg.moe
    v2 = moe is not None and moe.scoring_func == "softmax"
    v32 = a.indexer is not None
    if v32 and v2:
        raise ConfigError(
            "deepseek_v32 (DSA) routes with sigmoid scores (noaux_tc); this model's MoE uses softmax"
        )
    if (v2 or v32) and not cfg.rope.interleaved:
        raise ConfigError(
            f"{'deepseek_v32' if v32 else 'deepseek_v2'} always uses interleaved RoPE; "
            "this model does not"
        )
    rope = rope_to_hf(cfg.rope)
    model_type, arch = (
        ("deepseek_v32", "DeepseekV32ForCausalLM") if v32
        else ("deepseek_v2", "DeepseekV2ForCausalLM") if v2
        else ("deepseek_v3", "DeepseekV3ForCausalLM")
    )
    out: dict[str, Any] = {
        "architectures": [arch],
        "model_type": model_type,
        "vocab_size": cfg.vocab_size,
        "hidden_size": cfg.dim,
        "intermediate_size": cfg.intermediate_size,
        "num_hidden_layers": cfg.n_layers,
        "num_attention_heads": a.n_heads,
        "num_key_value_heads": a.n_heads,
        "q_lora_rank": a.q_lora_rank,
        "kv_lora_rank": a.kv_lora_rank,
        "qk_nope_head_dim": a.qk_nope_head_dim,
        "qk_rope_head_dim": a.qk_rope_head_dim,
        "qk_head_dim": a.qk_head_dim,
        # DeepseekV2/V3Config.__post_init__ sets head_dim = qk_rope_head_dim (the RoPE width).
        "head_dim": a.qk_rope_head_dim,
        "v_head_dim": a.v_head_dim,
        "hidden_act": "silu",
        "attention_bias": False,
        "attention_dropout": 0.0,
        "rms_norm_eps": cfg.norm_eps,
        "max_position_embeddings": cfg.max_seq_len,
        "rope_parameters": rope,
        "tie_word_embeddings": cfg.tie_word_embeddings,
        "initializer_range": 0.02,
        "use_cache": True,
    }
    if v2:
        out["mlp_bias"] = False
    else:
        if not v32:  # DeepseekV32Config has no rope_interleave: always interleaved
            out["rope_interleave"] = cfg.rope.interleaved
        out["num_nextn_predict_layers"] = 0  # we have no multi-token-prediction layers
    if a.indexer is not None:
        out.update(
            index_n_heads=a.indexer.index_n_heads,
            index_head_dim=a.indexer.index_head_dim,
            index_topk=a.indexer.index_topk,
        )
    if moe is not None:
        out.update(
            n_routed_experts=moe.n_routed_experts,
            n_shared_experts=moe.n_shared_experts,
            num_experts_per_tok=moe.num_experts_per_tok,
            moe_intermediate_size=moe.moe_intermediate_size,
            first_k_dense_replace=moe.first_k_dense_replace,
            routed_scaling_factor=moe.routed_scaling_factor,
            norm_topk_prob=moe.norm_topk_prob,
            n_group=moe.n_group,
            topk_group=moe.topk_group,
            topk_method=moe.topk_method,
            scoring_func=moe.scoring_func,
        )
    else:
        # DeepseekV3Config requires an int n_routed_experts; with first_k_dense_replace equal to
        # the layer count no decoder layer builds an MoE (DeepseekV3DecoderLayer; V3.2 derives
        # mlp_layer_types = all "dense" from it). DeepseekV32Config types the routing fields as
        # int (not None): the unused 1s keep its validation happy.
        unused = 1 if v32 else None
        out.update(
            n_routed_experts=0, n_shared_experts=0, num_experts_per_tok=unused,
            moe_intermediate_size=cfg.intermediate_size, first_k_dense_replace=cfg.n_layers,
            n_group=unused, topk_group=unused,
        )
    return out

