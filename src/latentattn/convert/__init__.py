"""GQA / MHA / MQA models to MLA: in one call (:func:`convert_model`, :mod:`latentattn.convert.api`),
or step by step (:mod:`latentattn.convert.gqa_to_mla`, calibration in
:mod:`latentattn.convert.calibrate`, sequential calibration in :mod:`latentattn.convert.sequential`,
local fitting in :mod:`latentattn.convert.fit`)."""

from latentattn.convert.api import ConvertResult, convert_model
from latentattn.convert.calibrate import attention_inputs, calib_span, calibrate, choose_pairs, pair_scores
from latentattn.convert.gqa_to_mla import (
    METHODS,
    Plan,
    check_sizes,
    convert,
    full_rank,
    full_rope_dim,
    mla_config,
)
from latentattn.convert.sequential import convert_and_fit, convert_sequential

__all__ = ["METHODS", "ConvertResult", "Plan", "attention_inputs", "calib_span", "calibrate", "check_sizes",
           "choose_pairs", "convert", "convert_and_fit", "convert_model", "convert_sequential", "full_rank",
           "full_rope_dim", "mla_config", "pair_scores"]
