"""GQA / MHA / MQA models to MLA (:mod:`latentattn.convert.gqa_to_mla`), with calibration
(:mod:`latentattn.convert.calibrate`)."""

from latentattn.convert.calibrate import attention_inputs, calibrate, choose_pairs, pair_scores
from latentattn.convert.gqa_to_mla import (
    METHODS,
    Plan,
    check_sizes,
    convert,
    full_rank,
    full_rope_dim,
    mla_config,
)

__all__ = ["METHODS", "Plan", "attention_inputs", "calibrate", "check_sizes", "choose_pairs", "convert",
           "full_rank", "full_rope_dim", "mla_config", "pair_scores"]
