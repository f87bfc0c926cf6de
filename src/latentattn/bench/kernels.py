"""``latentattn bench kernels``: the Triton kernels against the PyTorch path on one device.

Dense absorbed decode (one query token per sequence over a latent cache, every sequence at the
same context): bytes moved per step counted as FlashMLA's benchmark does, the latent ONCE (not
again as the value) plus the queries and outputs, (B S (R + Dr) + B H (R + Dr + R)) x element
size, and the achieved GB/s against the device's copy bandwidth measured here (a large
device-to-device copy reads and writes every byte: 2 x bytes / time); the same over FlashMLA's
fp8 records (656 bytes a token at DeepSeek's dims), and on 64-token pages. Sparse attention
(DSA's top-k): time and TFLOP/s, 2 B H k (R + Dr + R) per step, against the dense kernel at the
same context.

The PyTorch path is what the model runs at decode without the kernels
(:mod:`latentattn.bench.kernel_paths`): the cache read as the model reads it (the latent
store's ``read``: a view of the bf16 rows, or FlashMLA's records dequantised), then for dense
decode the model's own :func:`latent_attention` under the Step its decode passes
(``KVCache.step(1)``, with its (B, 1, 1, S) mask: SDPA then folds the heads into the query
axis and reads the one latent key for all of them, rather than its GQA path at head dim
R + Dr), and for sparse decode ``kernels.sparse.sparse_mqa`` over the selected rows, as
``SparseLatentAttention`` calls it.

A point that fails (out of memory, most often the PyTorch path at long context and big batch,
or any other RuntimeError) stays in the report, with no time and its reason in ``error``; the
speed-up table gives no ratio for it. The speed-up table divides times measured in the same run.
On a CPU only the PyTorch path runs (the kernels need a GPU) and the report says so; no kernel
speed is claimed there.
"""

from __future__ import annotations

import re
import statistics
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

import torch

from latentattn.bench.kernel_paths import (
    INDEX_DIM,
    INDEX_HEADS,
    Run,
    decode_step,
    dsa_step_runs,
    torch_paths,
)
from latentattn.cache.fp8 import (
    bytes_per_vector,
    pack_record,
    record_bytes,
)
from latentattn.cache.layer import latent_cache
from latentattn.cache.store import Rows
from latentattn.errors import LatentAttnError
from latentattn.timing import machine_info

V3_DIMS = {"heads": 128, "rank": 512, "rope": 64}  # DeepSeek-V3 / V3.2 attention, absorbed
KINDS = ("dense decode", "dense decode fp8", "sparse decode", "sparse decode fp8", "dsa decode step")
PAGE = 64  # FlashMLA's page size (its benchmark's block_size)



@dataclass
class KernelPoint:
    kind: str  # "dense decode", "sparse decode", each also over FlashMLA's fp8 records ("... fp8"),
    # or "dsa decode step" (V3.2's indexer over fp8 keys, top-k, sparse decode)
    impl: str  # "torch", "triton" or "triton paged" (64-token pages, shuffled block table)
    batch: int
    context: int
    topk: int | None
    median_ms: float | None  # None: the point failed, ``error`` says why
    bytes_moved: int
    flops: int
    gb_s: float | None
    tflops: float | None
    share_of_copy_bandwidth: float | None
    max_abs_diff_vs_torch: float | None = None  # a kernel's output against the PyTorch path's
    error: str | None = None  # why a failed point has no time ("out of memory (...)")


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


def _plan(kernels: bool, paged: bool) -> list[tuple[str, str]]:
    """The (kind, impl) points measured at one (batch, context), each PyTorch path before the
    kernels it checks."""
    plan = [(kind, "torch") for kind in KINDS]
    if kernels:
        plan += [(kind, "triton") for kind in KINDS]
        if paged:
            plan.append(("dense decode", "triton paged"))
    return plan


def _measure(b: int, s: int, topk: int, h: int, r: int, dr: int, dtype: torch.dtype,
             device: torch.device, repeats: int, copy: float, kernels: bool) -> list[KernelPoint]:
    """Every point of :func:`_plan` at batch ``b`` and context ``s``; a point that fails is
    kept, missing, with its reason (all of them when the inputs do not fit)."""
    width = r + dr
    elt = torch.empty(0, dtype=dtype).element_size()
    k = min(topk, s)
    qo = b * h * (width + r) * elt  # the queries read and the outputs written
    dense = (b * s * width * elt + qo, 2 * b * h * s * (width + r))
    sparse = (b * k * width * elt + qo, 2 * b * h * k * (width + r))
    costs = {"dense decode": dense, "dense decode fp8": (b * s * record_bytes(r, dr) + qo, dense[1]),
             "sparse decode": sparse,
             "sparse decode fp8": (b * k * record_bytes(r, dr) + qo, sparse[1]),
             "dsa decode step": (b * s * bytes_per_vector(INDEX_DIM) + sparse[0],
                                 2 * b * INDEX_HEADS * INDEX_DIM * s + sparse[1])}
    plan = _plan(kernels, s % PAGE == 0)

    def point(kind: str, impl: str, ms: float | None, diff: float | None = None,
              error: str | None = None) -> KernelPoint:
        moved, flops = costs[kind]
        gb = None if ms is None else moved / (ms * 1e-3) / 1e9
        return KernelPoint(kind, impl, b, s, None if kind.startswith("dense") else k, ms, moved,
                           flops, gb, None if ms is None else flops / (ms * 1e-3) / 1e12,
                           None if gb is None else gb / copy, diff, error)

    # A failure's memory is released after its except block: until then the traceback's frames
    # hold the tensors the failed call allocated.
    reason = None
    try:
        runs = _runs(b, s, k, h, r, dr, dtype, device, kernels)
    except RuntimeError as e:  # the inputs themselves do not fit
        reason = f"inputs: {_reason(e)}"
    if reason is not None:
        _release(device)
        return [point(kind, impl, None, error=reason) for kind, impl in plan]
    points = []
    torch_out: dict[str, torch.Tensor] = {}
    for kind, impl in plan:
        fn = runs[kind, impl]
        try:
            # Each kernel's output against the PyTorch path's on the same input, as FlashMLA's
            # benchmark checks its backends against each other before timing them.
            out = _latent(fn(), b, h, r)
            if impl == "torch":
                torch_out[kind] = out
            diff = float((out - torch_out[kind]).abs().max()) if kind in torch_out else None
            ms = _time(fn, device, repeats)
        except RuntimeError as e:  # torch.OutOfMemoryError is one: reported, never dropped
            reason = _reason(e)
        if reason is not None:
            _release(device)
            points.append(point(kind, impl, None, error=reason))
            reason = None
            continue
        points.append(point(kind, impl, ms, None if impl == "torch" else diff))
    return points


def _release(device: torch.device) -> None:
    """Hand the failed point's freed blocks back, so that the next point starts clean."""
    if device.type == "cuda":
        torch.cuda.empty_cache()


def _reason(e: RuntimeError) -> str:
    """One short line: "out of memory (tried to allocate 2.00 GiB)", or the error's type and
    first line."""
    msg = str(e).strip()
    if isinstance(e, torch.OutOfMemoryError) or re.search(r"out of memory|not enough memory", msg,
                                                          re.IGNORECASE):
        m = re.search(r"tried to allocate [0-9.]+ ?\w+", msg, re.IGNORECASE)
        return "out of memory" + (f" ({m.group(0)[0].lower()}{m.group(0)[1:]})" if m else "")
    first = msg.splitlines()[0] if msg else ""
    return f"{type(e).__name__}: {first[:160]}" if first else type(e).__name__


def _runs(b: int, s: int, k: int, h: int, r: int, dr: int, dtype: torch.dtype,
          device: torch.device, kernels: bool) -> dict[tuple[str, str], Run]:
    """The inputs at batch ``b`` and context ``s`` and a call per (kind, impl): the PyTorch
    paths (``kernel_paths.torch_paths``), and with ``kernels`` the Triton kernels (bf16 rows contiguous
    and in 64-token pages, as FlashMLA's benchmark pages them; fp8 records)."""
    width = r + dr
    scale = width**-0.5
    g = torch.Generator(device=device).manual_seed(s * 1000 + b)
    q = torch.randn(b, h, 1, width, generator=g, device=device, dtype=dtype)
    # The caches as the model holds them: the latent rows, and the same rows as FlashMLA's
    # records (what the fp8 latent store's write stores).
    cache = latent_cache(r, dr, Rows(b, s), dtype, device)
    kv = cache.latent.buffers[0]
    kv.normal_(generator=g)
    fp8 = latent_cache(r, dr, Rows(b, s), dtype, device, latent_format="fp8")
    records = fp8.latent.buffers[0]
    records.copy_(pack_record(kv, r))
    step = decode_step(b, s, device)
    idx = torch.stack([torch.randperm(s, generator=g, device=device)[:k] for _ in range(b)])[:, None]
    runs: dict[tuple[str, str], Run] = {
        (kind, "torch"): fn for kind, fn in torch_paths(q, cache, fp8, step, idx, scale).items()}
    runs.update(dsa_step_runs(q, cache, step, k, scale, g, kernels))
    if kernels:
        from latentattn.kernels.mla_decode import mla_decode_fp8_triton, mla_decode_triton
        from latentattn.kernels.sparse_mla import sparse_mla_fp8_triton, sparse_mla_triton

        # As the model calls them: the longest length known on the host and the model's own
        # selections trusted, so no call syncs with the device.
        lengths = (step.positions[:, 0] + 1).to(torch.int32)
        runs.update({
            ("dense decode", "triton"): lambda: mla_decode_triton(
                q[:, :, 0], kv, lengths, scale, r, max_len=s),
            ("dense decode fp8", "triton"): lambda: mla_decode_fp8_triton(
                q[:, :, 0], records, lengths, scale, r, max_len=s),
            ("sparse decode", "triton"): lambda: sparse_mla_triton(
                q, kv, idx, scale, r, check_indices=False),
            ("sparse decode fp8", "triton"): lambda: sparse_mla_fp8_triton(
                q, records, idx, scale, r, check_indices=False),
        })
        if s % PAGE == 0:
            # The same rows in 64-token pages of a shuffled pool, so that pages are not read in
            # address order: page j of sequence i is pool page table[i, j].
            n_pages = b * (s // PAGE)
            table = torch.randperm(n_pages, generator=g, device=device).to(torch.int32).view(b, -1)
            pages = torch.empty(n_pages, PAGE, width, dtype=dtype, device=device)
            pages[table.flatten().long()] = kv.view(n_pages, PAGE, width)
            runs["dense decode", "triton paged"] = lambda: mla_decode_triton(
                q[:, :, 0], pages, lengths, scale, r, block_table=table, max_len=s)
    return runs


def _latent(result: object, b: int, h: int, r: int) -> torch.Tensor:
    """The latent-space output (B, H, R) fp32 of any path: a tensor, or an (o, lse) pair."""
    o = result[0] if isinstance(result, tuple) else result
    assert isinstance(o, torch.Tensor)
    return o.reshape(b, h, -1)[..., :r].float()


def check_device(name: str) -> torch.device:
    device = torch.device(name)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise LatentAttnError("--device cuda: CUDA is not available here (the PyTorch path runs "
                              "with --device cpu)")
    return device


__all__ = [
    "KINDS",
    "V3_DIMS",
    "KernelPoint",
    "KernelReport",
    "check_device",
    "copy_bandwidth",
    "run_kernel_bench",
]
