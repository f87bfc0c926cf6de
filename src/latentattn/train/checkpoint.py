"""Training checkpoints: ``state.json`` plus step-named safetensors files, written atomically.

Layout of a checkpoint directory::

    state.json                        written last, atomically: it names the two files below
                                      and is what makes a checkpoint exist
    model-<step>.safetensors          the model's state_dict (our names, the model's dtype)
    optimizer-<step>.safetensors      AdamW state, one tensor per "<param name>::<exp_avg|
                                      exp_avg_sq|step>"

``state.json``: ``format``/``version``, ``step``, ``settings`` (TrainSettings as a dict, with
``dsa_warmup_steps`` resolved), ``model`` (:func:`latentattn.config_io.config_to_dict`),
``train_losses``, ``val_losses``, ``data_generator`` (base64 of the generator's state bytes),
``data_sha256`` (of the training tokens), ``files`` (the two names) and ``sha256`` (of each).
The safetensors names carry the step, so the previous checkpoint's files are only deleted after
the new ``state.json`` is in place: a failure at any point leaves the previous checkpoint whole.
"""

from __future__ import annotations

import hashlib
import json
import os
import tempfile
from pathlib import Path
from typing import Any

import torch

from latentattn.errors import CheckpointError, LatentAttnError
from latentattn.io import atomic_write

FORMAT = "latentattn-train"
VERSION = 1
STATE_FILE = "state.json"


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with path.open("rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def tokens_sha256(tokens: torch.Tensor) -> str:
    return hashlib.sha256(tokens.detach().cpu().to(torch.int64).contiguous().numpy().tobytes()).hexdigest()


def save_checkpoint(out_dir: Path, model_t: dict[str, torch.Tensor], opt_t: dict[str, torch.Tensor],
                    state: dict[str, Any]) -> None:
    """Write one checkpoint (model, optimizer, then state.json naming them); delete the previous
    one's files only once the new state.json is in place."""
    from safetensors.torch import save_file

    step = int(state["step"])
    files = {"model": f"model-{step:07d}.safetensors", "optimizer": f"optimizer-{step:07d}.safetensors"}
    atomic_write(out_dir / files["model"], lambda tmp: save_file(model_t, tmp, metadata={"format": "pt"}))
    atomic_write(out_dir / files["optimizer"], lambda tmp: save_file(opt_t, tmp, metadata={"format": "pt"}))
    state = {**state, "files": files,
             "sha256": {name: _sha256(out_dir / name) for name in files.values()}}
    text = json.dumps(state, indent=1) + "\n"
    atomic_write(out_dir / STATE_FILE, lambda tmp: Path(tmp).write_text(text))
    for old in (*out_dir.glob("model-*.safetensors"), *out_dir.glob("optimizer-*.safetensors")):
        if old.name not in files.values():
            old.unlink(missing_ok=True)


def read_state(out_dir: str | Path) -> dict[str, Any]:
    """The checkpoint's state.json, checked for format; CheckpointError if absent or unreadable."""
    path = Path(out_dir) / STATE_FILE
    if not path.is_file():
        raise CheckpointError(f"no checkpoint in {out_dir} ({STATE_FILE} is missing)")
    try:
        state = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise CheckpointError(f"corrupt checkpoint {path}: not valid JSON ({e})") from None
    if not isinstance(state, dict) or state.get("format") != FORMAT:
        raise CheckpointError(f"corrupt checkpoint {path}: not a latentattn training state")
    if state.get("version") != VERSION:
        raise CheckpointError(f"{path}: checkpoint format version {state.get('version')!r}, "
                              f"this latentattn reads version {VERSION}")
    for key in ("step", "settings", "model", "train_losses", "val_losses", "data_generator",
                "files", "sha256"):
        if key not in state:
            raise CheckpointError(f"corrupt checkpoint {path}: no {key!r}")
    files, sums = state["files"], state["sha256"]
    if not (isinstance(files, dict) and isinstance(sums, dict) and isinstance(state["step"], int)
            and all(isinstance(files.get(k), str) for k in ("model", "optimizer"))):
        raise CheckpointError(f"corrupt checkpoint {path}: malformed step, files or sha256")
    return state


def load_checkpoint_tensors(out_dir: str | Path, state: dict[str, Any],
                            which: str) -> dict[str, torch.Tensor]:
    """One of the checkpoint's safetensors files (``model`` or ``optimizer``), hash-checked."""
    from safetensors.torch import load_file

    name = state["files"][which]
    path = Path(out_dir) / name
    if not path.is_file():
        raise CheckpointError(f"corrupt checkpoint {out_dir}: {name} is missing")
    if _sha256(path) != state["sha256"].get(name):
        raise CheckpointError(f"corrupt checkpoint {out_dir}: {name} does not match its sha256")
    try:
        return load_file(str(path))
    except Exception as e:  # safetensors raises its own SafetensorError
        raise CheckpointError(f"corrupt checkpoint {out_dir}: {name} ({e})") from None


def first_difference(a: Any, b: Any, prefix: str = "") -> str | None:
    if isinstance(a, dict) and isinstance(b, dict):
        # "kind" first: GQA vs MLA differ in every field, the kind says it best.
        for k in sorted(set(a) | set(b), key=lambda k: (k != "kind", k)):
            diff = first_difference(a.get(k), b.get(k), f"{prefix}{k}.")
            if diff is not None:
                return diff
        return None
    return None if a == b else f"{prefix[:-1]} is {a!r} in the checkpoint, {b!r} here"


def check_out_dir(out_dir: Path) -> None:
    try:
        out_dir.mkdir(parents=True, exist_ok=True)
        fd, probe = tempfile.mkstemp(prefix=".write-test.", dir=out_dir)
        os.close(fd)
        os.unlink(probe)
    except OSError as e:
        raise LatentAttnError(f"cannot write to output directory {out_dir}: "
                              f"{e.strerror or e}") from None
