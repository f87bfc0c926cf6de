"""Absorbed MLA decode over a latent cache: the PyTorch reference and the Triton kernel.

One query token per sequence, queries already absorbed (``MultiHeadLatentAttention.absorb_query``):
q (B, H, R + Dr) = [W_UK^T q_nope | q_rope]. Every head reads the same cached rows
kv[t] = [c_t | k_rope_t] (R + Dr wide), as key, and their first R columns, the latent c_t, as
value (DeepSeek-V2 s2.1.2's absorption; FlashMLA #46: V is a view of the latent, not a second
cache). The output is the latent-space o (B, H, R), which ``unabsorb`` maps through W_UV, and the
log-sum-exp of the scaled scores (B, H), natural log.

The cache is contiguous, kv (B, S, R + Dr), or paged, kv (pages, page_size, R + Dr) with
``block_table`` (B, max_pages) int32: token n of sequence b lives at row n % page_size of page
block_table[b, n // page_size] (vLLM's and FlashMLA's layout). ``lengths`` (B,) int32 are the
cached tokens per sequence (ragged batches); rows past a sequence's length are never read.

The kernel (after SGLang's grouped decode kernel, ``python/sglang/srt/layers/attention/triton_ops/
decode_attention.py``, and vLLM's TRITON_MLA, ``vllm/attention/ops/triton_decode_attention.py``): one
program per (block of BLOCK_H heads, KV split, sequence), the head blocks of one split side by side
on the grid's fastest axis so they share each tile through L2; each tile of BLOCK_N cached rows is
loaded once and used for every head in the block, as key (two dot products: the R latent columns
and the Dr rope columns) and as value; an online softmax in base 2 runs over the split's tiles;
each split stores its normalised partial output and LSE, and a second kernel merges the splits
by their LSEs. A split past a sequence's end stores LSE -inf and no output.
"""

from __future__ import annotations

import math

import torch

from latentattn.cache.fp8 import check_record_rank, record_bytes, unpack_record
from latentattn.errors import ConfigError

BLOCK_H = 16  # heads per program: tl.dot needs >= 16 rows (SGLang's grouped kernel uses 16)
BLOCK_N = 32  # cached rows per tile (SGLang: 32 at width 576)
LOG2E = 1.4426950408889634


# ---------------------------------------------------------------------------- reference
def mla_decode_ref(q: torch.Tensor, kv: torch.Tensor, lengths: torch.Tensor, scale: float,
                   kv_lora_rank: int, block_table: torch.Tensor | None = None
                   ) -> tuple[torch.Tensor, torch.Tensor]:
    """The obviously-correct form, in fp32, one sequence at a time: (o (B, H, R), lse (B, H))."""
    b, _, width = q.shape
    outs, lses = [], []
    for i in range(b):
        n = int(lengths[i])
        rows = _rows(kv, i, n, block_table).float()  # (n, R + Dr)
        s = (q[i].float() @ rows.T) * scale  # (H, n)
        lses.append(torch.logsumexp(s, dim=-1))
        outs.append(torch.softmax(s, dim=-1) @ rows[:, :kv_lora_rank])
    assert width == kv.shape[-1]
    return torch.stack(outs), torch.stack(lses)


def _rows(kv: torch.Tensor, i: int, n: int, block_table: torch.Tensor | None) -> torch.Tensor:
    """Sequence i's first n cached rows, contiguous or through its pages."""
    if block_table is None:
        return kv[i, :n]
    page = kv.shape[1]
    pages = block_table[i, : math.ceil(n / page)].long()
    return kv[pages].reshape(-1, kv.shape[-1])[:n]


# ---------------------------------------------------------------------------- checks
MAX_RANK, MAX_ROPE = 1024, 256  # one tile row of the latent / rope part must fit on chip


def unit_stride(t: torch.Tensor) -> torch.Tensor:
    """``t`` itself when its rows are contiguous (the kernels take the other strides as they
    are), else a contiguous copy: a cache's ``[:, :kv_len]`` view is read in place, not copied."""
    return t if t.stride(-1) == 1 else t.contiguous()


def check_rank_and_dtypes(q: torch.Tensor, kv: torch.Tensor, rank: int, kernel: str) -> None:
    """What every latent kernel needs: the latent rank inside the cache row, head sizes a tile
    holds, and q and the cache in one of the float dtypes the kernels are built for."""
    if not 0 < rank < kv.shape[-1]:
        raise ConfigError(f"kv_lora_rank {rank} must lie inside the cache row ({kv.shape[-1]})")
    if rank > MAX_RANK or kv.shape[-1] - rank > MAX_ROPE:
        raise ConfigError(f"{kernel} takes latents up to {MAX_RANK} and rope parts up to {MAX_ROPE} "
                          f"dims, got {rank} + {kv.shape[-1] - rank}; use the PyTorch backend")
    if q.dtype not in (torch.float32, torch.bfloat16, torch.float16) or kv.dtype != q.dtype:
        raise ConfigError(f"{kernel} supports fp32/bf16/fp16 caches with queries of the same "
                          f"dtype; got q {q.dtype}, kv {kv.dtype}")


def check_decode_inputs(q: torch.Tensor, kv: torch.Tensor, lengths: torch.Tensor, kv_lora_rank: int,
                        block_table: torch.Tensor | None, max_len: int | None = None) -> int:
    """One clear error for inputs the kernel cannot take (the PyTorch path can still); returns
    the longest length. With ``max_len`` given, ``lengths`` and ``block_table`` are trusted (a
    cache's own, as in the model's decode step) and no tensor value is read on the host, so the
    call makes no host-device sync; only the shapes and ``max_len`` against them are checked."""
    if q.dim() != 3 or kv.dim() != 3 or q.shape[-1] != kv.shape[-1]:
        raise ConfigError(f"mla_decode takes q (B, H, R + Dr) and kv (B or pages, S, R + Dr); got q "
                          f"{tuple(q.shape)}, kv {tuple(kv.shape)}")
    check_rank_and_dtypes(q, kv, kv_lora_rank, "mla_decode")
    if lengths.shape != (q.shape[0],):
        raise ConfigError(f"lengths must be ({q.shape[0]},), got {tuple(lengths.shape)}")
    if block_table is not None and (block_table.dim() != 2 or block_table.shape[0] != q.shape[0]):
        raise ConfigError(f"block_table must be (B, max_pages), got {tuple(block_table.shape)}")
    if q.shape[0] > GRID_YZ:
        raise ConfigError(f"mla_decode launches one program row per sequence: at most {GRID_YZ:,}, "
                          f"got B {q.shape[0]:,}; call it on smaller batches")
    if block_table is None and kv.shape[0] != q.shape[0]:
        raise ConfigError(f"a contiguous cache holds one row per sequence: kv {tuple(kv.shape)}, "
                          f"q {tuple(q.shape)}")
    room = kv.shape[1] if block_table is None else kv.shape[1] * block_table.shape[1]
    if max_len is not None:
        if not 0 < max_len <= room:
            raise ConfigError(f"max_len {max_len} must lie in 1..{room}, what the cache holds")
        return max_len
    longest = int(lengths.max())
    if bool((lengths < 1).any()):
        raise ConfigError("every sequence needs at least one cached token")
    if block_table is None:
        if longest > kv.shape[1]:
            raise ConfigError(f"lengths (max {longest}) exceed the contiguous cache "
                              f"({kv.shape[1]} rows)")
        return longest
    needed = (lengths.long() + kv.shape[1] - 1) // kv.shape[1]
    if bool((needed > block_table.shape[1]).any()):
        raise ConfigError("lengths need more pages than the block table holds")
    cols = torch.arange(block_table.shape[1], device=block_table.device)
    used = block_table[cols[None, :] < needed[:, None].to(block_table.device)]
    if used.numel() and (int(used.min()) < 0 or int(used.max()) >= kv.shape[0]):
        raise ConfigError(f"the block table points outside the pool of {kv.shape[0]} pages")
    return longest


# ---------------------------------------------------------------------------- the kernel
def mla_decode_triton(q: torch.Tensor, kv: torch.Tensor, lengths: torch.Tensor, scale: float,
                      kv_lora_rank: int, block_table: torch.Tensor | None = None,
                      num_splits: int | None = None, max_len: int | None = None
                      ) -> tuple[torch.Tensor, torch.Tensor]:
    """The Triton kernel (module docstring): (o (B, H, R) in q's dtype, lse (B, H) fp32).
    ``num_splits``: KV splits per sequence (None: :func:`default_splits`). ``max_len``: the
    longest of ``lengths`` when the caller knows it: then nothing is read back to the host and
    the inputs are trusted (:func:`check_decode_inputs`); else they are checked. Needs Triton,
    and CUDA tensors or ``TRITON_INTERPRET=1`` set before the first call."""
    longest = check_decode_inputs(q, kv, lengths, kv_lora_rank, block_table, max_len)
    check_devices("mla_decode", q, kv)
    from latentattn.kernels.triton_mla import launch_decode

    return launch_decode(q, kv, lengths, scale, kv_lora_rank, block_table,
                         _splits(q, longest, num_splits), longest)


def mla_decode_fp8_triton(q: torch.Tensor, records: torch.Tensor, lengths: torch.Tensor, scale: float,
                          kv_lora_rank: int, block_table: torch.Tensor | None = None,
                          num_splits: int | None = None, max_len: int | None = None
                          ) -> tuple[torch.Tensor, torch.Tensor]:
    """The kernel over FlashMLA's fp8 records (:func:`latentattn.cache.fp8.pack_record`), as a
    latent store in :class:`~latentattn.cache.store.Record` format holds them, in rows
    (B, S, bytes) or :class:`~latentattn.cache.paged.Pages` (pages, page_size, bytes); the
    latent is decoded in the kernel and the products run in q's dtype. ``num_splits`` and
    ``max_len`` as in :func:`mla_decode_triton`."""
    check_fp8_records(q, records, kv_lora_rank)
    longest = check_decode_inputs(q, torch.empty(*records.shape[:2], q.shape[-1], dtype=q.dtype,
                                                 device="meta"),
                                  lengths, kv_lora_rank, block_table, max_len)
    check_devices("mla_decode_fp8", q, records)
    from latentattn.kernels.triton_mla import launch_decode

    return launch_decode(q, records, lengths, scale, kv_lora_rank, block_table,
                         _splits(q, longest, num_splits), longest, fp8=True)


def mla_decode_fp8_ref(q: torch.Tensor, records: torch.Tensor, lengths: torch.Tensor, scale: float,
                       kv_lora_rank: int, block_table: torch.Tensor | None = None
                       ) -> tuple[torch.Tensor, torch.Tensor]:
    """The reference over the same records, dequantised (as FlashMLA's tests do: ``tests/quant.py``)."""
    return mla_decode_ref(q, unpack_record(records, kv_lora_rank), lengths, scale, kv_lora_rank,
                          block_table)


def check_fp8_records(q: torch.Tensor, records: torch.Tensor, rank: int) -> None:
    if q.dim() != 3 or records.dim() != 3 or records.dtype != torch.uint8:
        raise ConfigError(f"the fp8 decode takes q (B, H, R + Dr) and uint8 records (B or pages, S, "
                          f"bytes); got q {tuple(q.shape)}, records {tuple(records.shape)} "
                          f"{records.dtype}")
    check_record_rank(rank)
    want = record_bytes(rank, q.shape[-1] - rank) if 0 < rank < q.shape[-1] else -1
    if records.shape[-1] != want:
        raise ConfigError(f"a record for kv_lora_rank {rank} and q width {q.shape[-1]} holds {want} "
                          f"bytes, not {records.shape[-1]}")


def _splits(q: torch.Tensor, longest: int, num_splits: int | None) -> int:
    splits = (num_splits if num_splits is not None
              else default_splits(q.shape[0], q.shape[1], longest, sm_count(q.device)))
    if splits < 1:
        raise ConfigError(f"num_splits must be >= 1, got {splits}")
    return splits


# ---------------------------------------------------------------------------- launch policy
GRID_YZ = 65535  # CUDA's grid limit on axes y and z (axis x takes 2^31 - 1)
H100_SMS = 132  # an H100 SXM's streaming multiprocessors: the policy's stand-in off CUDA
MAX_SPLITS = 16  # vLLM PR #50629 caps KV splits near 16: the fp32 partials grow with the count


def check_devices(kernel: str, q: torch.Tensor, *data: torch.Tensor) -> None:
    """The data tensors on q's device (index tensors are moved there by the launchers)."""
    for t in data:
        if t.device != q.device:
            raise ConfigError(f"{kernel}: q is on {q.device} but a {tuple(t.shape)} input is on "
                              f"{t.device}; move them to one device")


def sm_count(device: torch.device) -> int:
    """The streaming multiprocessors of a CUDA device (what a split policy fills); an H100's 132
    for any other device (the interpreter), so that the policy runs there as on an H100."""
    if device.type == "cuda":
        return int(torch.cuda.get_device_properties(device).multi_processor_count)
    return H100_SMS


def split_count(blocks: int, most: int, sms: int) -> int:
    """Splits for ``blocks`` programs of work on ``sms`` SMs, at most ``most``: flash-attention's
    ``num_splits_heuristic`` (csrc/flash_attn/flash_api.cpp). None once the blocks fill 80% of
    the SMs; else, with wave quantisation counted (s splits give blocks x s programs in
    ceil(blocks x s / sms) waves, efficiency = the waves' occupied share), the fewest splits
    within 85% of the best efficiency, since every split adds partials to write and merge."""
    most = max(1, min(most, MAX_SPLITS))
    if blocks >= 0.8 * sms or most == 1:
        return 1

    def efficiency(s: int) -> float:
        waves = blocks * s / sms
        return waves / math.ceil(waves)

    best = max(efficiency(s) for s in range(1, most + 1))
    return next(s for s in range(1, most + 1) if efficiency(s) >= 0.85 * best)


def default_splits(batch: int, heads: int, max_len: int, sms: int = H100_SMS) -> int:
    """KV splits per sequence for dense decode: :func:`split_count` over batch x head blocks
    programs, each split at least 4 tiles of BLOCK_N rows (shorter splits cost more in partials
    than they gain)."""
    return split_count(batch * -(-heads // BLOCK_H), max_len // (4 * BLOCK_N), sms)


__all__ = ["BLOCK_H", "BLOCK_N", "GRID_YZ", "H100_SMS", "check_decode_inputs", "check_devices",
           "check_fp8_records", "check_rank_and_dtypes", "default_splits", "mla_decode_fp8_ref",
           "mla_decode_fp8_triton", "mla_decode_ref", "mla_decode_triton", "sm_count", "split_count",
           "unit_stride"]
