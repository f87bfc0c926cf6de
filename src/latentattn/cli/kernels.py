"""``latentattn kernels compile``: compile every Triton kernel for real GPUs, here, without one
(:mod:`latentattn.kernels.compile`). ``latentattn kernels check``: on a CUDA GPU, the GPU tests
and a short benchmark into one JSON (:mod:`latentattn.bench.gpu_check`; ``make gpu-check``)."""

from __future__ import annotations

import argparse
import importlib.util
import sys
from pathlib import Path
from typing import Any

from latentattn.cli.common import UserError, add_deprecated, int_list

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


def cmd_check(args: argparse.Namespace) -> int:
    import os

    import torch

    from latentattn.bench import gpu_check
    from latentattn.io import check_parent

    if not torch.cuda.is_available():  # not an error: the one command runs anywhere, checks here
        print(gpu_check.NO_CUDA)
        return 0
    if importlib.util.find_spec("triton") is None:
        raise UserError(f"kernels check needs Triton ({GPU_HINT})")
    if os.environ.get("TRITON_INTERPRET") == "1":
        # The tests' subprocess gets TRITON_INTERPRET=0, but the bench runs in this process,
        # where the interpreter would replace the compiled kernels (and time numpy).
        raise UserError("TRITON_INTERPRET=1 replaces the kernels by the interpreter: unset it to "
                        "check the compiled kernels")
    if args.timeout <= 0:
        raise UserError(f"--timeout must be positive, got {args.timeout:g}")
    if args.index_topk < 1 or args.repeats < 1:
        raise UserError("--index-topk and --repeats must be positive")
    check_parent(args.out, "--out")  # before minutes of work, not after
    opts = gpu_check.CheckOptions(
        out=Path(args.out), tests=gpu_check.find_tests(args.tests), timeout_s=args.timeout,
        bench=not args.skip_bench, batches=args.batch_sizes, contexts=args.contexts, topk=args.index_topk,
        repeats=args.repeats)
    report, kernel_report = gpu_check.run_gpu_check(opts, lambda line: print(line, file=sys.stderr))
    if kernel_report is not None:
        from latentattn.bench.kernel_report import kernel_table

        print(kernel_table(kernel_report))
    print("\n".join(gpu_check.summary(report, opts.out)))
    return 0 if report["ok"] else 1


def register(sub: Any) -> None:
    p = sub.add_parser("kernels", help="the Triton kernels: compile them for real GPUs, check them on one",
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
    k = ksub.add_parser(
        "check", help="on a CUDA GPU: the GPU tests and a short benchmark into one JSON",
        description="The one command to run on a CUDA GPU (make gpu-check). First the GPU tests "
        "(tests/test_triton_gpu.py, in a pytest subprocess with TRITON_INTERPRET=0): every kernel "
        "compiled at the launches latentattn makes (128 heads over the 512 + 64 latent row; bf16, "
        "fp16 and fp8-record decode, contiguous and in 64-token pages, batches 1 to 32, contexts "
        "to 32k; sparse attention forward, backward and split decode; prefills whose offsets pass "
        "2^31 elements; the indexer over bf16 and fp8 keys; tiny MLA and DSA models generating on "
        "CUDA), each kernel no further from a float64 reference than twice PyTorch at the kernel's "
        "precision (flash-attention's rule). "
        "Then a short bench kernels sweep. Writes ONE JSON (--out): each test's outcome, time and "
        "error figures, the bench's points, the device, the versions and the total time; it is "
        "written after the tests and again after the bench. Exit status 1 if a test failed or the "
        "bench crashed. Where there is no CUDA device it says so in one line and exits 0.")
    # auto as everywhere else; here both names mean the CUDA GPU (there is nothing to check on
    # a CPU: without CUDA the command says so and exits 0).
    k.add_argument("--device", choices=["auto", "cuda"], default="auto",
                   help="the device to check: auto (default) or cuda, the CUDA GPU (pick one with "
                   "CUDA_VISIBLE_DEVICES)")
    k.add_argument("--out", default="gpu-check.json", metavar="OUT.json",
                   help="the report (gpu-check.json)")
    k.add_argument("--timeout", type=float, default=360.0, metavar="SECONDS",
                   help="stop the GPU tests after this long (360; with the bench, sized for under "
                   "8 minutes on an H100); the report then says they were stopped")
    k.add_argument("--skip-bench", action="store_true", help="run the GPU tests only")
    k.add_argument("--batch-sizes", type=int_list, default=[1, 32], metavar="B1,B2,...",
                   help="the bench's batch sizes (1,32)")
    add_deprecated(k, "--batches", "--batch-sizes", type=int_list)
    k.add_argument("--contexts", type=int_list, default=[4096, 32768],
                   help="the bench's cached tokens per sequence (4096,32768)")
    k.add_argument("--index-topk", type=int, default=2048, metavar="K",
                   help="the bench's sparse top-k (2048)")
    add_deprecated(k, "--topk", "--index-topk", type=int)
    k.add_argument("--repeats", type=int, default=10, help="the bench's timed calls, median (10)")
    k.add_argument("--tests", default=None, metavar="PATH",
                   help="the GPU test file (default: tests/test_triton_gpu.py of this checkout)")
    k.set_defaults(func=cmd_check)


__all__ = ["cmd_check", "cmd_compile", "register"]
