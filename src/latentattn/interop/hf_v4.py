"""Hugging Face DeepSeek-V4 checkpoints (``model_type: deepseek_v4``): safetensors <-> Transformer.

Three tensor namings are read, each as transformers 5.25 reads it (``conversion_mapping.py``,
``"deepseek_v4"``, and ``modeling_deepseek_v4.py``):

* DeepSeek's own, as published (``embed.weight``, ``layers.N.attn.wq_a.weight``,
  ``layers.N.ffn.experts.E.w1.weight``, ``hc_head_fn``, ``head.weight``; FP8 scales ``*.scale``);
* the same under ``model.`` (what transformers' ``save_pretrained`` writes: it reverts the
  renames, and keeps ``model.embed_tokens.weight`` and ``model.hc_head.*``);
* transformers' module names (``model.layers.N.self_attn.q_a_proj.weight``), with the routed
  experts fused: ``mlp.experts.gate_up_proj`` (E, 2I, dim) = [gate rows; up rows] and
  ``mlp.experts.down_proj`` (E, dim, I) (``save_pretrained(..., save_original_format=False)``).

Ours are transformers' module names without ``model.``, experts kept per expert
(``layers.N.mlp.experts.E.{gate,up,down}_proj.weight``). :func:`save_pretrained` writes DeepSeek's
naming, the one the release, DeepSeek's inference code and transformers all read.

Weights are read with ``safetensors`` only (never pickle). The multi-token-prediction module
(``mtp.*``) is skipped, as transformers skips it (``_keys_to_ignore_on_load_unexpected``): latentattn
has no MTP; the count is logged (logger ``latentattn.interop.hf_v4``, level INFO). Quantised
weights are dequantised (see :func:`dequantize_fp4` and ``hf.dequantize_fp8``); the tensors
transformers keeps in fp32 (sinks, position_bias, e_score_correction_bias, the norms, the
hyper-connection parameters) load into the model's fp32 slots whatever the checkpoint's dtype.
"""

from __future__ import annotations

import logging
import re
from collections.abc import Iterable, Iterator, Mapping
from contextlib import ExitStack
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import torch

from latentattn.config import ModelConfig
from latentattn.errors import CheckpointError
from latentattn.interop.hf_v4_config import V4Quant, v4_quantization
from latentattn.model.transformer import Transformer

log = logging.getLogger(__name__)

# --------------------------------------------------------------------------- names
# Ours (= transformers' module names without "model.") -> DeepSeek's, inverting the renames of
# transformers' conversion_mapping.py "deepseek_v4". Attention leaves, under layers.N.self_attn
# (ours) and layers.N.attn (DeepSeek's):
_ATTN = {
    "q_a_proj.weight": "wq_a.weight",
    "q_a_norm.weight": "q_norm.weight",
    "q_b_proj.weight": "wq_b.weight",
    "kv_proj.weight": "wkv.weight",
    "kv_norm.weight": "norm.weight",
    "o_a_proj.weight": "wo_a.weight",
    "o_b_proj.weight": "wo_b.weight",
    "sinks": "attn_sink",
    "compressor.kv_proj.weight": "compressor.wkv.weight",
    "compressor.gate_proj.weight": "compressor.wgate.weight",
    "compressor.position_bias": "compressor.ape",
    "compressor.kv_norm.weight": "compressor.norm.weight",
    # transformers nests the indexer in the compressor; DeepSeek has it beside, with its own.
    "compressor.indexer.kv_proj.weight": "indexer.compressor.wkv.weight",
    "compressor.indexer.gate_proj.weight": "indexer.compressor.wgate.weight",
    "compressor.indexer.position_bias": "indexer.compressor.ape",
    "compressor.indexer.kv_norm.weight": "indexer.compressor.norm.weight",
    "compressor.indexer.q_b_proj.weight": "indexer.wq_b.weight",
    "compressor.indexer.scorer.weights_proj.weight": "indexer.weights_proj.weight",
}
# MoE leaves, under layers.N.mlp (ours) and layers.N.ffn (DeepSeek's); w1 gate, w3 up, w2 down.
_PROJ = {"gate_proj": "w1", "up_proj": "w3", "down_proj": "w2"}
_MLP = {
    "gate.weight": "gate.weight",
    "gate.e_score_correction_bias": "gate.bias",
    "gate.tid2eid": "gate.tid2eid",
    **{f"shared_experts.{p}.weight": f"shared_experts.{w}.weight" for p, w in _PROJ.items()},
}
_TOP = {
    "embed_tokens.weight": "embed.weight",
    "lm_head.weight": "head.weight",
    "norm.weight": "norm.weight",
    "hc_head.hc_fn": "hc_head_fn",
    "hc_head.hc_base": "hc_head_base",
    "hc_head.hc_scale": "hc_head_scale",
}
_LAYER_TOP = {
    "input_layernorm.weight": "attn_norm.weight",
    "post_attention_layernorm.weight": "ffn_norm.weight",
    **{f"{ours}_hc.{p}": f"hc_{ours}_{p}" for ours in ("attn", "ffn") for p in ("fn", "base", "scale")},
}
_LAYER = re.compile(r"layers\.(\d+)\.(.+)")
_EXPERT = re.compile(r"experts\.(\d+)\.(gate_proj|up_proj|down_proj)\.weight")
# transformers' _keys_to_ignore_on_load_unexpected for DeepseekV4PreTrainedModel.
_MTP = re.compile(r"(^|\.)mtp\.")


def native_name(ours: str) -> str:
    """DeepSeek's name (the published checkpoint's, no ``model.``) for one of our tensors."""
    if ours in _TOP:
        return _TOP[ours]
    m = _LAYER.fullmatch(ours)
    if m:
        layer, rest = m.groups()
        if rest in _LAYER_TOP:
            return f"layers.{layer}.{_LAYER_TOP[rest]}"
        sub, _, leaf = rest.partition(".")
        if sub == "self_attn" and leaf in _ATTN:
            return f"layers.{layer}.attn.{_ATTN[leaf]}"
        if sub == "mlp":
            if leaf in _MLP:
                return f"layers.{layer}.ffn.{_MLP[leaf]}"
            e = _EXPERT.fullmatch(leaf)
            if e:
                return f"layers.{layer}.ffn.experts.{e.group(1)}.{_PROJ[e.group(2)]}.weight"
    raise CheckpointError(f"no DeepSeek-V4 checkpoint name for the model's tensor {ours}")


def hf_name(ours: str) -> str:
    """transformers' state-dict name for one of our tensors (experts: see :func:`fused_names`)."""
    return ours if ours == "lm_head.weight" else "model." + ours


Split = Literal["one", "gate_up", "down"]


@dataclass(frozen=True)
class Target:
    """Which of our tensors a checkpoint tensor fills: ``one`` tensor as it is, or a fused expert
    tensor: ``gate_up`` (E, 2I, dim) fills every expert's gate_proj (rows :I) and up_proj
    (rows I:), ``down`` (E, dim, I) every expert's down_proj."""

    ours: tuple[str, ...]
    split: Split = "one"


def fused_names(names: Iterable[str]) -> dict[str, Target]:
    """transformers' fused expert tensors (``model.layers.N.mlp.experts.{gate_up,down}_proj``)
    for our per-expert names, each with the per-expert tensors it holds, experts in order."""
    experts: dict[str, dict[int, dict[str, str]]] = {}
    for ours in names:
        m = _LAYER.fullmatch(ours)
        e = _EXPERT.fullmatch(m.group(2)[len("mlp."):]) if m and m.group(2).startswith("mlp.") else None
        if m and e:
            experts.setdefault(m.group(1), {}).setdefault(int(e.group(1)), {})[e.group(2)] = ours
    out: dict[str, Target] = {}
    for layer, by_expert in experts.items():
        order = [by_expert[i] for i in sorted(by_expert)]
        prefix = f"model.layers.{layer}.mlp.experts."
        out[prefix + "gate_up_proj"] = Target(
            tuple(x["gate_proj"] for x in order) + tuple(x["up_proj"] for x in order), "gate_up")
        out[prefix + "down_proj"] = Target(tuple(x["down_proj"] for x in order), "down")
    return out


def checkpoint_names(names: Iterable[str]) -> dict[str, Target]:
    """Every name under which a checkpoint may hold one of our tensors (module docstring: the
    three namings), each with the tensor(s) it fills."""
    names = list(names)
    out: dict[str, Target] = {}

    def add(key: str, target: Target) -> None:
        if out.setdefault(key, target) != target:  # a naming bug, not a user error
            raise AssertionError(f"{key} names both {out[key].ours} and {target.ours}")

    for ours in names:
        target, native = Target((ours,)), native_name(ours)
        add(native, target)
        if ours != "lm_head.weight":  # transformers writes head.weight without the prefix
            add("model." + native, target)
        if not _EXPERT.search(ours):  # per-expert tensors are fused in transformers' naming
            add(hf_name(ours), target)
    for key, target in fused_names(names).items():
        add(key, target)
    return out


# --------------------------------------------------------------------------- dequantisation
# e2m1 (FP4): sign, 2 exponent bits, 1 mantissa bit; code -> value (OCP MX spec; the same table
# as transformers' Fp8Dequantize._FP4_E2M1_LUT).
_E2M1 = (0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0, -0.0, -0.5, -1.0, -1.5, -2.0, -3.0, -4.0, -6.0)
FP4_BLOCK = 32  # values per scale along a row: DeepSeek-V4's fp4_block_size (transformers' sf_gran_k)
_FP8 = tuple(getattr(torch, n) for n in ("float8_e4m3fn", "float8_e4m3fnuz") if hasattr(torch, n))
# Every 8-bit float: none is a weight that loads without its scale.
_FP8_ANY = _FP8 + tuple(getattr(torch, n) for n in ("float8_e5m2", "float8_e5m2fnuz") if hasattr(torch, n))
_PACKED = (torch.int8, torch.uint8,
           *(getattr(torch, n) for n in ("float4_e2m1fn_x2",) if hasattr(torch, n)))


def scale_to_float(scale: torch.Tensor) -> torch.Tensor:
    """Block scales as fp32 multipliers: fp32 ones as they are, ue8m0 ones (``float8_e8m0fnu``:
    2 ** (byte - 127)) converted, and raw ue8m0 bytes stored as uint8 read the same way
    (transformers' Fp8Dequantize: "MXFP8 checkpoints ship E8M0 exponents stored as uint8")."""
    if scale.dtype == torch.uint8:
        return torch.exp2(scale.float() - 127.0)
    return scale.float()


def dequantize_fp4(packed: torch.Tensor, scale: torch.Tensor, block: int = FP4_BLOCK) -> torch.Tensor:
    """Packed FP4 -> fp32: ``packed`` (..., rows, cols / 2) holds two e2m1 codes per byte, the
    low nibble first (element 2j, then 2j + 1); ``scale`` (..., rows, cols / block) one multiplier
    per ``block`` values of a row. The layout of DeepSeek-V4's expert weights: its inference code
    (``Linear`` with ``float4_e2m1fn_x2`` weights and ``float8_e8m0fnu`` scales, "1 scale per 32 fp4
    elements along K") and transformers' ``FP8Experts`` with ``expert_dtype="fp4"``."""
    codes = packed.contiguous().view(torch.uint8)
    cols = 2 * codes.shape[-1]
    if scale.shape != (*codes.shape[:-1], cols // block) or cols % block:
        raise CheckpointError(
            f"FP4 scale shape {tuple(scale.shape)} does not match packed weight "
            f"{tuple(packed.shape)} ({cols} values a row, one scale per {block})")
    lut = torch.tensor(_E2M1, dtype=torch.float32, device=packed.device)
    values = lut[torch.stack((codes & 0xF, codes >> 4), dim=-1).flatten(-2).long()]
    return values * scale_to_float(scale).repeat_interleave(block, dim=-1)


def _dequantize(name: str, t: torch.Tensor, scale: torch.Tensor, quant: V4Quant | None) -> torch.Tensor:
    from latentattn.interop.hf import dequantize_fp8

    if t.dtype in _FP8:
        block = quant.block if quant is not None else (128, 128)
        s = scale_to_float(scale)
        if t.dim() == 2:
            return dequantize_fp8(t, s, block)
        if t.dim() == 3 and s.dim() == 3 and len(s) == len(t):  # fused experts: one by one
            return torch.stack([dequantize_fp8(w, si, block) for w, si in zip(t, s, strict=True)])
        raise CheckpointError(f"FP8 tensor {name} {tuple(t.shape)} and its scale {tuple(s.shape)}: "
                              "expected 2-D (or 3-D experts) with matching blocks")
    if t.dtype in _PACKED:
        if quant is None or quant.expert_dtype != "fp4":
            raise CheckpointError(
                f"tensor {name} is {str(t.dtype).removeprefix('torch.')} with a scale, packed FP4, "
                "but config.json does not declare FP4 experts (quantization_config expert_dtype fp4)")
        return dequantize_fp4(t, scale)
    raise CheckpointError(f"tensor {name} has a scale but is {str(t.dtype).removeprefix('torch.')}, "
                          "neither FP8 (e4m3) nor packed FP4")


def _logical_shape(shape: tuple[int, ...], dtype: str, slot: torch.Tensor) -> tuple[int, ...]:
    """A stored tensor's shape as the model sees it: packed FP4 in int8/uint8 holds two values per
    byte (safetensors' own F4 header already counts values, not bytes)."""
    if slot.is_floating_point() and dtype in ("I8", "U8") and shape:
        return (*shape[:-1], 2 * shape[-1])
    return shape


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


__all__ = ["FP4_BLOCK", "Target", "checkpoint_names", "dequantize_fp4", "from_pretrained_v4",
           "fused_names", "hf_name", "load_v4_state", "native_name", "scale_to_float",
           "v4_checkpoint_tensors"]
