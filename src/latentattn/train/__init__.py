"""Training. ``loop``: the LM training loop, checkpoints and exact resume (``latentattn train``);
``dsa``: the two DeepSeek-V3.2 stages and the selection diagnostic; ``family``: the five attention
variants at matched sizes."""

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
