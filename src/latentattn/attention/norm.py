"""RMSNorm exactly as DeepSeek/Hugging Face compute it (normalise in fp32, scale in input dtype)."""

from __future__ import annotations

import torch
from torch import nn

from latentattn.precision import KeepFloat32


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float = 1e-6) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        xf = x.float()
        xf = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * xf.to(x.dtype)


class Float32RMSNorm(KeepFloat32, RMSNorm):
    """DeepSeek-V4's RMSNorm (transformers' DeepseekV4RMSNorm): an fp32 weight in any model
    (``_keep_in_fp32_modules_strict`` lists the layer norms, the final norm, ``q_a_norm`` and
    every ``kv_norm``), applied in fp32 before the result is rounded to the input's dtype. Equal
    to :class:`RMSNorm` in fp32."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        xf = x.float()
        xf = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + self.eps)
        return (self.weight * xf).to(x.dtype)
