"""Compiling a model from outside: ``latentattn.compile(model)``.

gpt-fast's recipe (pytorch-labs/gpt-fast ``generate.py``): the model stays plain PyTorch, the
caller compiles the two functions generation calls, a prefill and a one-token decode step. The
decode step can be compiled once because nothing in it depends on data: the cache's buffers have
a fixed size, each step reads the whole capacity under a mask built from the positions, and the
host plans each step from counts it already holds (:class:`latentattn.cache.kv.KVCache`), so no
``.item()`` or ``bool(tensor)`` stops the graph. :func:`forbid_host_sync` proves it on any device.

After ``compile(model)``, ``model(ids, cache)`` and :func:`latentattn.model.generate.generate`
run the compiled steps; the first call of each pays the cold compile (tens of seconds on a CPU).
"""

from __future__ import annotations

import functools
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import torch

from latentattn.cache.kv import KVCache
from latentattn.cache.step import Step
from latentattn.config import V4AttentionConfig
from latentattn.errors import ConfigError
from latentattn.kernels.backend import get_backend
from latentattn.model.transformer import CompiledSteps, Transformer

__all__ = ["HostSyncError", "compile", "compiler_error", "forbid_host_sync", "static_decode"]


# A one-token decode step is a chain of matrix-vector products. Inductor's decompose_mm_pass turns
# each (1, K) x (K, N) product into a multiply and a K-reduction that it generates itself, which
# streams the weights about twice as fast as the BLAS GEMV on the CPU measured (SmolLM2-135M decode
# at 2k tokens, fp32: 35 ms a token against 58 eager, 2-core AMD EPYC, torch 2.13). Its CPU limit on
# K and N (2,048 by default) is lifted so that the LM head (576 x 49,152 there) is decomposed too.
CPU_DECODE_OPTIONS: dict[str, Any] = {
    "post_grad_fusion_options": {"decompose_mm_pass": {"cpu_max_other_dimension_decomposition": 1 << 20}},
}


def compiler_error() -> str | None:
    """Why torch.compile cannot build CPU kernels here (no C++ compiler), or None when it can."""
    try:
        from torch._inductor.cpp_builder import get_cpp_compiler

        get_cpp_compiler()
    except Exception as err:  # inductor raises several kinds when no compiler is found
        return f"torch.compile needs a C++ compiler for CPU kernels and found none ({err})"
    return None


def static_decode(model: Transformer) -> bool:
    """Whether the model's decode step is one graph with no host sync: every attention and cache
    but DeepSeek-V4's, with dense FFNs (a MoE's eval path visits only the experts its tokens chose,
    which the host must read back)."""
    cfg = model.config
    return cfg.moe is None and not isinstance(cfg.attention, V4AttentionConfig)


def _decode(model: Transformer, ids: torch.Tensor, step: Step, cache: KVCache | None,
            at: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor | None]:
    return model.run(ids, step, cache, at)


def _prefill(model: Transformer, ids: torch.Tensor, step: Step, cache: KVCache | None,
             at: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor | None]:
    return model.run(ids, step, cache, at)


def compile(model: Transformer, *, fullgraph: bool | None = None, **options: Any) -> Transformer:
    """Compile ``model``'s prefill and decode steps (module docstring); returns the model.

    The decode step is compiled for fixed shapes (its cache is static: ``make_cache`` builds one
    for a compiled model), on a CPU with :data:`CPU_DECODE_OPTIONS` unless ``mode`` or
    ``options`` are given; the prefill for any prompt length. Compile a model in its row-major
    layout, not after :func:`latentattn.model.layout.decode_layout` (the eager path's layout,
    which the generated reductions stream slower). ``fullgraph`` (default: whether
    :func:`static_decode` holds) makes a graph break in the decode step an error. ``options``
    go to ``torch.compile`` (``mode``, ``backend``, ...). Raises ConfigError when the compiler is
    missing."""
    backend = options.get("backend", "inductor")
    if backend == "inductor":
        reason = compiler_error()
        if reason is not None:
            raise ConfigError(reason)
    full = static_decode(model) if fullgraph is None else fullgraph
    get_backend()  # read LATENTATTN_BACKEND now: a first read inside a graph would recompile it
    decode_options = dict(options)
    if model.device.type == "cpu" and backend == "inductor" and not ({"mode", "options"} & set(options)):
        decode_options["options"] = CPU_DECODE_OPTIONS
    # Two functions, two code objects: dynamo caches compiled code per code object, so the
    # fixed-shape decode graph and the dynamic-shape prefill graph do not evict each other.
    decode = torch.compile(_decode, fullgraph=full, dynamic=False, **decode_options)
    prefill = torch.compile(_prefill, dynamic=True, **options)
    model.compiled_steps = CompiledSteps(prefill=functools.partial(prefill, model),
                                         decode=functools.partial(decode, model))
    return model


class HostSyncError(RuntimeError):
    """A tensor was read back to the host inside :func:`forbid_host_sync`."""


_SYNCS = ("item", "tolist", "__bool__", "__int__", "__float__", "__index__")


@contextmanager
def forbid_host_sync() -> Iterator[None]:
    """Inside, reading a tensor's value on the host (``.item()``, ``.tolist()``, ``bool(t)``,
    ``int(t)``, ``float(t)``) raises :class:`HostSyncError`. CUDA has
    ``torch.cuda.set_sync_debug_mode``; this works on any device, the CPU included, so a test
    can prove that a decode step never waits on its device."""
    saved = {name: getattr(torch.Tensor, name) for name in _SYNCS}

    def refuse(name: str) -> Any:
        def method(self: torch.Tensor, *args: Any, **kwargs: Any) -> Any:
            raise HostSyncError(f"Tensor.{name} read a {tuple(self.shape)} tensor back to the host")
        return method

    for name in _SYNCS:
        setattr(torch.Tensor, name, refuse(name))
    try:
        yield
    finally:
        for name, method in saved.items():
            setattr(torch.Tensor, name, method)
