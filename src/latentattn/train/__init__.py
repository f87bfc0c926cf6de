"""Training. ``loop``: the LM training loop (``latentattn train``); ``settings``: TrainSettings and
the LR schedules; ``checkpoint``: the checkpoint files; ``resume``: what makes a resume exact;
``distributed``: torchrun (DDP / FSDP2); ``balance``: MoE router balancing; ``dsa``: the two
DeepSeek-V3.2 stages and the selection diagnostic; ``family``: the five attention variants at
matched sizes."""

from latentattn.train.dsa import (
    attention_mass_recall,
    dsa_layers,
    indexer_loss,
    selection_recall,
    set_dsa_stage,
)
from latentattn.train.loop import TrainResult, TrainSettings, evaluate, lm_loss, train

__all__ = [
    "TrainResult",
    "TrainSettings",
    "attention_mass_recall",
    "dsa_layers",
    "evaluate",
    "indexer_loss",
    "lm_loss",
    "selection_recall",
    "set_dsa_stage",
    "train",
]
