"""Hugging Face DeepSeek-V4 checkpoints (``model_type: deepseek_v4``): safetensors <-> Transformer.

Loading reads the three tensor namings transformers 5.25 reads (``conversion_mapping.py``,
``"deepseek_v4"``, and ``modeling_deepseek_v4.py``; the names: :mod:`latentattn.interop.v4_names`);
saving writes DeepSeek's naming (:func:`v4_checkpoint_tensors`, through ``hf.save_pretrained``),
the one the release, DeepSeek's inference code and transformers all read.

Weights are read with ``safetensors`` only (never pickle). The multi-token-prediction module
(``mtp.*``) is skipped, as transformers skips it (``_keys_to_ignore_on_load_unexpected``): latentattn
has no MTP; the count is logged (logger ``latentattn.interop.hf_v4``, level INFO). Quantised
weights are dequantised (:mod:`latentattn.interop.v4_quant`); the tensors transformers keeps in
fp32 (sinks, position_bias, e_score_correction_bias, the norms, the hyper-connection parameters)
load into the model's fp32 slots whatever the checkpoint's dtype.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable, Iterator, Mapping
from contextlib import ExitStack
from pathlib import Path
from typing import Any

import torch

from latentattn.config import ModelConfig
from latentattn.errors import CheckpointError
from latentattn.interop.v4_names import (
    _EXPERT,
    _MTP,
    Target,
    checkpoint_names,
    fused_names,
    hf_name,
    native_name,
)
from latentattn.interop.v4_quant import (
    _FP8_ANY,
    _PACKED,
    FP4_BLOCK,
    _dequantize,
    _logical_shape,
    dequantize_fp4,
    scale_to_float,
    v4_quantization,
)
from latentattn.model.transformer import Transformer

log = logging.getLogger(__name__)


# --------------------------------------------------------------------------- loading
def _scale_names(key: str) -> tuple[str, str]:
    """A weight's scale: DeepSeek's ``x.scale`` (for ``x.weight``) or transformers'
    ``x.weight_scale_inv`` / ``..._proj_scale_inv`` (which its fp8 quantizer renames it to)."""
    return key.removesuffix(".weight") + ".scale", key + "_scale_inv"


def _first(names: list[str], more: int) -> str:
    return ", ".join(names[:5]) + (f" (and {more - 5} more)" if more > 5 else "")


def load_v4_state(root: Path, raw: dict[str, Any], state: Mapping[str, torch.Tensor],
                  skip: Iterable[str] = (), source: str | None = None) -> None:
    """Fill ``state`` (our names -> the model's tensors, as ``model.state_dict()`` gives them)
    from the safetensors files of checkpoint directory ``root`` (config.json parsed: ``raw``).
    ``skip``: our tensors the checkpoint may hold but that are not filled (a tied LM head).

    Raises CheckpointError naming the first tensors that are missing, unexpected, of the wrong
    shape or dtype, or without their scale; ConfigError for a quantisation it cannot read.
    """
    from safetensors import safe_open

    from latentattn.interop.hf import _checkpoint_files

    quant = v4_quantization(raw, source or str(root / "config.json"))
    skip = set(skip)
    names = checkpoint_names([*state, *skip])
    files, _ = _checkpoint_files(root)
    with ExitStack() as stack:
        where: dict[str, Any] = {}
        for path in files:
            handle = stack.enter_context(safe_open(str(path), framework="pt"))
            for k in handle.keys():  # noqa: SIM118 (a safe_open handle is not a dict)
                where[k] = handle
        weights = {k: names[k] for k in where if k in names and not skip.intersection(names[k].ours)}
        scales = {s: k for k in where if k in names for s in _scale_names(k) if s in where and s not in names}
        mtp = [k for k in where if _MTP.search(k)]
        extra = sorted(k for k in where if k not in weights and k not in scales and k not in mtp
                       and k not in names  # skipped
                       and not k.endswith("rotary_emb.inv_freq"))  # old files saved the RoPE buffer
        if extra:
            raise CheckpointError(f"{root}: unexpected tensor(s) not in the model: "
                                  f"{_first(extra, len(extra))}")
        filled: dict[str, str] = {}
        for key, target in weights.items():
            for ours in target.ours:
                if ours in filled:
                    raise CheckpointError(f"{root}: tensor {ours} is given twice, as {filled[ours]} "
                                          f"and as {key}")
                filled[ours] = key
        missing = [k for k in state if k not in filled]
        if missing:
            transformers_naming = any(".self_attn." in k or ".mlp." in k for k in weights)
            shown = sorted(hf_name(k) if transformers_naming and not _EXPERT.search(k) else native_name(k)
                           for k in missing)
            raise CheckpointError(f"{root}: missing tensor(s): {_first(shown, len(shown))}")
        for key, target in weights.items():
            _check_shape(root, key, target, where[key].get_slice(key), state)
        with torch.no_grad():
            for key, target in weights.items():
                tensor = where[key].get_tensor(key)
                scale = next((s for s in _scale_names(key) if s in scales), None)
                if scale is not None:
                    tensor = _dequantize(key, tensor, where[scale].get_tensor(scale), quant)
                elif tensor.dtype in _FP8_ANY or (tensor.dtype in _PACKED
                                                  and state[target.ours[0]].is_floating_point()):
                    raise CheckpointError(f"{root}: quantised tensor {key} "
                                          f"({str(tensor.dtype).removeprefix('torch.')}) has no scale "
                                          f"({' or '.join(_scale_names(key))})")
                _fill(root, key, target, tensor, state)
                del tensor
    if mtp:
        log.info("%s: skipped %d multi-token-prediction tensor(s) (mtp.*), as transformers does: "
                 "latentattn has no MTP module", root, len(mtp))


def _check_shape(root: Path, key: str, target: Target, info: Any, state: Mapping[str, torch.Tensor]) -> None:
    first = state[target.ours[0]]
    found = _logical_shape(tuple(info.get_shape()), info.get_dtype(), first)
    if target.split == "one":
        want = tuple(first.shape)
    else:
        e = len(target.ours) // 2 if target.split == "gate_up" else len(target.ours)
        rows, cols = first.shape
        want = (e, 2 * rows, cols) if target.split == "gate_up" else (e, rows, cols)
    if found != want:
        raise CheckpointError(f"{root}: tensor {key} has shape {list(found)}, expected {list(want)}")
    kind = info.get_dtype()  # safetensors' dtype name: F32, BF16, F8_E4M3, F4, I8, I64, ...
    if first.is_floating_point() and not kind.startswith(("F", "BF", "I8", "U8")):
        raise CheckpointError(f"{root}: tensor {key} is {kind}, expected floating point")
    if not first.is_floating_point() and not kind.startswith(("I", "U")):
        raise CheckpointError(f"{root}: tensor {key} is {kind}, expected an integer table")


def _fill(root: Path, key: str, target: Target, tensor: torch.Tensor,
          state: Mapping[str, torch.Tensor]) -> None:
    if target.split == "one":
        dest = state[target.ours[0]]
        if not dest.is_floating_point():  # tid2eid: expert ids, used as indices
            n = _experts_of(target.ours[0], state)
            if tensor.numel() and (int(tensor.min()) < 0 or (n is not None and int(tensor.max()) >= n)):
                raise CheckpointError(f"{root}: tensor {key} holds expert ids outside [0, {n})")
        dest.copy_(tensor)
        return
    if target.split == "gate_up":
        e = len(target.ours) // 2
        rows = state[target.ours[0]].shape[0]
        for i in range(e):
            state[target.ours[i]].copy_(tensor[i, :rows])
            state[target.ours[e + i]].copy_(tensor[i, rows:])
    else:
        for i, ours in enumerate(target.ours):
            state[ours].copy_(tensor[i])


def _experts_of(tid2eid: str, state: Mapping[str, torch.Tensor]) -> int | None:
    """The routed-expert count of the layer a ``tid2eid`` table belongs to (its router's rows)."""
    gate = state.get(tid2eid.removesuffix("tid2eid") + "weight")
    return None if gate is None else gate.shape[0]


def from_pretrained_v4(root: Path, raw: dict[str, Any], cfg: ModelConfig, dtype: torch.dtype,
                       device: torch.device) -> Transformer:
    """Our model of a ``deepseek_v4`` checkpoint directory in ``dtype`` (fp32-kept tensors stay
    fp32), in eval mode. :func:`latentattn.interop.hf.from_pretrained` dispatches here."""
    model = Transformer.empty(cfg, dtype, device)  # computed buffers (RoPE frequencies) rebuilt
    state = model.state_dict()
    tied = ("lm_head.weight",) if cfg.tie_word_embeddings else ()
    for name in tied:
        del state[name]  # the embedding is it (transformers' _tied_weights_keys)
    load_v4_state(root, raw, state, skip=tied)
    model.eval()
    return model


# --------------------------------------------------------------------------- saving
def v4_checkpoint_tensors(model: Transformer) -> Iterator[tuple[str, torch.Tensor]]:
    """(DeepSeek's name, CPU tensor) for every tensor of ``model``, as :func:`save_pretrained`
    writes them; tied embeddings are written once (``embed.weight``)."""
    seen: set[int] = set()
    for ours, t in model.state_dict().items():
        if ours == "lm_head.weight" and model.config.tie_word_embeddings:
            continue
        t = t.detach().to("cpu").contiguous()
        if t.untyped_storage().data_ptr() in seen:
            t = t.clone()  # safetensors refuses tensors that share memory
        seen.add(t.untyped_storage().data_ptr())
        yield native_name(ours), t


# The naming maps and dequantisers are re-exported: callers import them from here.
__all__ = ["FP4_BLOCK", "Target", "checkpoint_names", "dequantize_fp4", "from_pretrained_v4",
           "fused_names", "hf_name", "load_v4_state", "native_name", "scale_to_float",
           "v4_checkpoint_tensors"]
