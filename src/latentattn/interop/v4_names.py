"""DeepSeek-V4 checkpoint tensor names: ours <-> DeepSeek's <-> transformers'.

Three namings are read, each as transformers 5.25 reads it (``conversion_mapping.py``,
``"deepseek_v4"``, and ``modeling_deepseek_v4.py``):

* DeepSeek's own, as published (``embed.weight``, ``layers.N.attn.wq_a.weight``,
  ``layers.N.ffn.experts.E.w1.weight``, ``hc_head_fn``, ``head.weight``; FP8 scales ``*.scale``);
* the same under ``model.`` (what transformers' ``save_pretrained`` writes: it reverts the
  renames, and keeps ``model.embed_tokens.weight`` and ``model.hc_head.*``);
* transformers' module names (``model.layers.N.self_attn.q_a_proj.weight``), with the routed
  experts fused: ``mlp.experts.gate_up_proj`` (E, 2I, dim) = [gate rows; up rows] and
  ``mlp.experts.down_proj`` (E, dim, I) (``save_pretrained(..., save_original_format=False)``).

Ours are transformers' module names without ``model.``, experts kept per expert
(``layers.N.mlp.experts.E.{gate,up,down}_proj.weight``). :func:`native_name` gives DeepSeek's
name, the one :mod:`latentattn.interop.hf_v4` saves; :func:`checkpoint_names` every name it loads.
"""

from __future__ import annotations

import re
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Literal

from latentattn.errors import CheckpointError

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


__all__ = ["Split", "Target", "checkpoint_names", "fused_names", "hf_name", "native_name"]
