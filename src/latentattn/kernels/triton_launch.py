"""A Triton launch as data: the kernel, its grid, its arguments and its launch options, built
once by the launcher and used twice, to run it and (``latentattn kernels compile``) to compile
exactly what runs, with the runtime's own specialisation of the arguments. Importing this
module needs Triton."""

from __future__ import annotations

from contextlib import AbstractContextManager, nullcontext
from dataclasses import dataclass
from typing import Any

import torch

from latentattn.errors import ConfigError
from latentattn.kernels.mla_decode import GRID_YZ

# CUDA's grid limits (CUDA C Programming Guide, "Features and Technical Specifications"): x up
# to 2^31 - 1 blocks, y and z up to 65,535.
GRID_LIMITS = (2**31 - 1, GRID_YZ, GRID_YZ)
# Triton's default software-pipelining depth on NVIDIA GPUs (CUDAOptions.num_stages), written
# out where a launch uses it, so that the compile check compiles the same pipeline.
DEFAULT_STAGES = 3


@dataclass
class Launch:
    """``fn[grid](*args, **constexprs, num_warps=..., num_stages=...)`` on the tensors' device."""

    fn: Any  # a @triton.jit function
    grid: tuple[int, ...]
    args: tuple[Any, ...]  # the kernel's leading, non-constexpr parameters, in order
    constexprs: dict[str, Any]
    num_warps: int
    num_stages: int = DEFAULT_STAGES

    @property
    def name(self) -> str:
        return str(self.fn.__name__)

    def __post_init__(self) -> None:
        for axis, (size, most) in enumerate(zip(self.grid, GRID_LIMITS, strict=False)):
            if size > most:
                raise ConfigError(f"{self.name} needs {size:,} programs on grid axis {axis}, past "
                                  f"CUDA's limit of {most:,}: call it on smaller pieces (fewer "
                                  f"sequences or tokens), or use the PyTorch backend")

    def run(self) -> None:
        with device_guard(self.args):
            self.fn[self.grid](*self.args, **self.constexprs, num_warps=self.num_warps,
                               num_stages=self.num_stages)

    def specialisation(self) -> tuple[dict[str, str], dict[str, Any], dict[tuple[int, ...], Any]]:
        """(signature, constexprs, attrs) for ``triton.compile(ASTSource(...))``, as Triton's
        runtime binder derives them from these arguments (runtime/jit.py): an int equal to 1
        becomes a constant, a pointer or an int divisible by 16 carries tt.divisibility 16."""
        from triton._C.libtriton import native_specialize_impl
        from triton.backends.compiler import BaseBackend

        names: list[str] = self.fn.arg_names
        signature: dict[str, str] = {}
        constexprs: dict[str, Any] = dict(self.constexprs)
        attrs: dict[tuple[int, ...], Any] = {}
        for i, name in enumerate(names):
            if name in self.constexprs:
                signature[name] = "constexpr"
                continue
            arg = self.args[i]
            specialise = not isinstance(arg, (float, bool))  # as the binder: floats and bools not
            kind, attr = native_specialize_impl(BaseBackend, arg, False, specialise, True)
            signature[name] = kind
            if kind == "constexpr":
                constexprs[name] = attr
            elif isinstance(attr, str) and "D" in attr:
                attrs[(i,)] = [["tt.divisibility", 16]]
        return signature, constexprs, attrs


def device_guard(args: tuple[Any, ...]) -> AbstractContextManager[Any]:
    """Launch on the device of the first CUDA tensor among ``args``, not the current device:
    with tensors on cuda:1 a plain launch would run on cuda:0."""
    for a in args:
        if isinstance(a, torch.Tensor) and a.is_cuda:
            return torch.cuda.device(a.device)
    return nullcontext()


def run_all(launches: list[Launch]) -> None:
    for launch in launches:
        launch.run()


__all__ = ["DEFAULT_STAGES", "GRID_LIMITS", "Launch", "device_guard", "run_all"]
