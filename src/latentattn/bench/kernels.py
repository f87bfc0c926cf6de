"""``latentattn bench kernels``: the Triton kernels against the PyTorch path on one device.

Dense absorbed decode (one query token per sequence over a latent cache, every sequence at the
same context): bytes moved per step counted as FlashMLA's benchmark does, the latent ONCE (not
again as the value) plus the queries and outputs, (B S (R + Dr) + B H (R + Dr + R)) x element
size, and the achieved GB/s against the device's copy bandwidth measured here (a large
device-to-device copy reads and writes every byte: 2 x bytes / time). Sparse attention (DSA's
top-k): time and TFLOP/s, 2 B H k (R + Dr + R) per step, against the dense kernel at the same
context. The PyTorch path is what the model runs without the kernels (the fused SDPA over the
latent; for sparse, the gathered ``kernels.sparse.sparse_mqa``). On a CPU only the PyTorch path
runs (the kernels need a GPU) and the report says so; no kernel speed is claimed there.
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

import torch

from latentattn.errors import LatentAttnError
from latentattn.kernels import attention
from latentattn.kernels.sparse import sparse_mqa
from latentattn.timing import machine_info

V3_DIMS = {"heads": 128, "rank": 512, "rope": 64}  # DeepSeek-V3 / V3.2 attention, absorbed


@dataclass
class KernelPoint:
    kind: str  # "dense decode" or "sparse decode"
    impl: str  # "triton" or "torch"
    batch: int
    context: int
    topk: int | None
    median_ms: float
    bytes_moved: int
    flops: int
    gb_s: float
    tflops: float
    share_of_copy_bandwidth: float | None


@dataclass
class KernelReport:
    device: str
    dtype: str
    dims: dict[str, int]
    copy_gb_s: float
    kernels_ran: bool
    note: str
    points: list[KernelPoint] = field(default_factory=list)
    machine: dict[str, Any] = field(default_factory=machine_info)

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


def _time(fn: Callable[[], object], device: torch.device, repeats: int) -> float:
    """Median milliseconds of ``repeats`` calls after two warm-ups, synchronised on CUDA."""
    def sync() -> None:
        if device.type == "cuda":
            torch.cuda.synchronize(device)

    for _ in range(2):
        fn()
    sync()
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        sync()
        times.append((time.perf_counter() - t0) * 1e3)
    return statistics.median(times)


def copy_bandwidth(device: torch.device, nbytes: int = 1 << 30) -> float:
    """GB/s of a device-to-device copy of ``nbytes`` (read + write counted)."""
    src = torch.empty(nbytes // 4, dtype=torch.float32, device=device)
    dst = torch.empty_like(src)
    ms = _time(lambda: dst.copy_(src), device, 5)
    return 2 * nbytes / (ms * 1e-3) / 1e9


def run_kernel_bench(device: torch.device, dtype: torch.dtype, contexts: Sequence[int],
                     batches: Sequence[int], topk: int, repeats: int = 10,
                     dims: dict[str, int] | None = None,
                     progress: Callable[[str], None] | None = None) -> KernelReport:
    d = dims or V3_DIMS
    h, r, dr = d["heads"], d["rank"], d["rope"]
    kernels = device.type == "cuda"
    copy = copy_bandwidth(device, (1 << 30) if kernels else (1 << 26))
    report = KernelReport(
        device=str(device), dtype=str(dtype).removeprefix("torch."), dims=dict(d), copy_gb_s=copy,
        kernels_ran=kernels,
        note="Triton kernels and the PyTorch path, timed on the same device" if kernels else
        "CPU: only the PyTorch path ran; the Triton kernels need a GPU (no kernel speed measured)")
    for b in batches:
        for s in contexts:
            if progress is not None:
                progress(f"B={b} S={s}")
            report.points.extend(_measure(b, s, topk, h, r, dr, dtype, device, repeats, copy))
    return report


def _measure(b: int, s: int, topk: int, h: int, r: int, dr: int, dtype: torch.dtype,
             device: torch.device, repeats: int, copy: float) -> list[KernelPoint]:
    """Dense and sparse decode at batch ``b`` and context ``s``: PyTorch, and Triton on CUDA."""
    width = r + dr
    scale = width**-0.5
    elt = torch.empty(0, dtype=dtype).element_size()
    g = torch.Generator(device=device).manual_seed(s * 1000 + b)
    q = torch.randn(b, h, 1, width, generator=g, device=device, dtype=dtype)
    kv = torch.randn(b, s, width, generator=g, device=device, dtype=dtype)
    lengths = torch.full((b,), s, dtype=torch.int32, device=device)
    k = min(topk, s)
    idx = torch.stack([torch.randperm(s, generator=g, device=device)[:k] for _ in range(b)])[:, None]
    key = kv.unsqueeze(1)
    runs: list[tuple[str, str, Callable[[], object], int, int]] = [
        ("dense decode", "torch", lambda: attention(q, key, key, scale),
         (b * s * width + b * h * (width + r)) * elt, 2 * b * h * s * (width + r)),
        ("sparse decode", "torch", lambda: sparse_mqa(q, kv, idx, scale, r),
         (b * k * width + b * h * (width + r)) * elt, 2 * b * h * k * (width + r)),
    ]
    if device.type == "cuda":
        from latentattn.kernels.mla_decode import mla_decode_triton
        from latentattn.kernels.sparse_mla import sparse_mla_triton

        runs.insert(1, ("dense decode", "triton",
                        lambda: mla_decode_triton(q[:, :, 0], kv, lengths, scale, r),
                        runs[0][3], runs[0][4]))
        runs.append(("sparse decode", "triton", lambda: sparse_mla_triton(q, kv, idx, scale, r),
                     runs[-1][3], runs[-1][4]))
    points = []
    for kind, impl, fn, moved, flops in runs:
        try:
            ms = _time(fn, device, repeats)
        except torch.OutOfMemoryError:  # the PyTorch path's scores at long context and big batch
            torch.cuda.empty_cache()
            continue
        gb = moved / (ms * 1e-3) / 1e9
        points.append(KernelPoint(kind, impl, b, s, k if kind == "sparse decode" else None, ms, moved,
                                  flops, gb, flops / (ms * 1e-3) / 1e12, gb / copy))
    return points


def kernel_table(report: KernelReport) -> str:
    lines = [f"{report.note}. Device copy bandwidth {report.copy_gb_s:,.0f} GB/s; dims "
             f"{report.dims}, {report.dtype}.", "",
             "| kind | impl | batch | context | top-k | ms | GB/s | share of copy BW | TFLOP/s |",
             "|---|---|---:|---:|---:|---:|---:|---:|---:|"]
    for p in report.points:
        share = "-" if p.share_of_copy_bandwidth is None else f"{p.share_of_copy_bandwidth:.0%}"
        lines.append(f"| {p.kind} | {p.impl} | {p.batch} | {p.context:,} | {p.topk or '-'} | "
                     f"{p.median_ms:.3f} | {p.gb_s:,.1f} | {share} | {p.tflops:.3f} |")
    return "\n".join(lines)


def plot_kernel_report(report: KernelReport, path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(10, 4))
    for ax, kind in zip(axes, ("dense decode", "sparse decode"), strict=True):
        for impl in ("torch", "triton"):
            for b in sorted({p.batch for p in report.points}):
                pts = [p for p in report.points if p.kind == kind and p.impl == impl and p.batch == b]
                if pts:
                    ax.plot([p.context for p in pts], [p.median_ms for p in pts], "o-",
                            label=f"{impl}, batch {b}")
        ax.set_xscale("log", base=2)
        ax.set_yscale("log")
        ax.set_xlabel("cached context (tokens)")
        ax.set_ylabel("ms per decode step")
        ax.set_title(kind)
        ax.legend(fontsize=7)
    fig.suptitle(f"{report.device}, {report.dtype}: {report.note}", fontsize=8)
    fig.tight_layout()
    fig.savefig(path, format="png", dpi=120)
    plt.close(fig)


def check_device(name: str) -> torch.device:
    device = torch.device(name)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise LatentAttnError("--device cuda: CUDA is not available here (the PyTorch path runs "
                              "with --device cpu)")
    return device


__all__ = [
    "V3_DIMS",
    "KernelPoint",
    "KernelReport",
    "check_device",
    "copy_bandwidth",
    "kernel_table",
    "plot_kernel_report",
    "run_kernel_bench",
]
