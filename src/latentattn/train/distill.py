"""Healing a converted model: knowledge distillation from the model it was converted from, and
training only some of its weights.

A conversion (:mod:`latentattn.convert`) changes only the attention; the source model is then
the best available target for what the converted one should predict. ``distill_weight`` w mixes
the KL divergence to the teacher's next-token distribution with the LM loss,
``(1 - w) CE + w KL(p_teacher || p_student)`` (Hinton et al. 2015 at temperature 1; X-EcoMLA,
arXiv 2503.11132, heals its MLA conversions by distillation from the original model). On a
fine-tuning text unlike the evaluation text, the KL term keeps the student near the teacher's
general behaviour instead of pulling it towards the fine-tuning text, as plain LM loss does.

``trainable="attention"`` trains only the attention weights (the converted part; MHA2MLA,
arXiv 2502.14837 s4, finds fine-tuning them alone recovers most of the loss): no gradient is
computed for the embeddings, the MLPs and the norms, nor optimizer state kept for them.
"""

from __future__ import annotations

from typing import Literal

import torch
import torch.nn.functional as F

from latentattn.errors import ConfigError
from latentattn.model.transformer import Transformer
from latentattn.train.settings import TRAINABLE

Trainable = Literal["all", "attention"]


def kl_to_teacher(student_logits: torch.Tensor, teacher_logits: torch.Tensor) -> torch.Tensor:
    """Mean over tokens of KL(p_teacher || p_student), nats: logits (B, T, V), computed in fp32."""
    s = F.log_softmax(student_logits.flatten(0, 1).float(), dim=-1)
    t = F.log_softmax(teacher_logits.flatten(0, 1).float(), dim=-1)
    return F.kl_div(s, t, log_target=True, reduction="batchmean")


def check_teacher(student: Transformer, teacher: Transformer) -> None:
    """Raise unless ``teacher`` predicts over the student's vocabulary and sees its windows."""
    if teacher.config.vocab_size != student.config.vocab_size:
        raise ConfigError(f"the teacher's vocabulary ({teacher.config.vocab_size:,} tokens) is not "
                          f"the student's ({student.config.vocab_size:,}): distillation compares "
                          "their next-token distributions, so they must share a tokenizer")


def set_trainable(model: Transformer, trainable: Trainable | str) -> int:
    """Freeze every parameter outside ``trainable`` ("all": none frozen; "attention": all but
    the blocks' ``self_attn``); return how many parameters stay trainable."""
    if trainable not in TRAINABLE:
        raise ConfigError(f"trainable must be one of {', '.join(TRAINABLE)}, got {trainable!r}")
    n = 0
    for name, p in model.named_parameters():
        keep = trainable == "all" or ".self_attn." in name
        p.requires_grad_(keep)
        n += p.numel() if keep else 0
    return n


__all__ = ["TRAINABLE", "Trainable", "check_teacher", "kl_to_teacher", "set_trainable"]
