"""What converting a GQA / MHA / MQA model to MLA keeps, and what its cache then costs, from the
config alone (no weights): the sizes a conversion may take, their defaults, and the converted
cache's bytes per token. ``latentattn.convert_model`` (and so ``latentattn convert``) and
``latentattn kv-cache --kv-lora-rank`` both read their sizes and bytes from here, so the byte
report of a conversion and the row ``kv-cache`` predicts for it cannot disagree.

A source layer has G KV heads of width d (H query heads); its cache holds 2 G d values per token.
The converted layer caches, per token, a latent of R values that every head's non-rotary key
part and value are decompressed from, and one shared rotary key of D values:

    bytes per token per layer = (R + D) * bytes per value

the MLA cache of DeepSeek-V2 (arXiv 2405.04434, Table 1: (d_c + d_h^R) l elements per token for
l layers) at the converted sizes. D depends on how the rotary key is kept:

* ``blocks`` (MHA2MLA, arXiv 2502.14837 s3.1, partial RoPE): r frequency pairs of every KV head
  stay rotary, D = G * 2r, a multiple of 2G up to G d (``full``: every rotary dim, the exact
  conversion); the latent then holds G (2d - D / G) rows at most (full rank).
* ``rorope`` (TransMLA, arXiv 2502.07864 s4, RoRoPE): the G heads' rotary parts are mixed,
  frequency by frequency, into one head-wide plain RoPE key, D = d; full rank 2 G d (each key
  head's residual and each value head). DeepSeek's checkpoint format holds only this form: its
  rope key is one plain RoPE of ``qk_rope_head_dim`` (TransMLA s4.3), so ``convert --format
  deepseek`` always caches R + d.

The defaults aim at half the source's cache, the saving TransMLA and MHA2MLA report results at
(R + D = G d): D = d with RoRoPE and R = (G - 1) d. Measured on SmolLM2-135M (3 KV heads of 64)
at R = 128, D = 64 (0.50x), this repository's README: perplexity 45.4 unhealed on Vim's user
manual against the source's 17.7 (keeping 16 of every KV head's 32 pairs instead gave about 300),
and at R = 128 a PCA latent gave 27.1 where weight SVD gave 7,492.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from latentattn.config import GQAConfig, ModelConfig
from latentattn.errors import ConfigError

BF16 = 2  # bytes per cached value

RopeMode = Literal["blocks", "rorope"]
ROPE_MODES = ("blocks", "rorope")
Method = Literal["pca", "whitened", "svd"]  # the latent's factorisation (latentattn.convert.gqa_to_mla)
METHODS = ("pca", "whitened", "svd")
Format = Literal["latentattn", "deepseek"]
FORMATS = ("latentattn", "deepseek")
DEFAULT_RATIO = 0.5  # the cache the default sizes aim at, as a fraction of the source's


def source_attention(cfg: ModelConfig) -> GQAConfig:
    """``cfg``'s GQA / MHA / MQA attention, or a ConfigError: only those convert to MLA."""
    a = cfg.attention
    if not isinstance(a, GQAConfig):
        raise ConfigError(f"{cfg.name} is {a.name.upper()} already: conversion to MLA takes GQA, "
                          "MHA or MQA models")
    return a


def full_rope_dim(cfg: ModelConfig, rope_mode: RopeMode = "blocks") -> int:
    """Every rotary dim: of every KV head, G * d (can exceed one head's width), for block RoPE;
    one head's d for RoRoPE."""
    a = source_attention(cfg)
    return a.head_dim if rope_mode == "rorope" else a.n_kv_heads * a.head_dim


def full_rank(cfg: ModelConfig, rope_dim: int, rope_mode: RopeMode = "blocks") -> int:
    """The latent rank that drops nothing at ``rope_dim``: the rows of the stacked non-rotary key
    and value maps, G (2d - rope_dim / G) for block RoPE, 2 G d for RoRoPE (every key head's
    residual and every value head)."""
    a = source_attention(cfg)
    if rope_mode == "rorope":
        return 2 * a.n_kv_heads * a.head_dim
    return a.n_kv_heads * (2 * a.head_dim - rope_dim // a.n_kv_heads)


def check_sizes(cfg: ModelConfig, rope_dim: int, kv_lora_rank: int,
                rope_mode: RopeMode = "blocks") -> None:
    """A ConfigError naming the limit when ``rope_dim`` or ``kv_lora_rank`` cannot be converted to
    (the messages name the CLI flags; ``convert_model``'s keywords are the same words)."""
    a = source_attention(cfg)
    g, d = a.n_kv_heads, a.head_dim
    if rope_mode not in ROPE_MODES:
        raise ConfigError(f"rope mode must be one of {', '.join(ROPE_MODES)}, got {rope_mode!r}")
    if rope_dim % 2:
        raise ConfigError(f"--rope-dim must be even (rotary dims come in pairs), got {rope_dim}")
    if rope_mode == "rorope" and rope_dim != d:
        raise ConfigError(f"--rope-mode rorope keeps one head's every rotary dim: --rope-dim must be "
                          f"{d} (the head dim) or full, got {rope_dim}")
    if rope_mode == "blocks" and (rope_dim < 2 * g or rope_dim > g * d or rope_dim % (2 * g)):
        raise ConfigError(f"--rope-dim must be a multiple of 2 x {g} KV heads (a pair per head) "
                          f"between {2 * g} and {g} x {d} = {g * d} (full), or {d} (one head wide, RoRoPE), "
                          f"got {rope_dim}")
    top = full_rank(cfg, rope_dim, rope_mode)
    if not 1 <= kv_lora_rank <= top:
        raise ConfigError(f"--kv-lora-rank must lie in 1..{top} (full rank at --rope-dim {rope_dim}), "
                          f"got {kv_lora_rank}")


def rank_for_ratio(cfg: ModelConfig, rope_dim: int, ratio: float = DEFAULT_RATIO,
                   rope_mode: RopeMode = "rorope") -> int:
    """The latent rank R with (R + rope_dim) = ``ratio`` x the source's 2 G d cached values (at
    least 1, at most full rank). At 0.5 and rope_dim = d: (G - 1) d, e.g. 128 for SmolLM2-135M
    (3 KV heads of 64), 896 for Llama-3-8B (8 of 128). An MQA source (G = 1) leaves no latent at
    0.5x with a head-wide rope key; it gets d / 2 (0.75x)."""
    a = source_attention(cfg)
    d = a.head_dim
    rank = round(ratio * 2 * a.n_kv_heads * d) - rope_dim
    if rank < 1:
        rank = max(1, d // 2)
    return min(rank, full_rank(cfg, rope_dim, rope_mode))


def source_bytes_per_token_per_layer(cfg: ModelConfig, bytes_per_value: int = BF16) -> int:
    """The source's cache: keys and values of its G KV heads, 2 G d values."""
    a = source_attention(cfg)
    return 2 * a.n_kv_heads * a.head_dim * bytes_per_value


def converted_bytes_per_token_per_layer(kv_lora_rank: int, rope_dim: int,
                                        bytes_per_value: int = BF16) -> int:
    """The converted MLA's cache (absorbed, latentattn's and every MLA server's form): the latent
    and the shared rope key, (R + D) values (the module docstring)."""
    return (kv_lora_rank + rope_dim) * bytes_per_value


@dataclass(frozen=True)
class ConvertSizes:
    """The resolved sizes of one conversion of ``model``: latent rank, rope dims, how the rope key
    is kept and the output format, and whether each was chosen by default."""

    model: str
    kv_lora_rank: int
    rope_dim: int
    rope_mode: RopeMode
    format: Format
    source_bytes_per_token_per_layer: int
    rank_defaulted: bool = False
    rope_defaulted: bool = False

    @property
    def bytes_per_token_per_layer(self) -> int:
        """The converted cache, bf16 (:func:`converted_bytes_per_token_per_layer`)."""
        return converted_bytes_per_token_per_layer(self.kv_lora_rank, self.rope_dim)

    @property
    def ratio(self) -> float:
        """The converted cache as a fraction of the source's."""
        return self.bytes_per_token_per_layer / self.source_bytes_per_token_per_layer

    def line(self) -> str:
        """``kv-lora-rank 128, rope-dim 64: 0.50x the source's cache`` (and how the rope is kept)."""
        how = "RoRoPE, one head-wide rope key" if self.rope_mode == "rorope" else "rope blocks per KV head"
        defaults = [n for n, d in (("kv-lora-rank", self.rank_defaulted), ("rope-dim", self.rope_defaulted))
                    if d]
        said = f"; default {' and '.join(defaults)}" if defaults else ""
        return (f"kv-lora-rank {self.kv_lora_rank}, rope-dim {self.rope_dim}: {self.ratio:.2f}x the "
                f"source's cache ({how}{said})")


def _size(value: int | str | None, flag: str, full: int) -> int | None:
    if value is None:
        return None
    if isinstance(value, str):
        if value == "full":
            return full
        try:
            return int(value)
        except ValueError:
            raise ConfigError(f"{flag} must be an integer or 'full', got {value!r}") from None
    if isinstance(value, bool) or not isinstance(value, int):
        raise ConfigError(f"{flag} must be an integer or 'full', got {value!r}")
    return value


def resolve_sizes(cfg: ModelConfig, kv_lora_rank: int | str | None = None,
                  rope_dim: int | str | None = None, rope_mode: RopeMode | None = None,
                  format: Format = "latentattn") -> ConvertSizes:
    """The sizes a conversion of ``cfg`` takes, checked (:func:`check_sizes`).

    ``rope_dim``: dims, ``"full"`` or None. ``rope_mode`` None picks RoRoPE for the DeepSeek
    format and for a head-wide rope key (the default, ``rope_dim`` None or d), block RoPE for
    ``"full"`` (every rotary dim of every KV head: exact at full rank) and any other count.
    ``kv_lora_rank``: rank, ``"full"`` or None (:func:`rank_for_ratio` at 0.5x)."""
    a = source_attention(cfg)
    d = a.head_dim
    if format not in FORMATS:
        raise ConfigError(f"format must be one of {', '.join(FORMATS)}, got {format!r}")
    if rope_mode is not None and rope_mode not in ROPE_MODES:
        raise ConfigError(f"rope mode must be one of {', '.join(ROPE_MODES)}, got {rope_mode!r}")
    if format == "deepseek":
        if rope_mode not in (None, "rorope"):
            raise ConfigError("--format deepseek needs --rope-mode rorope: DeepSeek's format has one "
                              "plain RoPE key, not a block per KV head")
        if a.qkv_bias or a.o_bias:
            raise ConfigError(f"{cfg.name} has attention biases, which DeepSeek's format cannot hold; "
                              "use --format latentattn")
    mode: RopeMode
    if rope_mode is not None:
        mode = rope_mode
    elif format == "deepseek" or rope_dim is None:
        mode = "rorope"
    else:
        mode = "blocks" if rope_dim == "full" else (
            "rorope" if _size(rope_dim, "--rope-dim", d) == d else "blocks")
    dims = _size(rope_dim, "--rope-dim", full_rope_dim(cfg, mode))
    rope_defaulted = dims is None
    if dims is None:
        dims = full_rope_dim(cfg, mode)
    if dims % 2:
        raise ConfigError(f"--rope-dim must be even (rotary dims come in pairs), got {dims}")
    rank = _size(kv_lora_rank, "--kv-lora-rank", full_rank(cfg, dims, mode))
    rank_defaulted = rank is None
    if rank is None:
        check_sizes(cfg, dims, 1, mode)  # the rope dim's own message first
        rank = rank_for_ratio(cfg, dims, DEFAULT_RATIO, mode)
    check_sizes(cfg, dims, rank, mode)
    return ConvertSizes(cfg.name, rank, dims, mode, format, source_bytes_per_token_per_layer(cfg),
                        rank_defaulted, rope_defaulted)


__all__ = ["DEFAULT_RATIO", "FORMATS", "METHODS", "ROPE_MODES", "ConvertSizes", "Format", "Method",
           "RopeMode", "check_sizes", "converted_bytes_per_token_per_layer", "full_rank", "full_rope_dim",
           "rank_for_ratio", "resolve_sizes", "source_attention", "source_bytes_per_token_per_layer"]
