"""Finished runs on disk, so that a stopped ``compare`` continues where it stopped.

Layout of ``--out``::

    protocol.json           what the runs are: the settings, the data's sha256 and every variant's
                            config; written first; a rerun with another protocol is refused
    runs/<label>.seed<k>.json
                            one finished (variant, seed): its SeedRun and, for the variant's first
                            seed, the measurements made on that seed's model (parameters, KV
                            bytes, decode speed); each written atomically when the run ends

Re-running the same command reads the finished runs back and trains only the missing ones, so an
hour-long comparison killed at minute 50 loses one run, not fifty minutes.
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import json
from pathlib import Path
from typing import Any

import torch

from latentattn.compare.report import CompareSettings, SeedRun, VariantResult
from latentattn.compare.run import RunStore
from latentattn.compare.variants import Variant
from latentattn.config_io import config_from_dict, config_to_dict
from latentattn.errors import ConfigError, LatentAttnError
from latentattn.io import write_json
from latentattn.train.checkpoint import first_difference

PROTOCOL_FILE = "protocol.json"
RUNS_DIR = "runs"
FORMAT = "latentattn-compare"
VERSION = 1


class ProtocolMismatch(LatentAttnError):
    """``--out`` holds runs of another protocol: resuming them would mix two experiments."""


def protocol(settings: CompareSettings, variants: list[Variant], train_tokens: torch.Tensor,
             val_tokens: torch.Tensor) -> dict[str, Any]:
    """Everything that decides a run's result (not how fast it ran)."""
    data = torch.cat([train_tokens, val_tokens]).to(torch.int64).numpy().tobytes()
    # How far the LR search may extend the grid decides which pilots run, not what any run
    # gives: a search stopped at the bound continues in the same --out with a larger one.
    kept = {k: v for k, v in settings.as_dict().items() if k != "lr_extend"}
    return {"format": FORMAT, "version": VERSION, "settings": kept,
            "data_sha256": hashlib.sha256(data).hexdigest(), "split": len(train_tokens),
            "variants": {v.label: config_to_dict(v.config) for v in variants}}


# Settings added after a protocol file may have been written, with the value the runs it
# describes trained with: a run started before the field existed continues (as train's resume).
_TRAIN_FIELDS_BEFORE: dict[str, Any] = {"dsa_freeze_warmup": False}


_SETTINGS_BEFORE: dict[str, Any] = {"device": "cpu", "pilot_seeds": 1}


def _upgrade(saved: Any) -> None:
    settings = saved.get("settings") if isinstance(saved, dict) else None
    if not isinstance(settings, dict):
        return
    for name, value in _SETTINGS_BEFORE.items():
        settings.setdefault(name, value)
    variants = saved.get("variants")
    if isinstance(variants, dict):  # config fields added since (config_io.ADDED_FIELDS)
        for label, cfg in variants.items():
            # A dict this code cannot read stays as it is: the comparison below reports it.
            with contextlib.suppress(ConfigError):
                variants[label] = json.loads(json.dumps(config_to_dict(config_from_dict(cfg))))
    train = settings.get("train")
    if isinstance(train, dict):
        for name, value in _TRAIN_FIELDS_BEFORE.items():
            train.setdefault(name, value)


class DirStore(RunStore):
    """:class:`RunStore` on a directory (the module docstring has the layout)."""

    def __init__(self, out: Path, proto: dict[str, Any]) -> None:
        self.out = out
        path = out / PROTOCOL_FILE
        if path.is_file():
            try:
                saved = json.loads(path.read_text())
            except (json.JSONDecodeError, UnicodeDecodeError) as e:
                raise ProtocolMismatch(f"{path} is not valid JSON ({e}); use another --out") from None
            # Round-trip through JSON so that tuples and lists compare alike.
            wanted = json.loads(json.dumps(proto))
            _upgrade(saved)
            if saved != wanted:
                diff = (first_difference(saved, wanted) or "a field differs").replace(
                    "in the checkpoint", "there")
                raise ProtocolMismatch(
                    f"--out {out} holds results of another protocol ({diff}); rerun with the "
                    "settings it was started with, or choose another --out (its finished runs "
                    "are kept)")
        else:
            write_json(path, proto)
        (out / RUNS_DIR).mkdir(exist_ok=True)

    def _path(self, label: str, seed: int) -> Path:
        safe = "".join(c if c.isalnum() or c in "-_=,[]" else "_" for c in label)
        return self.out / RUNS_DIR / f"{safe}.seed{seed}.json"

    def has(self, label: str, seed: int) -> bool:
        """Whether (label, seed) finished, without reading it back."""
        return self._path(label, seed).is_file()

    def load(self, label: str, seed: int) -> tuple[SeedRun, VariantResult | None] | None:
        path = self._path(label, seed)
        if not path.is_file():
            return None
        try:
            d = json.loads(path.read_text())
            run = SeedRun(**{**d["run"], "val_curve": [tuple(p) for p in d["run"]["val_curve"]]})
            m = d.get("measured")
            measured = None if m is None else VariantResult(
                **{**m, "decode_tokens_per_s": {int(k): v for k, v in m["decode_tokens_per_s"].items()},
                   "runs": []})
        except (json.JSONDecodeError, UnicodeDecodeError, KeyError, TypeError) as e:
            raise ProtocolMismatch(f"{path}: not a finished run this latentattn can read ({e}); "
                                   "delete it to train that run again") from None
        return run, measured

    def save(self, label: str, seed: int, run: SeedRun, measured: VariantResult | None) -> None:
        m = None
        if measured is not None:
            m = {k: v for k, v in dataclasses.asdict(measured).items() if k != "runs"}
            m["decode_tokens_per_s"] = {str(k): v for k, v in measured.decode_tokens_per_s.items()}
        write_json(self._path(label, seed), {"run": dataclasses.asdict(run), "measured": m})


__all__ = ["PROTOCOL_FILE", "RUNS_DIR", "DirStore", "ProtocolMismatch", "protocol"]
