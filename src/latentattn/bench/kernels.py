"""``latentattn bench kernels``: the Triton kernels against the PyTorch path on one device.

Dense absorbed decode (one query token per sequence over a latent cache, every sequence at the
same context): bytes moved per step counted as FlashMLA's benchmark does, the latent ONCE (not
again as the value) plus the queries and outputs, (B S (R + Dr) + B H (R + Dr + R)) x element
size, and the achieved GB/s against the device's copy bandwidth measured here (a large
device-to-device copy reads and writes every byte: 2 x bytes / time); the same over FlashMLA's
fp8 records (656 bytes a token at DeepSeek's dims), and on 64-token pages. Sparse attention
(DSA's top-k): time and TFLOP/s, 2 B H k (R + Dr + R) per step, against the dense kernel at the
same context. The PyTorch path is what the model runs without the kernels (the fused SDPA over
the latent, after dequantising an fp8 cache; for sparse, the gathered
``kernels.sparse.sparse_mqa``). The speed-up table divides times measured in the same run. On a
CPU only the PyTorch path runs (the kernels need a GPU) and the report says so; no kernel speed
is claimed there.
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

import torch

from latentattn.cache.fp8 import pack_record, record_bytes, unpack_record
from latentattn.errors import LatentAttnError
from latentattn.kernels import attention
from latentattn.kernels.sparse import sparse_mqa
from latentattn.timing import machine_info

V3_DIMS = {"heads": 128, "rank": 512, "rope": 64}  # DeepSeek-V3 / V3.2 attention, absorbed


@dataclass
class KernelPoint:
    kind: str  # "dense decode", "dense decode fp8" (FlashMLA's records) or "sparse decode"
    impl: str  # "torch", "triton" or "triton paged" (64-token pages, shuffled block table)
    batch: int
    context: int
    topk: int | None
    median_ms: float
    bytes_moved: int
    flops: int
    gb_s: float
    tflops: float
    share_of_copy_bandwidth: float | None
    max_abs_diff_vs_torch: float | None = None  # a kernel's output against the PyTorch path's


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
                     progress: Callable[[str], None] | None = None,
                     interpreted: bool = False) -> KernelReport:
    """``interpreted``: on a CPU, run the kernels too, in Triton's interpreter (TRITON_INTERPRET=1
    set before Triton was imported): a check that every path runs, whose times mean nothing."""
    d = dims or V3_DIMS
    h, r, dr = d["heads"], d["rank"], d["rope"]
    gpu = device.type == "cuda"
    kernels = gpu or interpreted
    copy = copy_bandwidth(device, (1 << 30) if gpu else (1 << 26))
    report = KernelReport(
        device=str(device), dtype=str(dtype).removeprefix("torch."), dims=dict(d), copy_gb_s=copy,
        kernels_ran=kernels,
        note="Triton kernels and the PyTorch path, timed on the same device" if gpu else
        "CPU: the kernels ran in Triton's interpreter; their times mean nothing" if kernels else
        "CPU: only the PyTorch path ran; the Triton kernels need a GPU (no kernel speed measured)")
    for b in batches:
        for s in contexts:
            if progress is not None:
                progress(f"B={b} S={s}")
            report.points.extend(_measure(b, s, topk, h, r, dr, dtype, device, repeats, copy,
                                          kernels))
    return report


def _measure(b: int, s: int, topk: int, h: int, r: int, dr: int, dtype: torch.dtype,
             device: torch.device, repeats: int, copy: float, kernels: bool) -> list[KernelPoint]:
    """Dense decode (bf16 rows; FlashMLA's fp8 records), and sparse decode, at batch ``b`` and
    context ``s``: the PyTorch path, and with ``kernels`` the Triton kernels (bf16 rows
    contiguous and in 64-token pages, as FlashMLA's benchmark pages them)."""
    width = r + dr
    scale = width**-0.5
    elt = torch.empty(0, dtype=dtype).element_size()
    g = torch.Generator(device=device).manual_seed(s * 1000 + b)
    q = torch.randn(b, h, 1, width, generator=g, device=device, dtype=dtype)
    kv = torch.randn(b, s, width, generator=g, device=device, dtype=dtype)
    records = pack_record(kv, r)
    lengths = torch.full((b,), s, dtype=torch.int32, device=device)
    k = min(topk, s)
    idx = torch.stack([torch.randperm(s, generator=g, device=device)[:k] for _ in range(b)])[:, None]
    key = kv.unsqueeze(1)
    qo = b * h * (width + r) * elt  # the queries read and the outputs written
    dense = (b * s * width * elt + qo, 2 * b * h * s * (width + r))
    fp8 = (b * s * record_bytes(r, dr) + qo, dense[1])
    sparse = (b * k * width * elt + qo, 2 * b * h * k * (width + r))
    # The PyTorch path over fp8 records is what the model runs without the kernel: dequantise
    # the cache, then the fused SDPA over the latent.
    runs: list[tuple[str, str, Callable[[], object], tuple[int, int]]] = [
        ("dense decode", "torch", lambda: attention(q, key, key, scale), dense),
        ("dense decode fp8", "torch", lambda: attention(
            q, *(2 * (unpack_record(records, r, dtype).unsqueeze(1),)), scale), fp8),
        ("sparse decode", "torch", lambda: sparse_mqa(q, kv, idx, scale, r), sparse),
    ]
    if kernels:
        from latentattn.kernels.mla_decode import mla_decode_fp8_triton, mla_decode_triton
        from latentattn.kernels.sparse_mla import sparse_mla_triton

        page = 64
        pages = kv.view(b * (s // page), page, width) if s % page == 0 else None
        table = torch.arange(b * (s // page), dtype=torch.int32, device=device).view(b, -1)
        # A shuffled block table, so that pages are not read in address order.
        table = table.flatten()[torch.randperm(table.numel(), generator=g, device=device)].view_as(table)
        # As the model calls them: the longest length known on the host and the model's own
        # selections trusted, so no call syncs with the device.
        runs += [
            ("dense decode", "triton", lambda: mla_decode_triton(
                q[:, :, 0], kv, lengths, scale, r, max_len=s), dense),
            ("dense decode fp8", "triton", lambda: mla_decode_fp8_triton(
                q[:, :, 0], records, lengths, scale, r, max_len=s), fp8),
            ("sparse decode", "triton", lambda: sparse_mla_triton(
                q, kv, idx, scale, r, check_indices=False), sparse),
        ]
        if pages is not None:
            runs.append(("dense decode", "triton paged", lambda: mla_decode_triton(
                q[:, :, 0], pages, lengths, scale, r, block_table=table, max_len=s), dense))
    points = []
    torch_out: dict[str, torch.Tensor] = {}
    for kind, impl, fn, (moved, flops) in runs:
        try:
            # Each kernel's output against the PyTorch path's on the same input, as FlashMLA's
            # benchmark checks its backends against each other before timing them.
            out = _latent(fn(), b, h, r)
            if impl == "torch":
                torch_out[kind] = out
            diff = float((out - torch_out[kind]).abs().max()) if kind in torch_out else None
            ms = _time(fn, device, repeats)
        except torch.OutOfMemoryError:  # the PyTorch path's scores at long context and big batch
            torch.cuda.empty_cache()
            continue
        gb = moved / (ms * 1e-3) / 1e9
        points.append(KernelPoint(kind, impl, b, s, k if kind == "sparse decode" else None, ms, moved,
                                  flops, gb, flops / (ms * 1e-3) / 1e12, gb / copy,
                                  None if impl == "torch" else diff))
    return points


def _latent(result: object, b: int, h: int, r: int) -> torch.Tensor:
    """The latent-space output (B, H, R) fp32 of any path: a tensor, or an (o, lse) pair."""
    o = result[0] if isinstance(result, tuple) else result
    assert isinstance(o, torch.Tensor)
    return o.reshape(b, h, -1)[..., :r].float()


def speedups(report: KernelReport) -> list[tuple[int, int, str, float]]:
    """(batch, context, what, ratio of times) for the ratios the issue's targets name: each
    Triton kernel against the PyTorch path on the same input, and sparse against dense decode
    (each implementation against itself)."""
    ms = {(p.kind, p.impl, p.batch, p.context): p.median_ms for p in report.points}
    out = []
    for b, s in sorted({(p.batch, p.context) for p in report.points}):
        pairs = [(f"{kind}: triton vs torch", (kind, "torch"), (kind, "triton"))
                 for kind in ("dense decode", "dense decode fp8", "sparse decode")]
        pairs += [(f"sparse vs dense decode ({impl})", ("dense decode", impl), ("sparse decode", impl))
                  for impl in ("torch", "triton")]
        for what, slow, fast in pairs:
            t_slow, t_fast = ms.get((*slow, b, s)), ms.get((*fast, b, s))
            if t_slow is not None and t_fast is not None:
                out.append((b, s, what, t_slow / t_fast))
    return out


def kernel_table(report: KernelReport) -> str:
    lines = [f"{report.note}. Device copy bandwidth {report.copy_gb_s:,.0f} GB/s; dims "
             f"{report.dims}, {report.dtype}.", "",
             "| kind | impl | batch | context | top-k | ms | GB/s | share of copy BW | TFLOP/s "
             "| max abs diff vs torch |",
             "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for p in report.points:
        share = "-" if p.share_of_copy_bandwidth is None else f"{p.share_of_copy_bandwidth:.0%}"
        diff = "-" if p.max_abs_diff_vs_torch is None else f"{p.max_abs_diff_vs_torch:.1e}"
        lines.append(f"| {p.kind} | {p.impl} | {p.batch} | {p.context:,} | {p.topk or '-'} | "
                     f"{p.median_ms:.3f} | {p.gb_s:,.1f} | {share} | {p.tflops:.3f} | {diff} |")
    lines += ["", "| batch | context | speed-up | x |", "|---:|---:|---|---:|"]
    lines += [f"| {b} | {s:,} | {what} | {x:.2f} |" for b, s, what, x in speedups(report)]
    return "\n".join(lines)


def plot_kernel_report(report: KernelReport, path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    kinds = ("dense decode", "dense decode fp8", "sparse decode")
    fig, axes = plt.subplots(1, 3, figsize=(15, 4))
    for ax, kind in zip(axes, kinds, strict=True):
        for impl in sorted({p.impl for p in report.points}):
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
    "speedups",
]
