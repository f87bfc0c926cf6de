"""Hugging Face DeepSeek-V2/V3 checkpoints: config.json <-> ModelConfig, safetensors <-> Transformer.

The rules here mirror transformers 5.x: ``models/deepseek_v2/configuration_deepseek_v2.py`` and
``models/deepseek_v3/configuration_deepseek_v3.py`` (field names and defaults),
``modeling_deepseek_v2.py`` / ``modeling_deepseek_v3.py`` (routing, RoPE layout, which layers are
MoE) and ``modeling_rope_utils.py`` (``standardize_rope_params``, ``_compute_yarn_parameters``).

Our parameter names are the checkpoint's without the ``model.`` prefix (``lm_head.weight`` keeps
its name), and experts are stored per expert in both, so loading is a rename plus checks.
Weights are read with ``safetensors`` only: pickle files (``pytorch_model.bin``) can run code when
loaded and are refused.
"""

from __future__ import annotations

import json
import math
import os
import re
from collections.abc import Iterator
from contextlib import ExitStack
from pathlib import Path
from typing import Any

import torch

from latentattn.config import MLAConfig, ModelConfig, MoEConfig, RopeConfig, YarnConfig
from latentattn.errors import CheckpointError, ConfigError
from latentattn.model.transformer import Transformer
from latentattn.rope import RotaryEmbedding

SUPPORTED_MODEL_TYPES = ("deepseek_v2", "deepseek_v3")
CONFIG_NAME = "config.json"
WEIGHTS_NAME = "model.safetensors"
INDEX_NAME = "model.safetensors.index.json"
PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt", ".pkl")
DEFAULT_MAX_SHARD_SIZE = 5 * 10**9  # transformers' default "5GB" (decimal units)

_MISSING = object()

# Defaults transformers uses when config.json omits a field (the dataclass defaults of
# DeepseekV2Config / DeepseekV3Config). Only fields that do not change tensor shapes get one;
# a missing shape field (hidden_size, kv_lora_rank, ...) is an error rather than a guess.
_HF_DEFAULTS: dict[str, dict[str, Any]] = {
    "deepseek_v2": {
        "first_k_dense_replace": 0,
        "routed_scaling_factor": 1.0,
        "norm_topk_prob": False,
        "topk_method": "greedy",
        "n_group": None,
        "topk_group": None,
    },
    "deepseek_v3": {
        "first_k_dense_replace": 3,
        "routed_scaling_factor": 2.5,
        "norm_topk_prob": True,
        "topk_method": "noaux_tc",
        "n_group": 8,
        "topk_group": 4,
    },
}


# --------------------------------------------------------------------------- config.json
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


def _rope_from_hf(f: _Fields, model_type: str) -> RopeConfig:
    """Both layouts: transformers-5 ``rope_parameters`` (theta inside) and the older
    ``rope_scaling`` + top-level ``rope_theta`` (what DeepSeek's own config.json files hold);
    transformers' ``standardize_rope_params`` merges them the same way."""
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
    # else the half-split apply_rotary_pos_emb.
    interleaved = (
        True if model_type == "deepseek_v2" else f.get("rope_interleave", bool, default=True)
    )
    if rope_type == "default":
        return RopeConfig(theta=float(theta), interleaved=interleaved)
    if rope_type != "yarn":
        raise ConfigError(
            f"{f.source}: rope_type {rope_type!r} is not supported (supported: default, yarn)"
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
    yarn = YarnConfig(
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
    return RopeConfig(theta=float(theta), interleaved=interleaved, yarn=yarn)


def _moe_from_hf(f: _Fields, model_type: str, n_layers: int) -> MoEConfig | None:
    defaults = _HF_DEFAULTS[model_type]
    # Required (DeepseekV2/V3Config would default it to 64/256 experts); null or 0 means dense.
    n_routed = f.get("n_routed_experts", int, nullable=True)
    if not n_routed:
        return None
    first_dense = f.get("first_k_dense_replace", int, default=defaults["first_k_dense_replace"])
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
        # DeepseekV3TopkRouter always scores with sigmoid + correction bias (noaux_tc); real V3
        # configs say so, configs written by transformers may leave the fields out.
        scoring = f.get("scoring_func", str, default="sigmoid")
        method = f.get("topk_method", str, default="noaux_tc")
        if scoring != "sigmoid" or method != "noaux_tc":
            raise ConfigError(
                f"{f.source}: deepseek_v3 routes with scoring_func 'sigmoid' and topk_method "
                f"'noaux_tc', got {scoring!r} and {method!r}"
            )
    n_group = f.get("n_group", int, default=defaults["n_group"], nullable=True)
    topk_group = f.get("topk_group", int, default=defaults["topk_group"], nullable=True)
    return MoEConfig(
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
    """Map a Hugging Face DeepSeek-V2/V3 config.json dict onto a :class:`ModelConfig`.

    ``overrides`` are ModelConfig field names (plus ``mla_impl``), applied last; ``source`` names
    the file in error messages.
    """
    if not isinstance(d, dict):
        raise ConfigError(f"{source}: expected a JSON object, got {type(d).__name__}")
    f = _Fields(d, source)
    model_type = f.get("model_type", str)
    if model_type not in SUPPORTED_MODEL_TYPES:
        raise ConfigError(
            f"{source}: model_type {model_type!r} is not supported "
            f"(supported: {', '.join(SUPPORTED_MODEL_TYPES)})"
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
    attention = MLAConfig(
        n_heads=n_heads,
        kv_lora_rank=f.get("kv_lora_rank", int),
        qk_nope_head_dim=f.get("qk_nope_head_dim", int),
        qk_rope_head_dim=f.get("qk_rope_head_dim", int),
        v_head_dim=f.get("v_head_dim", int),
        q_lora_rank=f.get("q_lora_rank", int, nullable=True),
    )
    cfg = ModelConfig(
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
    if overrides:
        fields = {fld.name for fld in ModelConfig.__dataclass_fields__.values()} | {"mla_impl"}
        unknown = sorted(set(overrides) - fields)
        if unknown:
            raise ConfigError(
                f"unknown override(s) {', '.join(unknown)}; ModelConfig fields: "
                f"{', '.join(sorted(fields))}"
            )
        cfg = cfg.replace(**overrides)
    return cfg


def config_to_hf(cfg: ModelConfig) -> dict[str, Any]:
    """A transformers-5 style config.json dict that rebuilds ``cfg``'s model.

    Softmax routing is DeepSeek-V2's (``deepseek_v2``); sigmoid routing or a dense FFN is written
    as ``deepseek_v3``.
    """
    a = cfg.attention
    if not isinstance(a, MLAConfig):
        raise ConfigError(
            "save_pretrained writes DeepSeek checkpoints; GQA models have no DeepSeek format"
        )
    moe = cfg.moe
    v2 = moe is not None and moe.scoring_func == "softmax"
    if v2 and not cfg.rope.interleaved:
        raise ConfigError("deepseek_v2 always uses interleaved RoPE; this model does not")
    rope: dict[str, Any] = {"rope_theta": cfg.rope.theta, "rope_type": "default"}
    if cfg.rope.yarn is not None:
        y = cfg.rope.yarn
        rope.update(
            rope_type="yarn", factor=y.factor,
            original_max_position_embeddings=y.original_max_position_embeddings,
            beta_fast=y.beta_fast, beta_slow=y.beta_slow, mscale=y.mscale,
            mscale_all_dim=y.mscale_all_dim,
        )
    model_type = "deepseek_v2" if v2 else "deepseek_v3"
    out: dict[str, Any] = {
        "architectures": ["DeepseekV2ForCausalLM" if v2 else "DeepseekV3ForCausalLM"],
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
        out["rope_interleave"] = cfg.rope.interleaved
        out["num_nextn_predict_layers"] = 0  # we have no multi-token-prediction layers
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
        # the layer count no decoder layer builds an MoE (DeepseekV3DecoderLayer).
        out.update(
            n_routed_experts=0, n_shared_experts=0, num_experts_per_tok=None,
            moe_intermediate_size=cfg.intermediate_size, first_k_dense_replace=cfg.n_layers,
            n_group=None, topk_group=None,
        )
    return out


# --------------------------------------------------------------------------- FP8
def dequantize_fp8(
    weight: torch.Tensor, scale_inv: torch.Tensor, block: tuple[int, int] = (128, 128)
) -> torch.Tensor:
    """Block-scaled FP8 -> fp32, as DeepSeek-V3's ``inference/kernel.py`` ``weight_dequant``.

    ``scale_inv`` (ceil(out/bo), ceil(in/bi)) holds one fp32 multiplier per (bo, bi) block.
    """
    if weight.dim() != 2 or scale_inv.dim() != 2:
        raise CheckpointError(
            f"FP8 weight and scale must be 2-D, got {tuple(weight.shape)} and {tuple(scale_inv.shape)}"
        )
    bo, bi = block
    rows, cols = weight.shape
    expected = (math.ceil(rows / bo), math.ceil(cols / bi))
    if tuple(scale_inv.shape) != expected:
        raise CheckpointError(
            f"FP8 scale shape {tuple(scale_inv.shape)} does not match weight {tuple(weight.shape)} "
            f"with blocks {block} (expected {expected})"
        )
    scale = scale_inv.float().repeat_interleave(bo, dim=0).repeat_interleave(bi, dim=1)
    return weight.float() * scale[:rows, :cols]


_FP8_DTYPES = tuple(
    getattr(torch, name) for name in ("float8_e4m3fn", "float8_e5m2", "float8_e4m3fnuz",
                                      "float8_e5m2fnuz") if hasattr(torch, name)
)


# --------------------------------------------------------------------------- loading
def _checkpoint_files(root: Path) -> tuple[list[Path], dict[str, str] | None]:
    """The safetensors files to read and, for an indexed checkpoint, its key -> file map."""
    index = root / INDEX_NAME
    if index.is_file():
        try:
            weight_map = json.loads(index.read_text())["weight_map"]
        except (json.JSONDecodeError, KeyError, TypeError) as e:
            raise CheckpointError(f"{index}: not a valid safetensors index ({e})") from None
        names = sorted(set(weight_map.values()))
        missing = [n for n in names if not (root / n).is_file()]
        if missing:
            raise CheckpointError(f"{index} names shard(s) that do not exist: {', '.join(missing)}")
        return [root / n for n in names], weight_map
    if (root / WEIGHTS_NAME).is_file():
        return [root / WEIGHTS_NAME], None
    files = sorted(root.glob("*.safetensors"))
    if files:
        return files, None
    pickles = sorted(p.name for p in root.iterdir() if p.suffix in PICKLE_SUFFIXES)
    if pickles:
        raise CheckpointError(
            f"{root} holds only pickle weights ({', '.join(pickles)}); latentattn loads safetensors "
            f"only: convert them with transformers (AutoModelForCausalLM.from_pretrained(...)"
            f".save_pretrained(dir, safe_serialization=True)) or safetensors.torch.save_file"
        )
    raise CheckpointError(f"{root} has no {WEIGHTS_NAME}, {INDEX_NAME} or *.safetensors file")


def _hf(our_name: str) -> str:
    return our_name if our_name == "lm_head.weight" else "model." + our_name


_LAYER = re.compile(r"^model\.layers\.(\d+)\.")


def _ignored(hf_name: str, cfg: ModelConfig) -> bool:
    """Checkpoint tensors that are not part of the model and are skipped, as transformers does."""
    m = _LAYER.match(hf_name)
    if m and int(m.group(1)) >= cfg.n_layers:
        # DeepSeek-V3 ships its multi-token-prediction module as layer 61
        # (_keys_to_ignore_on_load_unexpected in modeling_deepseek_v3.py).
        return True
    if hf_name.endswith("rotary_emb.inv_freq"):
        return True  # old remote-code checkpoints saved the RoPE buffer; we recompute it
    return hf_name == "lm_head.weight" and cfg.tie_word_embeddings  # tied: the embedding is it


def _resolve_dtype(dtype: object) -> torch.dtype:
    if dtype is None:
        return torch.float32
    if isinstance(dtype, torch.dtype):
        return dtype
    value = getattr(torch, dtype.removeprefix("torch."), None) if isinstance(dtype, str) else None
    if not isinstance(value, torch.dtype) or not value.is_floating_point:
        raise ConfigError(f"dtype must be a floating torch.dtype or its name, got {dtype!r}")
    return value


def _resolve_device(device: object) -> torch.device:
    if device is None:
        return torch.device("cpu")
    if not isinstance(device, (str, torch.device)):
        raise ConfigError(f"device must be a torch.device or a string, got {device!r}")
    return torch.device(device)


def _build_empty(cfg: ModelConfig, dtype: torch.dtype, device: torch.device) -> Transformer:
    """The model with uninitialised storage (no random init, one copy of the weights)."""
    with torch.device("meta"):
        model = Transformer(cfg)
    model.to(dtype=dtype)
    model.to_empty(device=device)
    # to_empty replaces each module's parameters separately, which unties shared ones.
    if cfg.tie_word_embeddings:
        model.lm_head.weight = model.embed_tokens.weight
    # Non-persistent buffers are not in the checkpoint: rebuild the fp32 RoPE tables.
    model.rotary = RotaryEmbedding(cfg.rope_dim, cfg.rope, cfg.max_seq_len).to(device)
    # The routing bias stays fp32 whatever the model dtype (transformers'
    # _keep_in_fp32_modules_strict = ["e_score_correction_bias"]).
    for name, buf in list(model.named_buffers()):
        if name.endswith("e_score_correction_bias"):
            owner = model.get_submodule(name.rsplit(".", 1)[0])
            owner.register_buffer("e_score_correction_bias",
                                  torch.empty(buf.shape, dtype=torch.float32, device=device))
    return model


def from_pretrained(
    path: str | os.PathLike[str],
    # `object`, checked at run time: latentattn.from_pretrained forwards **overrides: object.
    dtype: object = None,
    device: object = None,
    **overrides: Any,
) -> Transformer:
    """Load a Hugging Face DeepSeek-V2/V3 checkpoint directory (config.json + safetensors).

    ``dtype`` defaults to float32; FP8 block-scaled weights (DeepSeek-V3's release) are
    dequantized. ``overrides`` are ModelConfig fields, e.g. ``mla_impl="absorb"``.
    Raises CheckpointError for a missing file or tensor, an extra tensor or a wrong shape.
    """
    root = Path(path)
    if not root.is_dir():
        raise CheckpointError(f"checkpoint directory {root} does not exist")
    config_path = root / CONFIG_NAME
    if not config_path.is_file():
        raise CheckpointError(f"{config_path} does not exist")
    try:
        raw = json.loads(config_path.read_text())
    except json.JSONDecodeError as e:
        raise ConfigError(f"{config_path}: not valid JSON ({e})") from None
    cfg = config_from_hf(raw, source=str(config_path), **overrides)
    quant = raw.get("quantization_config") or {}
    block_size = quant.get("weight_block_size") or [128, 128]
    block = (int(block_size[0]), int(block_size[1]))
    target_dtype = _resolve_dtype(dtype)
    dev = _resolve_device(device)

    from safetensors import safe_open

    files, _ = _checkpoint_files(root)
    with ExitStack() as stack:
        handles = [stack.enter_context(safe_open(str(p), framework="pt")) for p in files]
        where: dict[str, Any] = {}
        for h in handles:
            for k in h.keys():  # noqa: SIM118 (a safe_open handle is not a dict)
                where[k] = h
        model = _build_empty(cfg, target_dtype, dev)
        state = model.state_dict()
        expected = {_hf(k): k for k in state if not (k == "lm_head.weight" and cfg.tie_word_embeddings)}

        scales = {k for k in where if k.endswith("_scale_inv")}
        extra = [
            k for k in where
            if k not in expected and k not in scales and not _ignored(k, cfg)
            # DeepseekV2/V3MoE always builds shared_experts; with n_shared_experts == 0 its
            # weights are empty tensors that our MoE (shared_experts=None) has no slot for.
            and not (".shared_experts." in k and 0 in where[k].get_slice(k).get_shape())
        ]
        if extra:
            raise CheckpointError(
                f"{root}: unexpected tensor(s) not in the model: {', '.join(sorted(extra)[:5])}"
                + (f" (and {len(extra) - 5} more)" if len(extra) > 5 else "")
            )
        missing = sorted(k for k in expected if k not in where)
        if missing:
            raise CheckpointError(
                f"{root}: missing tensor(s): {', '.join(missing[:5])}"
                + (f" (and {len(missing) - 5} more)" if len(missing) > 5 else "")
            )
        for hf_name, ours in expected.items():
            found = tuple(where[hf_name].get_slice(hf_name).get_shape())
            want = tuple(state[ours].shape)
            if found != want:
                raise CheckpointError(
                    f"{root}: tensor {hf_name} has shape {list(found)}, expected {list(want)}"
                )
        with torch.no_grad():
            for hf_name, ours in expected.items():
                tensor = where[hf_name].get_tensor(hf_name)
                scale_name = hf_name + "_scale_inv"  # "x.weight" -> "x.weight_scale_inv"
                if scale_name in where:
                    tensor = dequantize_fp8(tensor, where[scale_name].get_tensor(scale_name), block)
                elif tensor.dtype in _FP8_DTYPES:
                    raise CheckpointError(f"{root}: FP8 tensor {hf_name} has no {scale_name}")
                state[ours].copy_(tensor)
                del tensor
    model.eval()
    return model


# --------------------------------------------------------------------------- saving
def _parse_size(size: int | str) -> int:
    if isinstance(size, int):
        return size
    m = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([KMG]i?B)?\s*", size, re.IGNORECASE)
    if not m:
        raise ConfigError(f"max_shard_size {size!r} is not a size like 5GB or 500MB")
    unit = (m.group(2) or "B").upper()
    mult = {"B": 1, "KB": 10**3, "MB": 10**6, "GB": 10**9, "KIB": 2**10, "MIB": 2**20,
            "GIB": 2**30}[unit]
    return int(float(m.group(1)) * mult)


def _shards(tensors: dict[str, torch.Tensor], limit: int) -> list[dict[str, torch.Tensor]]:
    """Greedy split in key order, each shard at most ``limit`` bytes (a bigger tensor alone)."""
    shards: list[dict[str, torch.Tensor]] = [{}]
    size = 0
    for k, t in tensors.items():
        n = t.numel() * t.element_size()
        if shards[-1] and size + n > limit:
            shards.append({})
            size = 0
        shards[-1][k] = t
        size += n
    return shards


def _hf_tensors(model: Transformer) -> Iterator[tuple[str, torch.Tensor]]:
    seen: set[int] = set()
    for name, t in model.state_dict().items():
        if name == "lm_head.weight" and model.config.tie_word_embeddings:
            continue  # transformers writes only model.embed_tokens.weight for tied embeddings
        t = t.detach().to("cpu").contiguous()
        ptr = t.untyped_storage().data_ptr()
        if ptr in seen:
            t = t.clone()  # safetensors refuses tensors that share memory
        seen.add(t.untyped_storage().data_ptr())
        yield _hf(name), t
    moe = model.config.moe
    if moe is not None and moe.n_shared_experts == 0:
        # DeepseekV2/V3MoE always builds shared_experts (intermediate size 0 here) and reports
        # its weights missing unless the file has them: write the empty tensors it expects.
        dim, dtype = model.config.dim, model.dtype
        for i in range(model.config.n_layers):
            if model.config.is_moe_layer(i):
                prefix = f"model.layers.{i}.mlp.shared_experts."
                yield prefix + "gate_proj.weight", torch.empty(0, dim, dtype=dtype)
                yield prefix + "up_proj.weight", torch.empty(0, dim, dtype=dtype)
                yield prefix + "down_proj.weight", torch.empty(dim, 0, dtype=dtype)


def save_pretrained(
    model: Transformer, path: str | os.PathLike[str], max_shard_size: int | str = DEFAULT_MAX_SHARD_SIZE
) -> None:
    """Write ``config.json`` and ``model.safetensors`` (or shards + index) in the Hugging Face
    DeepSeek layout, loadable by transformers and by :func:`from_pretrained`.

    Files are written under temporary names and renamed into place, config.json last; weight
    files of an earlier checkpoint in the directory are removed, as transformers does.
    """
    from safetensors.torch import save_file

    hf_config = config_to_hf(model.config)  # first: a GQA model fails before touching the disk
    hf_config["dtype"] = str(model.dtype).removeprefix("torch.")
    limit = _parse_size(max_shard_size)
    if limit <= 0:
        raise ConfigError(f"max_shard_size must be positive, got {max_shard_size!r}")
    root = Path(path)
    if root.exists() and not root.is_dir():
        raise CheckpointError(f"{root} exists and is not a directory")
    root.mkdir(parents=True, exist_ok=True)

    tensors = dict(_hf_tensors(model))
    shards = _shards(tensors, limit)
    final: dict[str, bytes | dict[str, torch.Tensor]] = {}
    if len(shards) == 1:
        final[WEIGHTS_NAME] = shards[0]
    else:
        weight_map: dict[str, str] = {}
        for i, shard in enumerate(shards, 1):
            name = f"model-{i:05d}-of-{len(shards):05d}.safetensors"
            final[name] = shard
            weight_map.update(dict.fromkeys(shard, name))
        total = sum(t.numel() * t.element_size() for t in tensors.values())
        index = {"metadata": {"total_size": total}, "weight_map": weight_map}
        final[INDEX_NAME] = json.dumps(index, indent=2, sort_keys=True).encode() + b"\n"
    final[CONFIG_NAME] = json.dumps(hf_config, indent=2, sort_keys=True).encode() + b"\n"

    temps: dict[str, Path] = {}
    try:
        for name, content in final.items():
            tmp = root / f".{name}.tmp-{os.getpid()}"
            temps[name] = tmp
            if isinstance(content, bytes):
                tmp.write_bytes(content)
            else:
                # metadata format=pt: transformers refuses safetensors files without it.
                save_file(content, str(tmp), metadata={"format": "pt"})
        for name in sorted(final, key=lambda n: n == CONFIG_NAME):  # config.json last
            os.replace(temps.pop(name), root / name)
    finally:
        for tmp in temps.values():
            tmp.unlink(missing_ok=True)
    # Stale weights of an earlier save (other shard count, or sharded vs single) would be mixed in
    # on load; transformers' save_pretrained deletes them the same way.
    stale = re.compile(r"^model(-\d{5}-of-\d{5})?\.safetensors(\.index\.json)?$")
    for p in root.iterdir():
        if stale.match(p.name) and p.name not in final:
            p.unlink()
