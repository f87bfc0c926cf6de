"""Sequential calibration: layer l of the conversion is factored (and fitted) on the attention
inputs that layers 0..l-1, already converted, produce, not on the source's. Each layer then
corrects for the error the earlier ones left, the order GPTQ quantises in (arXiv 2210.17323)
and CARE's sequential calibration (arXiv 2603.17946). One-pass calibration
(:func:`latentattn.convert.calibrate.attention_inputs`) feeds every layer the source's inputs.

:func:`convert_and_fit` is the conversion both ``latentattn convert`` and ``bench convert`` run:
closed form, then the optional local fit, one-pass or sequential."""

from __future__ import annotations

from collections.abc import Callable

import torch

from latentattn.attention.gqa import GroupedQueryAttention
from latentattn.attention.mla import MultiHeadLatentAttention
from latentattn.cache.step import fresh_step
from latentattn.convert.fit import FitSettings, LayerFit, fit_layer, fit_layers
from latentattn.convert.gqa_to_mla import Plan, convert, convert_layer, shell
from latentattn.errors import ConfigError
from latentattn.model.transformer import Transformer

Progress = Callable[[int, LayerFit], None]


def convert_sequential(source: Transformer, plan: Plan, ids: torch.Tensor, window: int,
                       fit: FitSettings | None = None, progress: Progress | None = None,
                       seed: int = 0, seen: Callable[[int, torch.Tensor], None] | None = None,
                       ) -> tuple[Transformer, list[LayerFit]]:
    """Convert ``source`` layer by layer on calibration tokens ``ids`` (1-D, cut into windows of
    ``window``; the tail shorter than a window is left out): layer l's attention inputs are those
    the converted layers 0..l-1 (fitted, with ``fit``) give. Returns the converted model and, with
    ``fit``, each layer's fit. ``seen(l, inputs)``: called with the (N, dim) inputs layer l was
    converted on."""
    n = (len(ids) // window) * window
    if n == 0:
        raise ConfigError(f"calibration: {len(ids)} tokens are fewer than one window of {window}")
    if source.hc_head is not None:
        raise ConfigError("sequential calibration converts plain residual models (no mHC)")
    out = shell(source, plan)
    windows = ids[:n].view(-1, window).to(source.device)
    step = fresh_step(len(windows), window, source.device)
    rope = out.rotary(step.positions)
    gen = torch.Generator().manual_seed(seed)
    fits: list[LayerFit] = []
    with torch.no_grad():
        h = out.embed_tokens(windows)
    for i, (s_blk, d_blk) in enumerate(zip(source.blocks, out.blocks, strict=True)):
        assert isinstance(s_blk.self_attn, GroupedQueryAttention)
        assert isinstance(d_blk.self_attn, MultiHeadLatentAttention)
        with torch.no_grad():
            x = d_blk.input_layernorm(h).reshape(-1, h.shape[-1]).float()
        if seen is not None:
            seen(i, x)
        convert_layer(s_blk.self_attn, d_blk.self_attn, out.config, plan, x)
        if fit is not None and fit.steps:
            fits.append(fit_layer(source, out, i, x, window, fit, gen))
            if progress is not None:
                progress(i, fits[-1])
        with torch.no_grad():
            h = d_blk.residual(h, rope, step, None, windows)
    return out.eval(), fits


def convert_and_fit(source: Transformer, plan: Plan, inputs: list[torch.Tensor] | None,
                    ids: torch.Tensor | None, window: int, fit: FitSettings | None = None,
                    sequential: bool = False, progress: Progress | None = None, seed: int = 0,
                    ) -> tuple[Transformer, list[LayerFit]]:
    """The closed-form conversion of ``source`` and, with ``fit`` (steps > 0), its local fit:
    one-pass on the source's calibration ``inputs`` (per layer, (N, dim)), or ``sequential`` on
    the calibration tokens ``ids`` (:func:`convert_sequential`)."""
    if sequential:
        if ids is None:
            raise ConfigError("--sequential calibrates on the converted layers' outputs: give --calib")
        return convert_sequential(source, plan, ids, window, fit, progress, seed)
    mla = convert(source, plan, inputs)
    if fit is None or not fit.steps:
        return mla, []
    if inputs is None:
        raise ConfigError("--fit-steps fits each layer on calibration activations: give --calib")
    return mla, fit_layers(source, mla, inputs, window, fit, progress, seed)


__all__ = ["convert_and_fit", "convert_sequential"]
