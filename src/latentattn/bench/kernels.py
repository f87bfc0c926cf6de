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

from latentattn.cache.fp8 import dequantize_e4m3, pack_record, record_bytes, unpack_record
from latentattn.errors import LatentAttnError
from latentattn.kernels import attention
from latentattn.kernels.sparse import sparse_mqa
from latentattn.timing import machine_info

V3_DIMS = {"heads": 128, "rank": 512, "rope": 64}  # DeepSeek-V3 / V3.2 attention, absorbed


@dataclass
class KernelPoint:
    kind: str  # "dense decode", "sparse decode", each also over FlashMLA's fp8 records ("... fp8"),
    # or "dsa decode step" (V3.2's indexer over fp8 keys, top-k, sparse decode)
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
    sparse8 = (b * k * record_bytes(r, dr) + qo, sparse[1])
    # The PyTorch path over fp8 records is what the model runs without the kernel: dequantise
    # the cache, then the fused SDPA over the latent (dense) or the gathered rows (sparse).
    runs: list[tuple[str, str, Callable[[], object], tuple[int, int]]] = [
        ("dense decode", "torch", lambda: attention(q, key, key, scale), dense),
        ("dense decode fp8", "torch", lambda: attention(
            q, *(2 * (unpack_record(records, r, dtype).unsqueeze(1),)), scale), fp8),
        ("sparse decode", "torch", lambda: sparse_mqa(q, kv, idx, scale, r), sparse),
        ("sparse decode fp8", "torch", lambda: sparse_mqa(
            q, unpack_record(records, r, dtype), idx, scale, r), sparse8),
        *_dsa_step(q, kv, k, scale, r, sparse, g, kernels),
    ]
    if kernels:
        from latentattn.kernels.mla_decode import mla_decode_fp8_triton, mla_decode_triton
        from latentattn.kernels.sparse_mla import sparse_mla_fp8_triton, sparse_mla_triton

        # The same rows in 64-token pages of a shuffled pool, so that pages are not read in
        # address order: page j of sequence i is pool page table[i, j].
        page, n_pages = 64, b * (s // 64)
        pages = None
        if s % page == 0:
            table = torch.randperm(n_pages, generator=g, device=device).to(torch.int32).view(b, -1)
            pages = torch.empty(n_pages, page, width, dtype=dtype, device=device)
            pages[table.flatten().long()] = kv.view(n_pages, page, width)
        # As the model calls them: the longest length known on the host and the model's own
        # selections trusted, so no call syncs with the device.
        runs += [
            ("dense decode", "triton", lambda: mla_decode_triton(
                q[:, :, 0], kv, lengths, scale, r, max_len=s), dense),
            ("dense decode fp8", "triton", lambda: mla_decode_fp8_triton(
                q[:, :, 0], records, lengths, scale, r, max_len=s), fp8),
            ("sparse decode", "triton", lambda: sparse_mla_triton(
                q, kv, idx, scale, r, check_indices=False), sparse),
            ("sparse decode fp8", "triton", lambda: sparse_mla_fp8_triton(
                q, records, idx, scale, r, check_indices=False), sparse8),
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
        points.append(KernelPoint(kind, impl, b, s, None if kind.startswith("dense") else k, ms, moved,
                                  flops, gb, flops / (ms * 1e-3) / 1e12, gb / copy,
                                  None if impl == "torch" else diff))
    return points


def _latent(result: object, b: int, h: int, r: int) -> torch.Tensor:
    """The latent-space output (B, H, R) fp32 of any path: a tensor, or an (o, lse) pair."""
    o = result[0] if isinstance(result, tuple) else result
    assert isinstance(o, torch.Tensor)
    return o.reshape(b, h, -1)[..., :r].float()


def _dsa_step(q: torch.Tensor, kv: torch.Tensor, k: int, scale: float, r: int,
              sparse: tuple[int, int], g: torch.Generator, kernels: bool
              ) -> list[tuple[str, str, Callable[[], object], tuple[int, int]]]:
    """A whole DSA decode step as the model runs it: V3.2's indexer (64 heads of 128, fp8 keys)
    over every cached key, top-k, then sparse attention over the k selected latents. The
    PyTorch path dequantises the keys first (the cache's ``read``); the kernels read the fp8
    bytes. Bytes: the keys (132 a token) plus the sparse attention's."""
    from latentattn.cache.fp8 import bytes_per_vector, quantize_e4m3
    from latentattn.kernels.sparse import select_topk, topk_reference

    b, s = kv.shape[:2]
    heads, dim = 64, 128
    qi = torch.randn(b, 1, heads, dim, generator=g, device=kv.device)
    wi = torch.randn(b, 1, heads, generator=g, device=kv.device) * heads**-0.5
    k8, k_scale = quantize_e4m3(torch.randn(b, s, dim, generator=g, device=kv.device))
    pos = torch.full((b, 1), s - 1, device=kv.device)
    cost = (b * s * bytes_per_vector(dim) + sparse[0], 2 * b * heads * dim * s + sparse[1])

    def torch_step() -> object:
        sel = select_topk(qi, wi, dequantize_e4m3(k8, k_scale), pos, k, dim**-0.5)
        return sparse_mqa(q, kv, sel, scale, r)

    runs: list[tuple[str, str, Callable[[], object], tuple[int, int]]] = [
        ("dsa decode step", "torch", torch_step, cost)]
    if kernels:
        from latentattn.kernels.indexer_logits import indexer_logits_triton
        from latentattn.kernels.sparse_mla import sparse_mla_triton

        def triton_step() -> object:
            logits = indexer_logits_triton(qi, wi, k8, pos, dim**-0.5, k_scale=k_scale)
            return sparse_mla_triton(q, kv, topk_reference(logits, pos, k), scale, r,
                                     check_indices=False)

        runs.append(("dsa decode step", "triton", triton_step, cost))
    return runs


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
    "run_kernel_bench",
]
