"""Which implementation runs MLA's kernels: ``triton`` or ``torch``, chosen once.

The default is Triton when CUDA is available and ``triton`` imports, PyTorch everywhere else,
so CPU users see no change. ``LATENTATTN_BACKEND=triton|torch`` (read at import) or
:func:`set_backend` / :func:`use_backend` (an argument, for tests and scripts) force one.
Forcing ``triton`` on CPU tensors needs ``TRITON_INTERPRET=1`` set before Triton is imported:
the kernels then run in Triton's interpreter, slowly but exactly (fp32), so a whole tiny model
can generate through them. Without it, a forced ``triton`` on CPU tensors is an error, not a
silent fallback.
"""

from __future__ import annotations

import importlib.util
import os
from collections.abc import Iterator
from contextlib import contextmanager

import torch

from latentattn.errors import ConfigError

BACKENDS = ("triton", "torch")


def _default() -> str:
    env = os.environ.get("LATENTATTN_BACKEND")
    if env:
        if env not in BACKENDS:
            raise ConfigError(f"LATENTATTN_BACKEND must be one of {', '.join(BACKENDS)}, got {env!r}")
        return env
    return "triton" if torch.cuda.is_available() and triton_available() else "torch"


def triton_available() -> bool:
    return importlib.util.find_spec("triton") is not None


_backend: str | None = None


def get_backend() -> str:
    global _backend
    if _backend is None:
        _backend = _default()
    return _backend


def set_backend(name: str) -> None:
    global _backend
    if name not in BACKENDS:
        raise ConfigError(f"unknown kernel backend {name!r}; known: {', '.join(BACKENDS)}")
    if name == "triton" and not triton_available():
        raise ConfigError("the triton backend needs Triton: pip install 'latentattn[gpu]'")
    _backend = name


@contextmanager
def use_backend(name: str) -> Iterator[None]:
    """Run the block with the ``name`` backend, then restore the previous one."""
    before = get_backend()
    set_backend(name)
    try:
        yield
    finally:
        set_backend(before)


def runs_triton(t: torch.Tensor) -> bool:
    """Whether a kernel on ``t`` runs in Triton: the backend is triton, and ``t`` is on CUDA or
    the interpreter is on."""
    if get_backend() != "triton":
        return False
    if t.is_cuda or os.environ.get("TRITON_INTERPRET") == "1":
        return True
    raise ConfigError(f"the triton backend runs on CUDA tensors (or in the interpreter with "
                      f"TRITON_INTERPRET=1); these are on {t.device}: set LATENTATTN_BACKEND=torch")


__all__ = ["BACKENDS", "get_backend", "runs_triton", "set_backend", "triton_available", "use_backend"]
