"""ModelConfig <-> JSON dicts (training checkpoints' state.json)."""

from __future__ import annotations

import json
import re

import pytest

from latentattn.config_io import config_from_dict, config_to_dict
from latentattn.errors import ConfigError
from latentattn.presets import PRESETS, get_preset


@pytest.mark.parametrize("name", sorted(PRESETS))
def test_round_trip_every_preset(name: str) -> None:
    cfg = get_preset(name)
    # Through JSON text, as state.json stores it: tuples, floats and None must survive.
    assert config_from_dict(json.loads(json.dumps(config_to_dict(cfg)))) == cfg


def test_missing_and_unknown_fields_are_named() -> None:
    d = config_to_dict(get_preset("tiny-dsa"))
    del d["attention"]["indexer"]["index_topk"]
    missing = re.escape("ModelConfig.attention.indexer: missing field 'index_topk'")
    with pytest.raises(ConfigError, match=missing):
        config_from_dict(d)
    d = config_to_dict(get_preset("tiny-mla-moe"))
    d["moe"]["n_experts"] = 3
    with pytest.raises(ConfigError, match=re.escape("ModelConfig.moe: unknown field 'n_experts'")):
        config_from_dict(d)
    d = config_to_dict(get_preset("tiny-gqa"))
    d["attention"]["kind"] = "mamba"
    with pytest.raises(ConfigError, match=r"attention\.kind"):
        config_from_dict(d)
    d = config_to_dict(get_preset("tiny-gqa"))
    del d["rope"]
    with pytest.raises(ConfigError, match="missing field 'rope'"):
        config_from_dict(d)
