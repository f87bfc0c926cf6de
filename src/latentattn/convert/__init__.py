"""GQA / MHA / MQA models to MLA: in one call (:func:`convert_model`, :mod:`latentattn.convert.api`),
or step by step (:mod:`latentattn.convert.gqa_to_mla`, calibration in
:mod:`latentattn.convert.calibrate`)."""

from latentattn.convert.api import ConvertResult, convert_model
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

__all__ = ["METHODS", "ConvertResult", "Plan", "attention_inputs", "calibrate", "check_sizes", "choose_pairs",
           "convert", "convert_model", "full_rank", "full_rope_dim", "mla_config", "pair_scores"]
