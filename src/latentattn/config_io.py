"""ModelConfig <-> plain JSON-able dicts (training checkpoints' ``state.json``).

The dict mirrors the dataclasses field by field; the attention config carries its ``kind``
(``gqa``, ``mla`` or ``v4``) so that it reads back as the right class. Reading is strict: a missing or
unknown field raises :class:`ConfigError` naming it, so a checkpoint from another version of the
code fails loudly instead of building a different model; only the fields in ``ADDED_FIELDS``,
which configs saved before them lack, read as the value those configs had.
"""

from __future__ import annotations

import dataclasses
from typing import Any

from latentattn.config import (
    GQAConfig,
    HyperConfig,
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


def config_to_dict(cfg: ModelConfig) -> dict[str, Any]:
    """Every field of ``cfg`` (nested configs as dicts, ``None`` kept)."""
    return dataclasses.asdict(cfg)


# Fields added after configs were first saved, with the value every config saved before them
# had: a missing one of these is that value (an old train run or compare protocol still loads).
ADDED_FIELDS: dict[type, dict[str, Any]] = {
    GQAConfig: {"qkv_bias": False, "o_bias": False},
    MLAConfig: {"latent_norm": True, "qkv_bias": False, "o_bias": False},
    RopeConfig: {"scaling": None, "blocks": 1, "source_dim": 0, "pairs": ()},
    MoEConfig: {"n_hash_layers": 0, "swiglu_limit": None},
    ModelConfig: {"hyper": None},
}


def _build(cls: type, d: object, where: str, nested: dict[str, Any] | None = None) -> Any:
    if not isinstance(d, dict):
        raise ConfigError(f"{where} must be a JSON object, got {type(d).__name__}")
    d = {**ADDED_FIELDS.get(cls, {}), **d}
    fields = {f.name: f for f in dataclasses.fields(cls)}
    unknown = sorted(set(d) - set(fields))
    if unknown:
        raise ConfigError(f"{where}: unknown field {unknown[0]!r}")
    kwargs: dict[str, Any] = {}
    for name in fields:
        # Fields with defaults are required too (config_to_dict writes them all), so that a
        # changed default cannot silently alter a saved model.
        if name not in d:
            raise ConfigError(f"{where}: missing field {name!r}")
        value = d[name]
        if nested is not None and name in nested and value is not None:
            value = nested[name](value, f"{where}.{name}")
        kwargs[name] = value
    return cls(**kwargs)


def _attention(d: object, where: str) -> GQAConfig | MLAConfig | V4AttentionConfig:
    if not isinstance(d, dict):
        raise ConfigError(f"{where} must be a JSON object, got {type(d).__name__}")
    kind = d.get("kind")
    if kind == "gqa":
        return _build(GQAConfig, d, where)
    if kind == "mla":
        indexer = {"indexer": lambda v, w: _build(IndexerConfig, v, w)}
        return _build(MLAConfig, d, where, indexer)
    if kind == "v4":
        nested = {"compress_rope": _rope,
                  "layer_types": lambda v, w: tuple(v) if isinstance(v, (list, tuple)) else v}
        return _build(V4AttentionConfig, d, where, nested)
    raise ConfigError(f"{where}.kind must be 'gqa', 'mla' or 'v4', got {kind!r}")


def _rope(d: object, where: str) -> RopeConfig:
    nested = {"yarn": lambda v, w: _build(YarnConfig, v, w),
              "scaling": lambda v, w: _build(RopeScaling, v, w),
              "pairs": lambda v, w: tuple(v) if isinstance(v, (list, tuple)) else v}  # JSON: a list
    return _build(RopeConfig, d, where, nested)


def config_from_dict(d: object) -> ModelConfig:
    """The inverse of :func:`config_to_dict`; ConfigError names a missing or unknown field."""
    nested = {
        "attention": _attention,
        "rope": _rope,
        "moe": lambda v, w: _build(MoEConfig, v, w),
        "hyper": lambda v, w: _build(HyperConfig, v, w),
    }
    return _build(ModelConfig, d, "ModelConfig", nested)


__all__ = ["config_from_dict", "config_to_dict"]
