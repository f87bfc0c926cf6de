"""latentattn's own checkpoint: any model ``ModelConfig`` can state, for what no other format
holds (a GQA model converted to MLA: no latent norm, block RoPE, biases).

A directory with ``latentattn.json`` (the config as :func:`latentattn.config_io.config_to_dict`
writes it, and the tokenizer's EOS id), ``model.safetensors`` and, when the model has one, the
tokenizer as ``tokenizer.json``. The directory is written beside its destination and renamed
into place, so a failed save leaves no half-written checkpoint.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import torch

from latentattn.config import ModelConfig
from latentattn.config_io import config_from_dict, config_to_dict
from latentattn.errors import CheckpointError, ConfigError, LatentAttnError
from latentattn.io import new_directory
from latentattn.model.transformer import Transformer

NATIVE_CONFIG = "latentattn.json"
WEIGHTS = "model.safetensors"
FORMAT = "latentattn-model"
VERSION = 1


def save_native(model: Transformer, out: str | os.PathLike[str], tokenizer: Any = None,
                info: dict[str, Any] | None = None) -> Path:
    """Write ``model`` (and ``tokenizer``, an :class:`latentattn.tokenizer.HFTokenizer`) to
    ``out``, which must not exist or be an empty directory. ``info``: extra JSON kept in
    latentattn.json (how the model was made)."""
    from safetensors.torch import save_file

    def fill(tmp: Path) -> None:
        state = {k: v.detach().contiguous() for k, v in model.state_dict().items()
                 if not (k == "lm_head.weight" and model.config.tie_word_embeddings)}
        save_file(state, str(tmp / WEIGHTS), metadata={"format": "pt"})
        eos = save_tokenizer(tokenizer, tmp)
        meta = {"format": FORMAT, "version": VERSION, "model": config_to_dict(model.config),
                "dtype": str(model.dtype).removeprefix("torch."), "eos_token_id": eos,
                "info": info or {}}
        (tmp / NATIVE_CONFIG).write_text(json.dumps(meta, indent=1) + "\n")

    try:
        return new_directory(out, fill)
    except LatentAttnError as e:
        raise CheckpointError(str(e)) from None


def save_tokenizer(tokenizer: Any, directory: Path) -> int | None:
    """Write an :class:`latentattn.tokenizer.HFTokenizer`'s tokenizer.json into ``directory``
    (anything else: nothing); return its EOS id."""
    tok = getattr(tokenizer, "tok", None)
    if tok is None:
        return None
    tok.save(str(directory / "tokenizer.json"))
    eos: int | None = tokenizer.eos_token_id
    return eos


def read_native(path: Path) -> dict[str, Any]:
    try:
        meta = json.loads((path / NATIVE_CONFIG).read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise CheckpointError(f"{path / NATIVE_CONFIG}: not valid JSON ({e})") from None
    if not isinstance(meta, dict) or meta.get("format") != FORMAT:
        raise CheckpointError(f"{path / NATIVE_CONFIG}: not a latentattn model")
    if meta.get("version") != VERSION:
        raise CheckpointError(f"{path / NATIVE_CONFIG}: format version {meta.get('version')!r}, "
                              f"this latentattn reads {VERSION}")
    return meta


def native_config(path: Path) -> ModelConfig:
    try:
        return config_from_dict(read_native(path)["model"])
    except ConfigError as e:
        raise CheckpointError(f"{path / NATIVE_CONFIG}: {e}") from None


def load_native(path: Path, cfg: ModelConfig, dtype: torch.dtype | None,
                device: torch.device) -> Transformer:
    """The model saved in ``path`` as ``cfg`` (its own config with overrides), in ``dtype`` (the
    saved one when None)."""
    from safetensors.torch import load_file

    meta = read_native(path)
    if not (path / WEIGHTS).is_file():
        raise CheckpointError(f"{path}: {WEIGHTS} is missing")
    tensors = load_file(str(path / WEIGHTS))
    saved = getattr(torch, str(meta.get("dtype", "float32")), torch.float32)
    model = Transformer.empty(cfg, dtype or saved, device)
    if cfg.tie_word_embeddings:
        tensors["lm_head.weight"] = tensors["embed_tokens.weight"]
    try:
        model.load_state_dict(tensors)
    except RuntimeError as e:
        raise CheckpointError(f"{path}: {' '.join(str(e).split())[:300]}") from None
    return model.eval()


__all__ = ["NATIVE_CONFIG", "load_native", "native_config", "read_native", "save_native"]
