"""DeepSeek-V4's quantised checkpoints: what ``quantization_config`` declares, and dequantisation.

:func:`v4_quantization` reads ``quantization_config``: transformers' ``FineGrainedFP8Config``
(``utils/quantization_config.py``) with ``scale_fmt`` and ``expert_dtype``, the form DeepSeek's V4
release uses. The dequantisers undo it as transformers 5.25's ``Fp8Dequantize`` does: block-scaled
FP8 (e4m3) weights through ``hf.dequantize_fp8``, and FP4 (e2m1) routed experts packed two a byte
with one ue8m0 scale per 32 values (:func:`dequantize_fp4`; the layout of DeepSeek-V4's inference
code and transformers' ``FP8Experts``). :mod:`latentattn.interop.hf_v4` applies them on load.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Literal

import torch

from latentattn.errors import CheckpointError, ConfigError
from latentattn.interop.hf_config import CONFIG_NAME, _Fields


# --------------------------------------------------------------------------- quantization_config
@dataclass(frozen=True)
class V4Quant:
    """How a quantised V4 checkpoint stores its weights (``quantization_config``).

    Linear weights are FP8 (e4m3) with one scale per ``block`` (rows, cols) tile; ``scale_fmt``
    "float" stores fp32 scales (V3's ``weight_scale_inv``), "ue8m0" power-of-two exponents
    (``float8_e8m0fnu``). Routed experts are FP8 the same way or, with ``expert_dtype`` "fp4",
    e2m1 values packed two per byte with one ue8m0 scale per 32 values along a row.
    """

    block: tuple[int, int]
    scale_fmt: Literal["float", "ue8m0"]
    expert_dtype: Literal["fp8", "fp4"]


def v4_quantization(d: dict[str, Any], source: str = CONFIG_NAME) -> V4Quant | None:
    """The checkpoint's quantisation, None for a plain (bf16/fp32) one; ConfigError for a
    format latentattn cannot dequantise, naming it."""
    quant = d.get("quantization_config")
    # DeepSeek's V4 config.json has `expert_dtype` at the top level; DeepseekV4Config.__post_init__
    # moves it into quantization_config ("V4.1 ships expert_dtype in the quantization config").
    top_expert = d.get("expert_dtype")
    if quant is None:
        if top_expert not in (None, "fp8", "bf16", "bfloat16"):
            raise ConfigError(f"{source}: field 'expert_dtype' is {top_expert!r} but there is no "
                              "quantization_config saying how the other weights are stored")
        return None
    if not isinstance(quant, dict):
        raise ConfigError(f"{source}: field 'quantization_config' must be an object, got {quant!r}")
    method = quant.get("quant_method")
    if method != "fp8":
        raise ConfigError(
            f"{source}: quantization_config quant_method {method!r} is not supported for deepseek_v4 "
            "(only fp8: block-scaled FP8 weights with FP8 or FP4 experts, dequantised on load)")
    q = _Fields(quant, f"{source} quantization_config")
    fmt = q.get("fmt", str, default="e4m3")
    if fmt != "e4m3":
        raise ConfigError(f"{source}: quantization_config fmt {fmt!r} is not supported (only e4m3)")
    scheme = q.get("activation_scheme", str, default="dynamic")
    if scheme != "dynamic":
        raise ConfigError(f"{source}: quantization_config activation_scheme {scheme!r} is not "
                          "supported (only dynamic: no activation scales in the checkpoint)")
    scale_fmt = q.get("scale_fmt", str, default="float")
    if scale_fmt not in ("float", "ue8m0"):
        raise ConfigError(f"{source}: quantization_config scale_fmt {scale_fmt!r} is not supported "
                          "(float or ue8m0)")
    expert = quant.get("expert_dtype", top_expert) or "fp8"
    if expert not in ("fp8", "fp4"):
        raise ConfigError(f"{source}: quantization_config expert_dtype {expert!r} is not supported "
                          "(fp8 or fp4)")
    size = quant.get("weight_block_size") or [128, 128]
    if (not isinstance(size, list) or len(size) != 2
            or not all(isinstance(v, int) and not isinstance(v, bool) and v > 0 for v in size)):
        raise ConfigError(f"{source}: quantization_config weight_block_size must be two positive "
                          f"integers, got {size!r}")
    return V4Quant((size[0], size[1]), scale_fmt, "fp4" if expert == "fp4" else "fp8")


# --------------------------------------------------------------------------- dequantisation
# e2m1 (FP4): sign, 2 exponent bits, 1 mantissa bit; code -> value (OCP MX spec; the same table
# as transformers' Fp8Dequantize._FP4_E2M1_LUT).
_E2M1 = (0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0, -0.0, -0.5, -1.0, -1.5, -2.0, -3.0, -4.0, -6.0)
FP4_BLOCK = 32  # values per scale along a row: DeepSeek-V4's fp4_block_size (transformers' sf_gran_k)
_FP8 = tuple(getattr(torch, n) for n in ("float8_e4m3fn", "float8_e4m3fnuz") if hasattr(torch, n))
# Every 8-bit float: none is a weight that loads without its scale.
_FP8_ANY = _FP8 + tuple(getattr(torch, n) for n in ("float8_e5m2", "float8_e5m2fnuz") if hasattr(torch, n))
_PACKED = (torch.int8, torch.uint8,
           *(getattr(torch, n) for n in ("float4_e2m1fn_x2",) if hasattr(torch, n)))


def scale_to_float(scale: torch.Tensor) -> torch.Tensor:
    """Block scales as fp32 multipliers: fp32 ones as they are, ue8m0 ones (``float8_e8m0fnu``:
    2 ** (byte - 127)) converted, and raw ue8m0 bytes stored as uint8 read the same way
    (transformers' Fp8Dequantize: "MXFP8 checkpoints ship E8M0 exponents stored as uint8")."""
    if scale.dtype == torch.uint8:
        return torch.exp2(scale.float() - 127.0)
    return scale.float()


def dequantize_fp4(packed: torch.Tensor, scale: torch.Tensor, block: int = FP4_BLOCK) -> torch.Tensor:
    """Packed FP4 -> fp32: ``packed`` (..., rows, cols / 2) holds two e2m1 codes per byte, the
    low nibble first (element 2j, then 2j + 1); ``scale`` (..., rows, cols / block) one multiplier
    per ``block`` values of a row. The layout of DeepSeek-V4's expert weights: its inference code
    (``Linear`` with ``float4_e2m1fn_x2`` weights and ``float8_e8m0fnu`` scales, "1 scale per 32 fp4
    elements along K") and transformers' ``FP8Experts`` with ``expert_dtype="fp4"``."""
    codes = packed.contiguous().view(torch.uint8)
    cols = 2 * codes.shape[-1]
    if scale.shape != (*codes.shape[:-1], cols // block) or cols % block:
        raise CheckpointError(
            f"FP4 scale shape {tuple(scale.shape)} does not match packed weight "
            f"{tuple(packed.shape)} ({cols} values a row, one scale per {block})")
    lut = torch.tensor(_E2M1, dtype=torch.float32, device=packed.device)
    values = lut[torch.stack((codes & 0xF, codes >> 4), dim=-1).flatten(-2).long()]
    return values * scale_to_float(scale).repeat_interleave(block, dim=-1)


def _dequantize(name: str, t: torch.Tensor, scale: torch.Tensor, quant: V4Quant | None) -> torch.Tensor:
    from latentattn.interop.hf import dequantize_fp8

    if t.dtype in _FP8:
        block = quant.block if quant is not None else (128, 128)
        s = scale_to_float(scale)
        if t.dim() == 2:
            return dequantize_fp8(t, s, block)
        if t.dim() == 3 and s.dim() == 3 and len(s) == len(t):  # fused experts: one by one
            return torch.stack([dequantize_fp8(w, si, block) for w, si in zip(t, s, strict=True)])
        raise CheckpointError(f"FP8 tensor {name} {tuple(t.shape)} and its scale {tuple(s.shape)}: "
                              "expected 2-D (or 3-D experts) with matching blocks")
    if t.dtype in _PACKED:
        if quant is None or quant.expert_dtype != "fp4":
            raise CheckpointError(
                f"tensor {name} is {str(t.dtype).removeprefix('torch.')} with a scale, packed FP4, "
                "but config.json does not declare FP4 experts (quantization_config expert_dtype fp4)")
        return dequantize_fp4(t, scale)
    raise CheckpointError(f"tensor {name} has a scale but is {str(t.dtype).removeprefix('torch.')}, "
                          "neither FP8 (e4m3) nor packed FP4")


def _logical_shape(shape: tuple[int, ...], dtype: str, slot: torch.Tensor) -> tuple[int, ...]:
    """A stored tensor's shape as the model sees it: packed FP4 in int8/uint8 holds two values per
    byte (safetensors' own F4 header already counts values, not bytes)."""
    if slot.is_floating_point() and dtype in ("I8", "U8") and shape:
        return (*shape[:-1], 2 * shape[-1])
    return shape


__all__ = ["FP4_BLOCK", "V4Quant", "dequantize_fp4", "scale_to_float", "v4_quantization"]
