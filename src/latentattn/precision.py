"""Tensors that stay fp32 whatever dtype the model is cast to.

DeepSeek keeps a few small tensors in fp32 in bf16 models: the MoE routing bias
(transformers' ``_keep_in_fp32_modules_strict = ["e_score_correction_bias"]``) and the lightning
indexer's per-head weights (DeepSeek-V3.2 ``inference/model.py``: ``weights_proj`` in fp32). Their
sums are what top-k choices hinge on, so bf16 rounding would change which experts or keys win.

Also: ``resolve_dtype`` / ``resolve_device``, the one place user-given dtype and device names
become torch objects (or a ConfigError naming the bad value).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from latentattn.errors import ConfigError


class KeepFloat32(nn.Module):
    """Mixin: this module's own floating parameters and buffers are fp32 after any ``_apply``
    (``.to(dtype)``, ``.bfloat16()``, ``.to_empty(...)``); devices still move."""

    def _apply(self, fn: Callable[[torch.Tensor], torch.Tensor], recurse: bool = True) -> Any:
        super()._apply(fn, recurse)
        for p in self._parameters.values():
            if p is not None and p.is_floating_point() and p.dtype != torch.float32:
                p.data = p.data.float()
        for name, b in self._buffers.items():
            if b is not None and b.is_floating_point() and b.dtype != torch.float32:
                self._buffers[name] = b.float()
        return self


class Float32Linear(KeepFloat32, nn.Linear):
    """A bias-free-or-not Linear with an fp32 weight that also computes in fp32."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x.float(), self.weight, None if self.bias is None else self.bias.float())


def resolve_dtype(dtype: object) -> torch.dtype:
    """A floating torch.dtype from itself or its name (``"bfloat16"``, ``"torch.float32"``)."""
    if isinstance(dtype, torch.dtype) and dtype.is_floating_point:
        return dtype
    value = getattr(torch, dtype.removeprefix("torch."), None) if isinstance(dtype, str) else None
    if not isinstance(value, torch.dtype) or not value.is_floating_point:
        raise ConfigError(f"dtype must be a floating torch.dtype or its name, got {dtype!r}")
    return value


def resolve_device(device: object) -> torch.device:
    """A torch.device from itself or a string; None is the CPU. A CUDA device this machine does
    not have is a ConfigError here, not a RuntimeError deep in ``.to()``."""
    if device is None:
        return torch.device("cpu")
    if not isinstance(device, (str, torch.device)):
        raise ConfigError(f"device must be a torch.device or a string, got {device!r}")
    try:
        dev = torch.device(device)
    except RuntimeError:
        raise ConfigError(f"device {device!r} is not a device torch knows (cpu, cuda, cuda:1, "
                          "mps, ...)") from None
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise ConfigError(f"device {device!r}: this torch sees no CUDA GPU")
    if dev.type == "cuda" and dev.index is not None and dev.index >= torch.cuda.device_count():
        raise ConfigError(f"device {device!r}: this machine has {torch.cuda.device_count()} CUDA GPU(s)")
    return dev
