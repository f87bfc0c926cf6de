"""Tensors that stay fp32 whatever dtype the model is cast to.

DeepSeek keeps a few small tensors in fp32 in bf16 models: the MoE routing bias
(transformers' ``_keep_in_fp32_modules_strict = ["e_score_correction_bias"]``) and the lightning
indexer's per-head weights (DeepSeek-V3.2 ``inference/model.py``: ``weights_proj`` in fp32). Their
sums are what top-k choices hinge on, so bf16 rounding would change which experts or keys win.

Also: ``resolve_dtype`` / ``resolve_device``, the one place user-given dtype and device names
become torch objects (or a ConfigError naming the bad value); the training precision:
``cpu_bf16`` (does this CPU have native bf16?) and ``choose_precision`` (what ``train --dtype
auto`` trains in); and the weights' dtype: ``auto_dtype`` / ``choose_dtype`` (what ``load(...,
dtype="auto")`` and ``generate``/``eval --dtype auto`` load in). Both ``auto`` choices rest on one
answer, :func:`bf16_native`, and say why in the same words.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import torch
import torch.nn.functional as F
from torch import nn

from latentattn.errors import ConfigError


def _as_float32(old: torch.Tensor, new: torch.Tensor) -> torch.Tensor:
    """fp32 on ``new``'s device: ``old``'s exact values where it was fp32 with data (not meta,
    not freshly emptied), else ``new`` widened."""
    if old.dtype == torch.float32 and not old.is_meta and not new.is_meta and old.shape == new.shape:
        return old.to(new.device)
    return new.float()


class KeepFloat32(nn.Module):
    """Mixin: this module's own floating parameters and buffers are fp32 after any ``_apply``
    (``.to(dtype)``, ``.bfloat16()``, ``.to_empty(...)``); devices still move."""

    def _apply(self, fn: Callable[[torch.Tensor], torch.Tensor], recurse: bool = True) -> Any:
        # Keep the fp32 values themselves: converting back from what fn made (bf16) would round
        # them (V4's RoPE frequencies off by 0.2% rotate ~2 radians wrong by position 1,000).
        params = {n: p.data for n, p in self._parameters.items() if p is not None}
        buffers = dict(self._buffers)
        super()._apply(fn, recurse)
        for name, p in self._parameters.items():
            if p is not None and p.is_floating_point() and p.dtype != torch.float32:
                p.data = _as_float32(params[name], p.data)
        for name, b in self._buffers.items():
            if b is not None and b.is_floating_point() and b.dtype != torch.float32:
                old = buffers[name]
                self._buffers[name] = b.float() if old is None else _as_float32(old, b)
        return self


class Float32Linear(KeepFloat32, nn.Linear):
    """A bias-free-or-not Linear with an fp32 weight that also computes in fp32, under bf16
    autocast too (:func:`fp32_compute`)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        with fp32_compute(x):
            return F.linear(x.float(), self.weight, None if self.bias is None else self.bias.float())


AUTOCAST_DEVICES = ("cpu", "cuda")  # where fp32_compute looks for an active autocast


def fp32_compute(x: torch.Tensor) -> contextlib.AbstractContextManager[Any]:
    """A context where ``x``'s device runs ops in their inputs' dtype: autocast off there while
    it is on (``train --dtype bfloat16`` trains under ``torch.autocast``, which casts the inputs
    of ``F.linear``/``matmul`` to bf16 whatever they are: ``F.linear(x.float(), w_fp32)`` would
    give bf16 logits), else nothing. For the arithmetic kept in fp32 in a bf16 model (the MoE
    router, V4's mHC mix, DSA's indexer weights), so it stays fp32 in autocast training too.
    Traceable by torch.compile (fullgraph)."""
    dev = x.device.type
    if dev in AUTOCAST_DEVICES and torch.is_autocast_enabled(dev):
        return torch.autocast(dev, enabled=False)
    return contextlib.nullcontext()


def resolve_dtype(dtype: object) -> torch.dtype:
    """A floating torch.dtype from itself or its name (``"bfloat16"``, ``"torch.float32"``)."""
    if isinstance(dtype, torch.dtype) and dtype.is_floating_point:
        return dtype
    value = getattr(torch, dtype.removeprefix("torch."), None) if isinstance(dtype, str) else None
    if not isinstance(value, torch.dtype) or not value.is_floating_point:
        raise ConfigError(f"dtype must be a floating torch.dtype or its name, got {dtype!r}")
    return value


def resolve_device(device: object) -> torch.device:
    """A torch.device from itself or a string; None is the CPU. A CUDA device this machine does
    not have is a ConfigError here, not a RuntimeError deep in ``.to()``."""
    if device is None:
        return torch.device("cpu")
    if not isinstance(device, (str, torch.device)):
        raise ConfigError(f"device must be a torch.device or a string, got {device!r}")
    try:
        dev = torch.device(device)
    except RuntimeError:
        raise ConfigError(f"device {device!r} is not a device torch knows (cpu, cuda, cuda:1, "
                          "mps, ...)") from None
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise ConfigError(f"device {device!r}: this torch sees no CUDA GPU")
    if dev.type == "cuda" and dev.index is not None and dev.index >= torch.cuda.device_count():
        raise ConfigError(f"device {device!r}: this machine has {torch.cuda.device_count()} CUDA GPU(s)")
    return dev


# ---------------------------------------------------------------------------- training precision
# CPU flags that mean native bf16 arithmetic: AVX-512 BF16 (vdpbf16ps, bf16 dot products into
# fp32: Intel Cooper Lake and Sapphire Rapids on, AMD Zen 4 on) and AMX's bf16 tile multiply
# (Sapphire Rapids on). oneDNN, behind torch's CPU matmuls, uses them for bf16 GEMMs; without
# them bf16 is emulated by converting to fp32, slower than staying in fp32. Only these x86 flags
# count: bf16 autocast was measured faster only on an AVX-512 BF16 CPU (README, `latentattn bench
# precision`), so other CPUs (aarch64's FEAT_BF16 included) stay fp32 under "auto".
BF16_CPU_FLAGS = ("avx512_bf16", "amx_bf16")
CPUINFO = "/proc/cpuinfo"

Precision = Literal["auto", "fp32", "bf16"]
PRECISIONS: tuple[Precision, ...] = ("auto", "fp32", "bf16")


@dataclass(frozen=True)
class CpuBf16:
    """What this CPU says about bf16: ``native`` when it lists a flag of :data:`BF16_CPU_FLAGS`
    (``flags``: those it lists), ``model`` its model name ("unknown" where it gives none) and
    ``source`` where that was read (``/proc/cpuinfo``, or "unknown" off Linux: then ``native``
    is False, since nothing was measured)."""

    native: bool
    flags: tuple[str, ...]
    model: str
    source: str

    def describe(self) -> str:
        """``"AMD EPYC (avx512_bf16)"``, ``"... (no native bf16)"`` or ``"... (bf16 support unknown)"``."""
        if self.native:
            return f"{self.model} ({', '.join(self.flags)})"
        return f"{self.model} ({'no native bf16' if self.source != 'unknown' else 'bf16 support unknown'})"


def parse_cpuinfo(text: str, source: str = CPUINFO) -> CpuBf16:
    """:class:`CpuBf16` from the text of a Linux ``/proc/cpuinfo``: the first processor's
    ``flags`` line (x86; every core of a machine lists the same) and ``model name`` line."""
    flags: set[str] = set()
    model = ""
    for line in text.splitlines():
        key, sep, value = line.partition(":")
        if not sep:
            continue
        key = key.strip().lower()
        if key == "flags" and not flags:
            flags = set(value.split())
        elif key == "model name" and not model:
            model = value.strip()
    found = tuple(f for f in BF16_CPU_FLAGS if f in flags)
    return CpuBf16(native=bool(found), flags=found, model=model or _platform_cpu(), source=source)


def _platform_cpu() -> str:
    import platform

    return platform.processor() or platform.machine() or "unknown"


def cpu_bf16(cpuinfo: str | os.PathLike[str] = CPUINFO) -> CpuBf16:
    """Whether this CPU has native bf16 (:data:`BF16_CPU_FLAGS`), read from ``cpuinfo``; where
    there is none to read (macOS, Windows, a sandbox), "unknown" and not native."""
    try:
        text = Path(cpuinfo).read_text(errors="replace")
    except OSError:
        return CpuBf16(native=False, flags=(), model=_platform_cpu(), source="unknown")
    return parse_cpuinfo(text, str(cpuinfo))


@dataclass(frozen=True)
class PrecisionChoice:
    """The precision a run trains in: ``bf16`` (torch.autocast to bfloat16, fp32 master
    weights) or not, and ``why`` in words, for :meth:`line`."""

    bf16: bool
    why: str
    emulated: bool = False  # bf16 on a CPU without native bf16: it runs, slower than fp32

    def line(self) -> str:
        """The one line ``train`` and heals print: ``precision: bf16 autocast (...)``."""
        return f"precision: {'bf16 autocast' if self.bf16 else 'fp32'} ({self.why})"

    def warning(self) -> str | None:
        """One line when bf16 is emulated here (``train`` prints it on stderr), else None."""
        return _emulated("bf16 autocast", "fp32, what --dtype auto takes here") if self.emulated else None


def _emulated(what: str, instead: str) -> str:
    """The warning for bf16 asked for on a CPU that emulates it (one wording for every command)."""
    return (f"warning: {what} on this CPU is emulated and slow (no {' or '.join(BF16_CPU_FLAGS)}): "
            f"{instead}, runs faster")


def choose_precision(requested: str, device: torch.device | str,
                     cpu: CpuBf16 | None = None) -> PrecisionChoice:
    """The precision for ``requested`` ("auto", "fp32", "bf16") on ``device``. "auto" takes
    bf16 autocast on a CUDA GPU that supports bf16 and on a CPU with native bf16 (``cpu``,
    default :func:`cpu_bf16` of this machine), fp32 elsewhere: on such a CPU a SmolLM2-135M heal
    step ran faster in bf16 autocast than in fp32 (README, ``latentattn bench precision``), and
    without native bf16 it is emulated, slower than fp32. A bad ``requested`` is a ConfigError."""
    if requested not in PRECISIONS:
        raise ConfigError(f"precision must be one of {', '.join(PRECISIONS)}, got {requested!r}")
    if requested != "auto":
        bf16 = requested == "bf16"
        return PrecisionChoice(bf16, "as asked", emulated=bf16 and emulated_bf16(device, cpu))
    return PrecisionChoice(*bf16_native(device, cpu))


def emulated_bf16(device: torch.device | str, cpu: CpuBf16 | None = None) -> bool:
    """Whether bf16 on ``device`` is a CPU's emulation (no flag of :data:`BF16_CPU_FLAGS`)."""
    return torch.device(device).type == "cpu" and not bf16_native(device, cpu)[0]


def bf16_native(device: torch.device | str, cpu: CpuBf16 | None = None) -> tuple[bool, str]:
    """(whether bf16 arithmetic is native on ``device``, why in words): a CUDA GPU that does bf16
    in hardware (compute capability 8.0 on; not torch's emulation on older ones), a CPU with a
    flag of :data:`BF16_CPU_FLAGS` (``cpu``, default :func:`cpu_bf16` of this machine); no
    elsewhere (other devices: not measured). What ``train --dtype auto`` (:func:`choose_precision`)
    and ``--dtype auto`` (:func:`auto_dtype`) both rest on, so their lines give the same reason."""
    dev = torch.device(device)
    if dev.type == "cuda":
        ok = torch.cuda.is_available() and torch.cuda.is_bf16_supported(including_emulation=False)
        return ok, "GPU supports bf16" if ok else "GPU has no bf16 support"
    if dev.type != "cpu":
        return False, f"bf16 not measured on {dev.type}"
    info = cpu if cpu is not None else cpu_bf16()
    if info.native:
        return True, f"CPU has native bf16: {', '.join(info.flags)}"
    if info.source == "unknown":
        return False, "CPU bf16 support unknown"
    return False, "CPU has no native bf16"


# ---------------------------------------------------------------------------- weights dtype
DTYPE_NAMES = ("auto", "float32", "bfloat16", "float16")  # what the CLI's --dtype takes


@dataclass(frozen=True)
class DtypeChoice:
    """The dtype a model loads in: ``dtype``, ``why`` in words, ``auto`` when ``--dtype auto``
    (``dtype="auto"``) chose it, ``emulated`` when it is bf16 on a CPU without native bf16 (it
    runs, converted to fp32 op by op: slower than fp32)."""

    dtype: torch.dtype
    why: str
    auto: bool = False
    emulated: bool = False

    @property
    def name(self) -> str:
        """``"bfloat16"``, ``"float32"``, ..."""
        return str(self.dtype).removeprefix("torch.")

    def line(self) -> str:
        """``dtype: bfloat16 (auto: CPU has native bf16: avx512_bf16)``, ``dtype: float32 (auto:
        CPU has no native bf16)``, ``dtype: bfloat16 (as asked)``."""
        return f"dtype: {self.name} ({'auto: ' if self.auto else ''}{self.why})"

    def warning(self) -> str | None:
        """One line when the choice is slow here (bf16 emulated on this CPU), else None."""
        return _emulated(self.name, "float32, what --dtype auto takes here") if self.emulated else None


def auto_dtype(device: torch.device | str | None = None, cpu: CpuBf16 | None = None) -> DtypeChoice:
    """What ``dtype="auto"`` loads in on ``device`` (None: the CPU): bfloat16 where bf16 is native
    (:func:`bf16_native`: a CPU with AVX-512 BF16 or AMX, a CUDA GPU with bf16), float32
    elsewhere. The arithmetic that needs fp32 stays fp32 in a bf16 model (RMSNorm's statistics,
    the MoE router, V4's mHC and its Sinkhorn: :class:`KeepFloat32`, :class:`Float32Linear`)."""
    native, why = bf16_native(resolve_device(device), cpu)
    return DtypeChoice(torch.bfloat16 if native else torch.float32, why, auto=True)


def choose_dtype(requested: object, device: torch.device | str | None = None,
                 cpu: CpuBf16 | None = None) -> DtypeChoice:
    """The dtype for ``requested`` (``"auto"``, a floating dtype or its name) on ``device``
    (None: the CPU): :func:`auto_dtype` for "auto", else that dtype "as asked", marked
    ``emulated`` when it is bf16 on a CPU without native bf16 (allowed: the CLI warns). A bad
    name or device is a ConfigError."""
    dev = resolve_device(device)
    if requested == "auto":
        return auto_dtype(dev, cpu)
    dtype = resolve_dtype(requested)
    return DtypeChoice(dtype, "as asked", emulated=dtype == torch.bfloat16 and emulated_bf16(dev, cpu))
