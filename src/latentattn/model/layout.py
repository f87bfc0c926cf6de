"""Weights laid out for one-token decode on a CPU.

A decode step is a chain of matrix-vector products, so it runs at the speed each GEMV streams its
weight from memory. ``nn.Linear`` keeps W (out, in) row-major and computes x W^T; on the CPUs
measured here (oneDNN/MKL through torch 2.13) that product streams fp32 weights about half as fast
as the same product over W^T stored contiguously, x (W^T): for SmolLM2's 49,152 x 576 LM head,
11 GB/s against 25 GB/s on a 2-core AMD EPYC (``latentattn bench generate`` measures the whole
model). :func:`decode_layout` stores each fp32 Linear weight input-major (a column-major W, the
same values and shape), which F.linear then multiplies as x (W^T) with no copy; prefill's GEMMs
run at the same speed either way. A tied LM head gets its own input-major copy, because the
embedding lookup reads rows of the same matrix and would copy it whole if it were column-major.

It is an inference layout: the values and names do not change, but the weights are no longer
contiguous and a tied head is untied, so save a model before, not after, calling it.
"""

from __future__ import annotations

import torch
from torch import nn

from latentattn.model.transformer import Transformer

__all__ = ["decode_layout", "input_major"]


def input_major(weight: torch.Tensor) -> bool:
    """Whether a 2-D weight (out, in) is stored with its input axis outermost (W^T contiguous)."""
    return weight.dim() == 2 and weight.t().is_contiguous()


def decode_layout(model: Transformer) -> Transformer:
    """Lay out ``model``'s fp32 CPU Linear weights input-major (module docstring); returns the
    model. Other dtypes and devices are left as they are: bf16 GEMVs measured no faster so
    (oneDNN packs them itself), and GPU GEMMs do not care."""
    if model.config.tie_word_embeddings and model.lm_head.weight is model.embed_tokens.weight:
        model.lm_head.weight = nn.Parameter(model.embed_tokens.weight.detach().clone(),
                                            requires_grad=False)
    for module in model.modules():
        if not isinstance(module, nn.Linear):
            continue
        w = module.weight
        if w.dtype != torch.float32 or w.device.type != "cpu" or input_major(w):
            continue
        module.weight = nn.Parameter(w.detach().t().contiguous().t(), requires_grad=w.requires_grad)
    return model
