"""``latentattn kernels compile``: compile every Triton kernel for real GPUs, here, without one
(:mod:`latentattn.kernels.compile`)."""

from __future__ import annotations

import argparse
import importlib.util
from typing import Any

from latentattn.cli.common import UserError

GPU_HINT = "pip install 'latentattn[gpu]'"


def cmd_compile(args: argparse.Namespace) -> int:
    import os

    from latentattn.kernels.compile import compile_all, compile_table, parse_archs

    archs = parse_archs(args.arch)
    if importlib.util.find_spec("triton") is None:
        raise UserError(f"kernels compile needs Triton ({GPU_HINT})")
    if os.environ.get("TRITON_INTERPRET") == "1":
        raise UserError("TRITON_INTERPRET=1 replaces the kernels by the interpreter, which cannot "
                        "compile them: unset it")
    results = compile_all(archs)
    print(compile_table(results))
    bad = [r for r in results if not r.within_limits]
    print(f"{len(results) - len(bad)} of {len(results)} kernel configurations compiled within the "
          f"limits of {', '.join(archs)}")
    return 1 if bad else 0


def register(sub: Any) -> None:
    p = sub.add_parser("kernels", help="the Triton kernels: compile them for real GPUs",
                       description="The Triton kernels (pip install 'latentattn[gpu]').")
    ksub = p.add_subparsers(dest="kernels_command", required=True, metavar="ACTION")
    c = ksub.add_parser(
        "compile", help="compile every kernel for sm_80 / sm_90, no GPU needed",
        description="Compile every Triton kernel at the configurations latentattn launches "
        "(DeepSeek's 512 + 64 latent row and a converted SmolLM2's 128 + 64; dense decode over "
        "bf16 rows and FlashMLA's fp8 records, contiguous and in 64-token pages; sparse attention "
        "forward, split forward and backward; V3.2's indexer with bf16 and fp8 keys) for each "
        "--arch with Triton's own compiler and ptxas, on this "
        "machine whether or not it has a GPU, and print each kernel's shared memory, registers "
        "and spills against the architecture's limits. Exit status 1 if any configuration fails "
        "to compile or exceeds a limit.")
    c.add_argument("--arch", default="sm_80,sm_90", metavar="ARCHS",
                   help="comma-separated target architectures (sm_80,sm_90)")
    c.set_defaults(func=cmd_compile)


__all__ = ["cmd_compile", "register"]
