"""Rotary position embedding with both pair layouts and YaRN, as Hugging Face's DeepSeek models.

Frequencies: ``_compute_yarn_parameters`` in transformers' ``modeling_rope_utils.py``; YaRN paper
arXiv 2309.00071. MLA's softmax scale under YaRN is ``yarn_softmax_scale`` (transformers'
``yarn_apply_mscale``), separate from the cos/sin ``attention_factor``.
"""

from __future__ import annotations

import dataclasses
import math

import torch
from torch import nn

from latentattn.config import RopeConfig, RopeScaling, YarnConfig


def yarn_get_mscale(scale: float, mscale: float = 1.0) -> float:
    """YaRN's attention temperature m = 0.1 * mscale * ln(scale) + 1 (1 when not extending)."""
    if scale <= 1:
        return 1.0
    return 0.1 * mscale * math.log(scale) + 1.0


def yarn_attention_factor(yarn: YarnConfig) -> float:
    """The factor transformers multiplies cos and sin by (1.0 for DeepSeek, whose mscales match)."""
    if yarn.mscale and yarn.mscale_all_dim:
        return yarn_get_mscale(yarn.factor, yarn.mscale) / yarn_get_mscale(
            yarn.factor, yarn.mscale_all_dim
        )
    return yarn_get_mscale(yarn.factor)


def softmax_scale(qk_head_dim: int, rope: RopeConfig) -> float:
    """d_qk^-0.5, times m^2 when YaRN sets ``mscale_all_dim`` (V3: 0.1352, V2: 0.1147)."""
    scale = qk_head_dim**-0.5
    if rope.yarn is not None and rope.yarn.mscale_all_dim:
        m = yarn_get_mscale(rope.yarn.factor, rope.yarn.mscale_all_dim)
        scale *= m * m
    return scale


def scaled_frequencies(inv_freq: torch.Tensor, scaling: RopeScaling) -> torch.Tensor:
    """Linear or Llama-3.1 interpolation of ``inv_freq`` (see :class:`RopeScaling`; transformers'
    ``_compute_linear_scaling_rope_parameters`` and ``_compute_llama3_parameters``)."""
    if scaling.type == "linear":
        return inv_freq / scaling.factor
    old = scaling.original_max_position_embeddings
    low_wavelen, high_wavelen = old / scaling.low_freq_factor, old / scaling.high_freq_factor
    wavelen = 2 * math.pi / inv_freq
    out = torch.where(wavelen > low_wavelen, inv_freq / scaling.factor, inv_freq)
    smooth = (old / wavelen - scaling.low_freq_factor) / (scaling.high_freq_factor - scaling.low_freq_factor)
    smoothed = (1 - smooth) * out / scaling.factor + smooth * out
    medium = (wavelen >= high_wavelen) & (wavelen <= low_wavelen)
    return torch.where(medium, smoothed, out)


def inv_frequencies(dim: int, rope: RopeConfig) -> torch.Tensor:
    """(dim/2,) fp32 inverse frequencies, YaRN-blended when ``rope.yarn`` is set, linear- or
    Llama-3-scaled when ``rope.scaling`` is; with ``rope.pairs``, those pairs of the
    ``rope.source_dim``-dim RoPE (computed, scaling included, at that dim, then picked)."""
    if rope.pairs:
        if 2 * len(rope.pairs) != dim:
            raise ValueError(f"{len(rope.pairs)} RoPE pairs for {dim} rotary dims")
        plain = dataclasses.replace(rope, source_dim=0, pairs=())
        return inv_frequencies(rope.source_dim, plain)[list(rope.pairs)]
    base = rope.theta ** (torch.arange(0, dim, 2, dtype=torch.float32) / dim)
    extrapolation = 1.0 / base
    if rope.scaling is not None:
        return scaled_frequencies(extrapolation, rope.scaling)
    if rope.yarn is None:
        return extrapolation
    y = rope.yarn
    interpolation = 1.0 / (y.factor * base)

    def correction_dim(rotations: float) -> float:
        # The dim index whose wavelength fits `rotations` turns into the original context.
        return dim * math.log(y.original_max_position_embeddings / (rotations * 2 * math.pi)) / (
            2 * math.log(rope.theta)
        )

    low = max(math.floor(correction_dim(y.beta_fast)), 0)
    high: float = min(math.ceil(correction_dim(y.beta_slow)), dim - 1)
    if low == high:
        high += 0.001  # transformers' guard against a zero-width ramp
    ramp = ((torch.arange(dim // 2, dtype=torch.float32) - low) / (high - low)).clamp(0, 1)
    # ramp 0: high-frequency dims keep their frequency; ramp 1: low-frequency dims interpolate.
    return interpolation * ramp + extrapolation * (1 - ramp)


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, interleaved: bool) -> torch.Tensor:
    """Rotate x (B, T, H, D) by cos/sin (B, T, D/2), in fp32, returning x's dtype.

    A last dim that is a multiple of D is rotated block by block (block RoPE).
    interleaved: pairs (x[2i], x[2i+1]) stay in place (DeepSeek MLA). Transformers 5.x writes the
    same rotation with evens-then-odds output; dot products agree, the stored layout does not.
    half-split: pairs (x[i], x[i + D/2]) (Llama/NeoX, and DSA's indexer).
    """
    if x.shape[-1] != 2 * cos.shape[-1]:
        # Block RoPE (RopeConfig.blocks): each block of 2 * D/2 dims is its own RoPE.
        *lead, h, d = x.shape
        blocks = x.reshape(*lead, h * (d // (2 * cos.shape[-1])), 2 * cos.shape[-1])
        return apply_rope(blocks, cos, sin, interleaved).reshape(x.shape)
    c, s = cos.unsqueeze(2), sin.unsqueeze(2)  # (B, T, 1, D/2)
    xf = x.float()
    if interleaved:
        x1, x2 = xf[..., 0::2], xf[..., 1::2]
        out = torch.stack((x1 * c - x2 * s, x2 * c + x1 * s), dim=-1).flatten(-2)
    else:
        x1, x2 = xf.chunk(2, dim=-1)
        out = torch.cat((x1 * c - x2 * s, x2 * c + x1 * s), dim=-1)
    return out.type_as(x)


class RotaryEmbedding(nn.Module):
    """Precomputed fp32 cos/sin tables of shape (max_seq_len, dim/2), gathered by position."""

    cos: torch.Tensor
    sin: torch.Tensor

    def __init__(self, dim: int, rope: RopeConfig, max_seq_len: int) -> None:
        super().__init__()
        self.dim = dim
        self.interleaved = rope.interleaved
        factor = yarn_attention_factor(rope.yarn) if rope.yarn is not None else 1.0
        t = torch.arange(max_seq_len, dtype=torch.float32)
        freqs = torch.outer(t, inv_frequencies(dim, rope))
        # Not persistent: a function of the config, never part of a checkpoint.
        self.register_buffer("cos", freqs.cos() * factor, persistent=False)
        self.register_buffer("sin", freqs.sin() * factor, persistent=False)

    def forward(self, positions: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """positions (B, T) -> cos, sin, each (B, T, dim/2) fp32."""
        return self.cos[positions], self.sin[positions]
