"""Training helpers. ``dsa``: the two DeepSeek-V3.2 stages and the selection diagnostic."""

from latentattn.train.dsa import (
    attention_mass_recall,
    dsa_layers,
    indexer_loss,
    selection_recall,
    set_dsa_stage,
)

__all__ = ["attention_mass_recall", "dsa_layers", "indexer_loss", "selection_recall", "set_dsa_stage"]
