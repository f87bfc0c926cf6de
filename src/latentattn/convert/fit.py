"""Local fitting of a converted model: each MLA attention layer trained to reproduce its source
layer's attention output on the calibration inputs, one layer at a time, before any global heal.

The closed-form conversion (:mod:`latentattn.convert.gqa_to_mla`) factors each layer's K/V
projections; what it cannot reproduce is a nonlinearity the target format adds, above all
DeepSeek's RMSNorm on the latent (its scale changes token by token, so no per-dim gain undoes
it). Fitting the layer's *output* instead of its K/V lets the query side, ``kv_a_proj_with_mqa``,
the norm's gains and ``kv_b_proj`` absorb it together, with the norm in the forward. This is the
local stage of the 2025-2026 conversion recipes (CARE, arXiv 2603.17946; ReCalKV, arXiv
2505.24357; StiefAttention, arXiv 2601.21686; LoLCATs' attention transfer, arXiv 2410.10254);
MHA2MLA-VLM (arXiv 2601.11464) found output-error fitting far better than parameter distance.

The loss is the mean squared error relative to the source output's mean square, on windows of
the calibration inputs; the last eighth of the windows is held out and reports the error before
and after. ``o_proj`` stays the source's: the fitted parameters are exactly those the conversion
computed.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import torch

from latentattn.attention.mla import MultiHeadLatentAttention
from latentattn.cache.step import fresh_step
from latentattn.convert.calibrate import CALIB_WINDOW
from latentattn.errors import ConfigError
from latentattn.model.transformer import Transformer

HELD_OUT = 8  # one window in this many is held out (at least one)
FITTED = ("q_proj", "q_a_proj", "q_a_layernorm", "q_b_proj", "kv_a_proj_with_mqa", "kv_a_layernorm",
          "kv_b_proj")


@dataclass(frozen=True)
class LayerFit:
    """One layer's held-out relative output error, ``||y - y_src||^2 / ||y_src||^2``, before and
    after fitting."""

    layer: int
    before: float
    after: float


@dataclass(frozen=True)
class FitSettings:
    steps: int = 200
    lr: float = 1e-3
    batch_windows: int = 2  # windows per step

    def __post_init__(self) -> None:
        if isinstance(self.steps, bool) or not isinstance(self.steps, int) or not 0 <= self.steps <= 100_000:
            raise ConfigError(f"--fit-steps must be an integer in 0..100000, got {self.steps!r}")
        if not (isinstance(self.lr, float | int) and 0 < self.lr <= 0.1 and math.isfinite(self.lr)):
            raise ConfigError(f"--fit-lr must lie in (0, 0.1], got {self.lr!r}")
        if self.batch_windows < 1:
            raise ConfigError(f"batch_windows must be >= 1, got {self.batch_windows}")


WINDOWS_NEEDED = 2  # calibration windows local fitting needs: one to fit on, one held out


def check_calibration(calib_tokens: int, max_seq_len: int) -> None:
    """Refuse, before any weight is read, calibration too short to fit on and hold out from."""
    window = min(CALIB_WINDOW, max_seq_len)
    if calib_tokens < WINDOWS_NEEDED * window:
        raise ConfigError(f"--fit-steps needs at least {WINDOWS_NEEDED * window:,} calibration tokens "
                          f"({WINDOWS_NEEDED} windows of {window}: one to fit on, one held out), got "
                          f"--calib-tokens {calib_tokens:,}")


def _fitted_params(attn: MultiHeadLatentAttention) -> list[torch.nn.Parameter]:
    params: list[torch.nn.Parameter] = []
    for name in FITTED:
        sub = getattr(attn, name, None)
        if isinstance(sub, torch.nn.Module):
            params.extend(p for p in sub.parameters())
    return params


def _rel_error(out: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    return (out - target).pow(2).mean() / target.pow(2).mean().clamp_min(1e-30)


def fit_layers(source: Transformer, converted: Transformer, inputs: list[torch.Tensor], window: int,
               settings: FitSettings, progress: Callable[[int, LayerFit], None] | None = None,
               seed: int = 0) -> list[LayerFit]:
    """Fit every attention layer of ``converted`` (MLA, from ``source`` by
    :func:`latentattn.convert.gqa_to_mla.convert`) to ``source``'s on ``inputs``: per layer, the
    (N, dim) attention inputs of the calibration text (:func:`attention_inputs`, N a multiple of
    ``window``). Changes ``converted`` in place; returns each layer's held-out error."""
    gen = torch.Generator().manual_seed(seed)
    fits: list[LayerFit] = []
    for i in range(len(source.blocks)):
        fit = fit_layer(source, converted, i, inputs[i], window, settings, gen)
        fits.append(fit)
        if progress is not None:
            progress(i, fit)
    return fits


def fit_layer(source: Transformer, converted: Transformer, i: int, inputs: torch.Tensor, window: int,
              settings: FitSettings, gen: torch.Generator) -> LayerFit:
    """Fit attention layer ``i`` of ``converted`` to ``source``'s on ``inputs`` (N, dim), N a
    multiple of ``window``, the last eighth of the windows held out; a layer the fit leaves
    worse on them gets its closed form back. Returns its held-out error before and after."""
    n_windows = inputs.shape[0] // window
    if n_windows < WINDOWS_NEEDED:
        raise ConfigError(f"local fitting needs at least {WINDOWS_NEEDED * window:,} calibration "
                          f"tokens ({WINDOWS_NEEDED} windows of {window}), got {inputs.shape[0]:,}: "
                          "raise --calib-tokens or give a longer --calib text")
    held = max(1, n_windows // HELD_OUT)
    device = converted.device
    step = fresh_step(1, window, device)
    src_rope = source.rotary(step.positions)
    dst_rope = converted.rotary(step.positions)
    src_attn = source.blocks[i].self_attn
    attn = converted.blocks[i].self_attn
    assert isinstance(attn, MultiHeadLatentAttention)
    x = inputs[: n_windows * window].view(n_windows, window, -1).to(device=device, dtype=converted.dtype)
    with torch.no_grad():
        target = torch.cat([src_attn(w[None], src_rope, step) for w in x])
    train_x, train_y = x[:-held], target[:-held]
    test_x, test_y = x[-held:], target[-held:]

    def held_out_error() -> float:
        with torch.no_grad():
            out = torch.cat([attn(w[None], dst_rope, step) for w in test_x])
            return float(_rel_error(out, test_y))

    before = held_out_error()
    params = _fitted_params(attn)
    closed_form = [p.detach().clone() for p in params]
    if settings.steps:
        opt = torch.optim.Adam(params, lr=settings.lr)
        attn.train()
        b = min(settings.batch_windows, len(train_x))
        bstep = fresh_step(b, window, device)
        brope = converted.rotary(bstep.positions)
        for t in range(settings.steps):
            lr = settings.lr * 0.5 * (1 + math.cos(math.pi * t / settings.steps))  # cosine to 0
            for group in opt.param_groups:
                group["lr"] = lr
            pick = torch.randperm(len(train_x), generator=gen)[:b]
            loss = _rel_error(attn(train_x[pick], brope, bstep), train_y[pick])
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
        attn.eval()
    after = held_out_error()
    if after > before:  # never leave a layer worse than its closed form on held-out tokens
        with torch.no_grad():
            for p, p0 in zip(params, closed_form, strict=True):
                p.copy_(p0)
        after = before
    return LayerFit(i, before, after)


def summary(fits: list[LayerFit], seconds: float | None = None) -> str:
    """One line: the held-out error over layers, before and after (geometric means)."""
    def gmean(values: list[float]) -> float:
        return math.exp(sum(math.log(max(v, 1e-30)) for v in values) / len(values))

    text = (f"local fit: held-out attention output error {gmean([f.before for f in fits]):.4f} -> "
            f"{gmean([f.after for f in fits]):.4f} (geometric mean over {len(fits)} layers")
    return text + (f", {seconds:.0f} s)" if seconds is not None else ")")


__all__ = ["WINDOWS_NEEDED", "FitSettings", "LayerFit", "check_calibration", "fit_layer", "fit_layers",
           "summary"]
