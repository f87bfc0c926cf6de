"""Compile every Triton kernel for real GPUs without one (``latentattn kernels compile``).

``triton.compile(ASTSource(fn, signature, constexprs), target=GPUTarget("cuda", arch, 32))``
runs Triton's whole pipeline down to a cubin through the ptxas that ships in the triton wheel,
on a machine with no GPU, which the interpreter (``TRITON_INTERPRET=1``) does not: it proves the
kernel lowers for that architecture, and reports its shared memory (Triton's metadata) and its
registers and spills (``cuobjdump -res-usage``, also in the wheel). The configurations are the
ones the library launches: the cache shapes of the DeepSeek models (V2-Lite, V3 and V3.2 share
a 512 + 64 latent row) and of a converted SmolLM2-135M (128 + 64), contiguous and in 64-token
pages, bf16, and FlashMLA's fp8 record, for dense decode; sparse attention (forward and
backward) in bf16; V3.2's indexer with bf16 and fp8 keys (fp8 is decoded in software, so it
compiles for sm_80 too).
"""

from __future__ import annotations

import re
import subprocess
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from latentattn.errors import ConfigError

# Per-block shared memory a kernel may use (bytes; CUDA C Programming Guide, compute capability
# table: 163 KB on sm_80, 227 KB on sm_90) and registers per thread (255 on both).
ARCHS = {"sm_80": (80, 166912), "sm_90": (90, 232448)}
MAX_REGS = 255
CACHE_SHAPES = {"deepseek-v2-lite / v3 / v3.2": (512, 64), "smollm2-135m converted": (128, 64)}
PAGE = 64


@dataclass
class Compiled:
    kernel: str
    config: str
    arch: str
    ok: bool
    shared_bytes: int = 0
    registers: int = 0
    spill_bytes: int = 0  # stack + local memory a thread uses: registers that did not fit
    error: str = ""

    @property
    def within_limits(self) -> bool:
        return self.ok and self.shared_bytes <= ARCHS[self.arch][1] and self.registers <= MAX_REGS


def parse_archs(text: str) -> list[str]:
    archs = [a.strip() for a in text.split(",") if a.strip()]
    bad = [a for a in archs if a not in ARCHS]
    if bad or not archs:
        raise ConfigError(f"--arch takes a comma-separated list of {', '.join(ARCHS)}; got {text!r}")
    return archs


def _jobs() -> list[tuple[str, str, object, dict[str, str], dict[str, object], int]]:
    """(kernel, config, fn, signature, constexprs, num_warps) for every launched configuration."""
    from latentattn.kernels import triton_indexer as ix
    from latentattn.kernels import triton_mla as k
    from latentattn.kernels import triton_sparse as sp

    jobs: list[tuple[str, str, object, dict[str, str], dict[str, object], int]] = []
    dtype, ptr = torch.bfloat16, "*bf16"
    pointers = {"Q": ptr, "KV": ptr, "LENGTHS": "*i32", "TABLE": "*i32", "O_PART": "*fp32",
                "LSE_PART": "*fp32", "OUT": ptr, "LSE": "*fp32", "IDX": "*i32", "DO": ptr,
                "DELTA": "*fp32", "DQ": "*fp32", "DKV": "*fp32"}
    for name, (rank, rope) in CACHE_SHAPES.items():
        # bf16 latent rows, and FlashMLA's fp8 record (e4m3 latent decoded in software, fp32
        # scales, bf16 rope: the KV pointer is then bytes); each contiguous and in pages.
        for fp8 in (False, True):
            for paged in (False, True):
                consts = k.decode_constexprs(rank, rope, PAGE if paged else 1, paged, dtype, fp8=fp8)
                sig = _signature(k.mla_decode_stage1, {**pointers, "KV": "*u8"} if fp8 else pointers,
                                 consts, floats={"sm_scale_log2"})
                where = f"{PAGE}-token pages" if paged else "contiguous"
                jobs.append(("mla_decode_stage1",
                             f"{name}, R {rank} + {rope}, {where}, {'fp8 record' if fp8 else 'bf16'}",
                             k.mla_decode_stage1, sig, consts, k.decode_warps(rank)))
        consts = k.decode_constexprs(rank, rope, 1, False, dtype)
        consts2: dict[str, object] = {"RANK": rank, "BLOCK_R": consts["BLOCK_R"], "BLOCK_S": 16}
        sig2 = _signature(k.mla_decode_stage2, pointers, consts2, floats=set())
        jobs.append(("mla_decode_stage2", f"{name}, R {rank}, up to 16 splits, bf16",
                     k.mla_decode_stage2, sig2, consts2, 4))
        fwd, fwd8 = (sp.sparse_fwd_constexprs(rank, rope, dtype, fp8) for fp8 in (False, True))
        bwd = sp.sparse_constexprs(rank, rope, dtype)
        split = {**pointers, "OUT": "*fp32"}  # decode at small batch: fp32 partials for the merge
        for kernel, fn, consts, floats, how, ptrs in (
                ("sparse_mla_fwd", sp.sparse_mla_fwd, fwd, {"sm_scale_log2"}, "bf16", pointers),
                ("sparse_mla_fwd", sp.sparse_mla_fwd, fwd, {"sm_scale_log2"},
                 "bf16, split top-k (fp32 partials)", split),
                ("sparse_mla_fwd", sp.sparse_mla_fwd, fwd8, {"sm_scale_log2"},
                 "fp8 records, split top-k (fp32 partials)", {**split, "KV": "*u8"}),
                ("sparse_mla_bwd", sp.sparse_mla_bwd, bwd, {"sm_scale"}, "bf16", pointers)):
            jobs.append((kernel, f"{name}, R {rank} + {rope}, top-k tiles of {sp.BLOCK_K}, {how}", fn,
                         _signature(fn, ptrs, consts, floats), consts, sp.sparse_warps(rank)))
    # DeepSeek-V3.2's indexer: 64 heads of 128, keys in bf16 or fp8 (e4m3 bytes + fp32 scales).
    for keys, fp8 in (("bf16", False), ("fp8 e4m3", True)):
        ic: dict[str, object] = {"DIM": 128, "BLOCK_D": 128, "BLOCK_HI": 64, "BLOCK_S": ix.BLOCK_S,
                                 "FP8": fp8, "QBLOCK": 128, "DOT_BF16": True}
        iptr = {"Q": "*fp32", "W": "*fp32", "K": "*u8" if fp8 else ptr, "KSCALE": "*fp32",
                "POS": "*i32", "OUT": "*fp32"}
        jobs.append(("indexer_logits", f"deepseek-v3.2, 64 heads x 128, {keys} keys",
                     ix.indexer_logits_kernel, _signature(ix.indexer_logits_kernel, iptr, ic, {"scale"}),
                     ic, 4))
    return jobs


def _signature(fn: Any, pointers: dict[str, str], consts: dict[str, object],
               floats: set[str]) -> dict[str, str]:
    names: list[str] = fn.arg_names
    return {n: "constexpr" if n in consts else pointers.get(n, "fp32" if n in floats else "i32")
            for n in names}


def _resources(cubin: bytes) -> tuple[int, int]:
    """(registers, spill bytes) of the cubin's one function, from cuobjdump -res-usage."""
    from triton.backends.nvidia import compiler as nv

    tool = Path(nv.__file__).parent / "bin" / "cuobjdump"
    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(cubin)
        f.flush()
        text = subprocess.run([str(tool), "-res-usage", f.name], capture_output=True, text=True,
                              check=True).stdout
    regs = re.search(r"REG:(\d+)", text)
    stack = re.search(r"STACK:(\d+)", text)
    local = re.search(r"LOCAL:(\d+)", text)
    spill = sum(int(m.group(1)) for m in (stack, local) if m)
    return (int(regs.group(1)) if regs else 0), spill


def compile_all(archs: list[str]) -> list[Compiled]:
    """Compile every kernel configuration for each of ``archs`` (see the module docstring)."""
    import os

    # Triton 3.9 warns that its FP-fusion default will change; keep today's (fused) explicitly.
    os.environ.setdefault("TRITON_DEFAULT_FP_FUSION", "1")
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    results = []
    for arch in archs:
        cc = ARCHS[arch][0]
        for kernel, config, fn, sig, consts, warps in _jobs():
            try:
                out = triton.compile(ASTSource(fn, sig, consts), target=GPUTarget("cuda", cc, 32),
                                     options={"num_warps": warps, "num_stages": 2})
                regs, spill = _resources(out.asm["cubin"])
                results.append(Compiled(kernel, config, arch, True, int(out.metadata.shared), regs,
                                        spill))
            except Exception as e:  # a kernel that does not lower is a result, not a crash
                detail = " ".join(line.strip() for line in str(e).splitlines() if line.strip())
                results.append(Compiled(kernel, config, arch, False, error=detail[:300]))
    return results


def compile_table(results: list[Compiled]) -> str:
    lines = ["| kernel | configuration | arch | shared B (limit) | registers | spills B | status |",
             "|---|---|---|---:|---:|---:|---|"]
    for r in results:
        status = (("ok, spills" if r.spill_bytes else "ok") if r.within_limits else "over the limit"
                  ) if r.ok else f"FAILED: {r.error}"
        lines.append(f"| {r.kernel} | {r.config} | {r.arch} | {r.shared_bytes:,} "
                     f"({ARCHS[r.arch][1]:,}) | {r.registers} | {r.spill_bytes} | {status} |")
    return "\n".join(lines)


__all__ = ["ARCHS", "CACHE_SHAPES", "Compiled", "compile_all", "compile_table", "parse_archs"]
