"""Compile every Triton kernel for real GPUs without one (``latentattn kernels compile``).

``triton.compile(ASTSource(fn, signature, constexprs, attrs), target=GPUTarget("cuda", arch, 32))``
runs Triton's whole pipeline down to a cubin through the ptxas that ships in the triton wheel,
on a machine with no GPU, which the interpreter (``TRITON_INTERPRET=1``) does not: it proves the
kernel lowers for that architecture, and reports its shared memory (Triton's metadata) and its
registers and spills (``cuobjdump -res-usage``, also in the wheel). What it compiles is what
launches: each configuration is the launcher's own :class:`~latentattn.kernels.triton_launch.Launch`,
built on meta tensors, specialised as Triton's runtime specialises it, with its warps and
pipeline stages. The configurations: DeepSeek-V3's attention (128 heads over a 512 + 64 latent
row) and a converted SmolLM2-135M's (9 heads, 128 + 64); dense decode over bf16 rows and
FlashMLA's fp8 records, contiguous and in 64-token pages, with one split and with four; sparse
attention's forward (prefill, split decode, fp8 records) and backward in bf16; V3.2's indexer
with bf16 and fp8 keys (fp8 is decoded in software, so it compiles for sm_80 too).
"""

from __future__ import annotations

import re
import subprocess
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import torch

from latentattn.cache.fp8 import record_bytes
from latentattn.errors import ConfigError

if TYPE_CHECKING:  # importing it needs Triton
    from latentattn.kernels.triton_launch import Launch

# Per-block shared memory a kernel may use (bytes; CUDA C Programming Guide, compute capability
# table: 163 KB on sm_80, 227 KB on sm_90) and registers per thread (255 on both).
ARCHS = {"sm_80": (80, 166912), "sm_90": (90, 232448)}
MAX_REGS = 255
# (latent rank, rope dims, query heads): DeepSeek-V3's attention, and SmolLM2-135M converted.
CACHE_SHAPES = {"deepseek-v3 / v3.2": (512, 64, 128), "smollm2-135m converted": (128, 64, 9)}
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


def _jobs() -> list[tuple[str, str, Launch]]:
    """(kernel, configuration, launch) for every configuration compiled: each launch is built by
    the launcher itself, on meta tensors of the shapes it names, so that the compile sees the
    kernel's real arguments, constexprs, warps and pipeline stages."""
    from latentattn.kernels import triton_indexer as ix
    from latentattn.kernels import triton_mla as k
    from latentattn.kernels import triton_sparse as sp

    def t(*shape: int, dtype: torch.dtype = torch.bfloat16) -> torch.Tensor:
        return torch.empty(*shape, dtype=dtype, device="meta")

    jobs: list[tuple[str, str, Launch]] = []
    batch, ctx, topk, tokens = 4, 4096, 2048, 4096
    for name, (rank, rope, heads) in CACHE_SHAPES.items():
        width = rank + rope
        q = t(batch, heads, width)
        lengths = t(batch, dtype=torch.int32)
        table = t(batch, ctx // PAGE, dtype=torch.int32)
        merged = False
        # bf16 latent rows, and FlashMLA's fp8 record (e4m3 latent decoded in software, fp32
        # scales, bf16 rope: the KV pointer is then bytes); each contiguous and in pages; with
        # one split (stage 1 writes o in q's dtype) and with four (fp32 partials, then merged).
        for fp8 in (False, True):
            row = t(1, 1, record_bytes(rank, rope), dtype=torch.uint8) if fp8 else t(1, 1, width)
            for paged in (False, True):
                shape = (batch * ctx // PAGE, PAGE) if paged else (batch, ctx)
                kv = row.expand(*shape, row.shape[-1]).contiguous()
                for splits in (1, 4):
                    launches, _, _ = k.decode_launches(q, kv, lengths, 0.1, rank,
                                                       table if paged else None, splits, ctx, fp8)
                    where = f"{PAGE}-token pages" if paged else "contiguous"
                    how = "one split, bf16 out" if splits == 1 else "4 splits, fp32 partials"
                    jobs.append(("mla_decode_stage1", f"{name}, R {rank} + {rope}, {where}, "
                                 f"{'fp8 record' if fp8 else 'bf16'}, {how}", launches[0]))
                    if len(launches) > 1 and not merged:
                        merged = True
                        jobs.append(("mla_decode_stage2", f"{name}, R {rank}, 4 splits, bf16",
                                     launches[1]))
        kv = t(1, ctx, width)
        records = t(1, ctx, record_bytes(rank, rope), dtype=torch.uint8)
        one, prefill = t(1, heads, 1, width), t(1, heads, tokens, width)
        sel1, sel = t(1, 1, topk, dtype=torch.int32), t(1, tokens, topk, dtype=torch.int32)
        where = f"{name}, R {rank} + {rope}, top-k {topk} in tiles of {sp.BLOCK_K}"
        for how, launch in (
                ("bf16 prefill", sp.fwd_launches(prefill, kv, sel, 0.1, rank)[0][0]),
                ("bf16 decode, 4 splits (fp32 partials)",
                 sp.fwd_launches(one, kv, sel1, 0.1, rank, 4)[0][0]),
                ("fp8 records decode", sp.fwd_launches(one, records, sel1, 0.1, rank, 1, True)[0][0]),
                ("fp8 records decode, 4 splits (fp32 partials)",
                 sp.fwd_launches(one, records, sel1, 0.1, rank, 4, True)[0][0])):
            jobs.append(("sparse_mla_fwd", f"{where}, {how}", launch))
        o, lse = t(1, heads, tokens, rank), t(1, heads, tokens, dtype=torch.float32)
        bwd = sp.bwd_launch(prefill, kv, sel, o, lse, o, 0.1, rank)[0]
        jobs.append(("sparse_mla_bwd", f"{where}, bf16 prefill", bwd))
    # DeepSeek-V3.2's indexer: 64 heads of 128, keys in bf16 or fp8 (e4m3 bytes + fp32 scales),
    # at decode (one query token over 32k keys).
    qi, wi = t(1, 1, 64, 128, dtype=torch.float32), t(1, 1, 64, dtype=torch.float32)
    pos = t(1, 1, dtype=torch.int32)
    for keys, key, scale in (("bf16", t(1, 32768, 128), None),
                             ("fp8 e4m3", t(1, 32768, 128, dtype=torch.uint8),
                              t(1, 32768, 1, dtype=torch.float32))):
        jobs.append(("indexer_logits", f"deepseek-v3.2, 64 heads x 128, {keys} keys, decode",
                     ix.indexer_launch(qi, wi, key, scale, pos, 0.1)[0]))
    return jobs


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
        for kernel, config, launch in _jobs():
            try:
                sig, consts, attrs = launch.specialisation()
                out = triton.compile(ASTSource(launch.fn, sig, consts, attrs),
                                     target=GPUTarget("cuda", cc, 32),
                                     options={"num_warps": launch.num_warps,
                                              "num_stages": launch.num_stages})
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
