"""ModelConfig <-> plain JSON-able dicts (training checkpoints' ``state.json``).

The dict mirrors the dataclasses field by field; the attention config carries its ``kind``
(``gqa`` or ``mla``) so that it reads back as the right class. Reading is strict: a missing or
unknown field raises :class:`ConfigError` naming it, so a checkpoint from another version of the
code fails loudly instead of building a different model.
"""

from __future__ import annotations

import dataclasses
from typing import Any

from latentattn.config import (
    GQAConfig,
    IndexerConfig,
    MLAConfig,
    ModelConfig,
    MoEConfig,
    RopeConfig,
    YarnConfig,
)
from latentattn.errors import ConfigError


def config_to_dict(cfg: ModelConfig) -> dict[str, Any]:
    """Every field of ``cfg`` (nested configs as dicts, ``None`` kept)."""
    return dataclasses.asdict(cfg)


def _build(cls: type, d: object, where: str, nested: dict[str, Any] | None = None) -> Any:
    if not isinstance(d, dict):
        raise ConfigError(f"{where} must be a JSON object, got {type(d).__name__}")
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


def _attention(d: object, where: str) -> GQAConfig | MLAConfig:
    if not isinstance(d, dict):
        raise ConfigError(f"{where} must be a JSON object, got {type(d).__name__}")
    kind = d.get("kind")
    if kind == "gqa":
        return _build(GQAConfig, d, where)
    if kind == "mla":
        indexer = {"indexer": lambda v, w: _build(IndexerConfig, v, w)}
        return _build(MLAConfig, d, where, indexer)
    raise ConfigError(f"{where}.kind must be 'gqa' or 'mla', got {kind!r}")


def _rope(d: object, where: str) -> RopeConfig:
    yarn = {"yarn": lambda v, w: _build(YarnConfig, v, w)}
    return _build(RopeConfig, d, where, yarn)


def config_from_dict(d: object) -> ModelConfig:
    """The inverse of :func:`config_to_dict`; ConfigError names a missing or unknown field."""
    nested = {
        "attention": _attention,
        "rope": _rope,
        "moe": lambda v, w: _build(MoEConfig, v, w),
    }
    return _build(ModelConfig, d, "ModelConfig", nested)


__all__ = ["config_from_dict", "config_to_dict"]
