"""Which implementation runs attention: one choice, made by the tensors' device unless forced.

``auto`` (the default): the Triton kernels for CUDA tensors when ``triton`` imports (absorbed MLA
decode, DSA's indexer and sparse attention), PyTorch for every other tensor (SDPA for dense
attention, the gathered ``sparse_mqa`` for DSA). A CPU model on a GPU machine therefore still
runs on PyTorch, and a CUDA model on a machine without Triton too.

Forced, with :func:`set_backend`, :func:`use_backend` or ``LATENTATTN_BACKEND`` (read once, at
the first call):

* ``sdpa``: PyTorch everywhere, dense attention through the fused SDPA kernels;
* ``reference``: PyTorch everywhere, dense attention through the obviously-correct fp32
  softmax the tests compare against;
* ``triton``: the Triton kernels wherever one exists (dense prefill still runs SDPA). CUDA tensors
  run them compiled; CPU tensors only in Triton's interpreter (``TRITON_INTERPRET=1`` set before
  Triton is imported), slowly but in exact fp32, so a whole tiny model can generate through the
  kernels without a GPU. Without the interpreter, a forced ``triton`` on CPU tensors is an error
  that says what to use instead, not a silent fallback.
"""

from __future__ import annotations

import importlib.util
import os
from collections.abc import Iterator
from contextlib import contextmanager

import torch

from latentattn.errors import ConfigError

BACKENDS = ("auto", "sdpa", "reference", "triton")
ENV = "LATENTATTN_BACKEND"

_forced: str | None = None  # None: not yet read from the environment


def triton_available() -> bool:
    return importlib.util.find_spec("triton") is not None


def interpreting() -> bool:
    """Whether Triton runs kernels in its interpreter (numpy on the host, any tensor device)."""
    return os.environ.get("TRITON_INTERPRET") == "1"


def _check(name: str, source: str) -> str:
    if name not in BACKENDS:
        raise ConfigError(f"{source} must be one of {', '.join(BACKENDS)}, got {name!r}")
    if name == "triton" and not triton_available():
        raise ConfigError("the triton backend needs Triton: pip install 'latentattn[gpu]'")
    return name


def get_backend() -> str:
    """The chosen backend: ``auto`` unless one was forced (module docstring)."""
    global _forced
    if _forced is None:
        _forced = _check(os.environ.get(ENV) or "auto", ENV)
    return _forced


def set_backend(name: str) -> None:
    """Force ``name`` (one of :data:`BACKENDS`) for every later call; ``auto`` undoes it."""
    global _forced
    _forced = _check(name, "the backend")


@contextmanager
def use_backend(name: str) -> Iterator[None]:
    """Run the block with the ``name`` backend, then restore the previous choice."""
    before = get_backend()
    set_backend(name)
    try:
        yield
    finally:
        set_backend(before)


def runs_triton(t: torch.Tensor) -> bool:
    """Whether a kernel on ``t`` runs in Triton: ``auto`` and ``t`` on CUDA with Triton
    installed, or ``triton`` forced and ``t`` on CUDA or the interpreter on."""
    name = get_backend()
    if name == "auto":
        return t.is_cuda and triton_available()
    if name != "triton":
        return False
    if t.is_cuda or interpreting():
        return True
    raise ConfigError(f"the triton backend runs on CUDA tensors (or on CPU tensors in Triton's "
                      f"interpreter, TRITON_INTERPRET=1); these are on {t.device}: use the "
                      f"auto or sdpa backend ({ENV}=auto)")


def dense_reference() -> bool:
    """Whether dense attention runs the fp32 reference softmax instead of SDPA."""
    return get_backend() == "reference"


def check_device_backend(device: torch.device | str) -> None:
    """Up-front check for a command about to run on ``device``: a forced ``triton`` backend needs
    CUDA there or the interpreter, else one clear error before any work is done."""
    if get_backend() != "triton" or interpreting():
        return
    try:
        dev = torch.device(device)
    except RuntimeError:
        return  # not a device name at all: the model loader says so, in its own words
    if dev.type != "cuda":
        raise ConfigError(f"the triton backend runs on CUDA devices (or on the CPU in Triton's "
                          f"interpreter, TRITON_INTERPRET=1), not on {dev}: use --backend auto "
                          f"or sdpa, or --device cuda")


__all__ = ["BACKENDS", "ENV", "check_device_backend", "dense_reference", "get_backend",
           "interpreting", "runs_triton", "set_backend", "triton_available", "use_backend"]
