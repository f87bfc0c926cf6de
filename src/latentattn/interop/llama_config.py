"""Hugging Face Llama-family config.json (``llama``, ``qwen2``, ``mistral``; SmolLM is ``llama``)
-> a :class:`ModelConfig` with GQA attention.

The rules mirror transformers 5.x ``configuration_llama.py`` / ``configuration_qwen2.py`` /
``configuration_mistral.py`` and their ``modeling_*.py``:

* attention: ``num_key_value_heads`` KV heads (default: ``num_attention_heads``), ``head_dim``
  (default ``hidden_size // num_attention_heads``); Llama's ``attention_bias`` puts a bias on
  q, k, v and o; Qwen2Attention always has q/k/v biases and none on o; Mistral has none.
* RoPE: half-split pairs (``rotate_half``) over the whole head, types default, linear, llama3
  and yarn (:func:`latentattn.interop.hf_config._rope_from_hf`).
* ``rms_norm_eps``, ``tie_word_embeddings`` and a SwiGLU MLP (``hidden_act`` silu, no
  ``mlp_bias``).
* Sliding-window attention (Mistral's ``sliding_window``, Qwen2's ``use_sliding_window``) is not
  implemented; attention over at most the window is the same thing, so ``max_seq_len`` is capped
  at the window and the model is exact within it.
"""

from __future__ import annotations

from typing import Any

from latentattn.config import GQAConfig, ModelConfig
from latentattn.errors import ConfigError
from latentattn.interop.hf_config import LLAMA_MODEL_TYPES, _build, _Fields, _rope_from_hf

# transformers' defaults for fields a config.json may omit that do not change tensor shapes.
_DEFAULTS = {
    "llama": {"rms_norm_eps": 1e-6, "tie_word_embeddings": False, "max_position_embeddings": 2048},
    "qwen2": {"rms_norm_eps": 1e-6, "tie_word_embeddings": False, "max_position_embeddings": 32768},
    "mistral": {"rms_norm_eps": 1e-6, "tie_word_embeddings": False,
                "max_position_embeddings": 4096 * 32},
}


def _window(f: _Fields, model_type: str) -> int | None:
    if model_type == "mistral":
        return f.get("sliding_window", int, default=None, nullable=True)
    if model_type == "qwen2" and f.get("use_sliding_window", bool, default=False):
        return f.get("sliding_window", int, default=None, nullable=True)
    return None


def llama_config_from_hf(d: dict[str, Any], *, source: str, **overrides: Any) -> ModelConfig:
    """Map a Llama / Qwen2 / Mistral config.json dict onto a GQA :class:`ModelConfig`.

    ``overrides`` go to :meth:`ModelConfig.replace`; ``source`` names the file in errors."""
    f = _Fields(d, source)
    model_type = f.get("model_type", str)
    if model_type not in LLAMA_MODEL_TYPES:
        raise ConfigError(f"{source}: model_type {model_type!r} is not a Llama-family model "
                          f"({', '.join(LLAMA_MODEL_TYPES)})")
    defaults = _DEFAULTS[model_type]
    act = f.get("hidden_act", str, default="silu")
    if act != "silu":
        raise ConfigError(f"{source}: hidden_act {act!r} is not supported (only silu)")
    if f.get("mlp_bias", bool, default=False):
        raise ConfigError(f"{source}: mlp_bias=true is not supported")
    if d.get("quantization_config") is not None:
        raise ConfigError(f"{source}: quantized checkpoints (quantization_config) are not supported; "
                          "load a GGUF file or dequantized safetensors")
    dim = f.get("hidden_size", int)
    n_heads = f.get("num_attention_heads", int)
    head_dim = f.get("head_dim", int, default=None, nullable=True)
    if head_dim is None:
        if dim % n_heads:
            raise ConfigError(f"{source}: hidden_size ({dim}) is not a multiple of "
                              f"num_attention_heads ({n_heads}) and head_dim is not given")
        head_dim = dim // n_heads
    bias = f.get("attention_bias", bool, default=False)
    attention = _build(
        source, GQAConfig, n_heads=n_heads,
        n_kv_heads=f.get("num_key_value_heads", int, default=n_heads, nullable=True) or n_heads,
        head_dim=head_dim,
        qkv_bias=True if model_type == "qwen2" else bias and model_type == "llama",
        o_bias=bias and model_type == "llama",
    )
    max_pos = f.get("max_position_embeddings", int, default=defaults["max_position_embeddings"])
    window = _window(f, model_type)
    d_rope = {**d, "max_position_embeddings": max_pos}
    cfg = _build(
        source, ModelConfig,
        name=str(d.get("_name_or_path") or model_type),
        vocab_size=f.get("vocab_size", int),
        dim=dim,
        n_layers=f.get("num_hidden_layers", int),
        attention=attention,
        intermediate_size=f.get("intermediate_size", int),
        rope=_rope_from_hf(_Fields(d_rope, source), model_type, interleaved=False),
        norm_eps=float(f.get("rms_norm_eps", (int, float), default=defaults["rms_norm_eps"])),
        max_seq_len=max_pos if window is None else min(max_pos, window),
        tie_word_embeddings=f.get("tie_word_embeddings", bool,
                                  default=defaults["tie_word_embeddings"]),
    )
    return cfg.replace(**overrides) if overrides else cfg


__all__ = ["LLAMA_MODEL_TYPES", "llama_config_from_hf"]
