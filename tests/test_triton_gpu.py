"""The Triton kernels compiled, on a CUDA GPU, in bf16: each kernel's error against an fp32
reference is at most twice the error of the PyTorch path run in bf16 (flash-attention's rule),
at DeepSeek's 512 + 64 latent row. Skipped without CUDA (the interpreter tests cover the logic
on CPU; run these with TRITON_INTERPRET=0 on a GPU machine)."""

from __future__ import annotations

import os

import pytest
import torch

pytestmark = pytest.mark.skipif(
    not torch.cuda.is_available() or os.environ.get("TRITON_INTERPRET") == "1",
    reason="needs a CUDA GPU with compiled kernels (TRITON_INTERPRET=0)")

R, DR, H = 512, 64, 16


def _err(a: torch.Tensor, ref: torch.Tensor) -> float:
    return float((a.float() - ref).abs().max())


@pytest.mark.parametrize("lengths", [[1, 63, 97], [1025, 4000]])
def test_dense_decode_bf16(lengths: list[int]) -> None:
    from latentattn.kernels import attention
    from latentattn.kernels.mla_decode import mla_decode_ref, mla_decode_triton

    g = torch.Generator(device="cuda").manual_seed(0)
    b, s = len(lengths), max(lengths)
    q = torch.randn(b, H, R + DR, device="cuda", generator=g)
    kv = torch.randn(b, s, R + DR, device="cuda", generator=g)
    n = torch.tensor(lengths, dtype=torch.int32, device="cuda")
    scale = (R + DR) ** -0.5
    ref, _ = mla_decode_ref(q, kv, n, scale, R)
    got, _ = mla_decode_triton(q.bfloat16(), kv.bfloat16(), n, scale, R)
    base = []
    for i, m in enumerate(lengths):  # the PyTorch path (SDPA over the latent) in bf16
        key = kv[i : i + 1, :m].bfloat16().unsqueeze(1)
        base.append(attention(q[i : i + 1, :, None].bfloat16(), key, key, scale)[0, :, 0, :R])
    assert _err(got, ref) <= 2 * _err(torch.stack(base), ref) + 1e-3


def test_sparse_bf16_forward_and_backward() -> None:
    from latentattn.kernels.sparse import sparse_mqa
    from latentattn.kernels.sparse_mla import sparse_mla_ref, sparse_mla_triton

    g = torch.Generator(device="cuda").manual_seed(1)
    b, t, s, k = 2, 64, 4096, 512
    q = torch.randn(b, H, t, R + DR, device="cuda", generator=g)
    kv = torch.randn(b, s, R + DR, device="cuda", generator=g)
    idx = torch.randint(0, s, (b, t, k), device="cuda", generator=g)
    scale = (R + DR) ** -0.5
    do = torch.randn(b, H, t, R, device="cuda", generator=g)

    def run(fn: object, qq: torch.Tensor, kk: torch.Tensor) -> list[torch.Tensor]:
        qq, kk = qq.clone().requires_grad_(), kk.clone().requires_grad_()
        o = fn(qq, kk, idx, scale, R)[0]  # type: ignore[operator]
        return [o, *torch.autograd.grad(o, (qq, kk), do.to(o.dtype))]

    ref = run(sparse_mla_ref, q, kv)
    got = run(sparse_mla_triton, q.bfloat16(), kv.bfloat16())
    base = run(sparse_mqa, q.bfloat16(), kv.bfloat16())
    for a, r, p in zip(got, ref, base, strict=True):
        assert _err(a, r.detach()) <= 2 * _err(p, r.detach()) + 1e-3


def test_indexer_bf16_keys() -> None:
    from latentattn.kernels.indexer_logits import indexer_logits_ref, indexer_logits_triton

    g = torch.Generator(device="cuda").manual_seed(2)
    b, t, s = 1, 8, 4096
    q = torch.randn(b, t, 64, 128, device="cuda", generator=g)
    w = torch.randn(b, t, 64, device="cuda", generator=g)
    k = torch.randn(b, s, 128, device="cuda", generator=g)
    pos = torch.arange(s - t, s, device="cuda")[None]
    ref = indexer_logits_ref(q, w, k, pos, 128**-0.5)
    got = indexer_logits_triton(q, w, k.bfloat16(), pos, 128**-0.5)
    base = indexer_logits_ref(q.bfloat16().float(), w, k.bfloat16().float(), pos, 128**-0.5)
    fin = torch.isfinite(ref)
    assert torch.equal(torch.isfinite(got), fin)
    assert _err(got[fin], ref[fin]) <= 2 * _err(base[fin], ref[fin]) + 1e-2


def test_paged_fp8_records_bf16_at_128_heads() -> None:
    """FlashMLA's paged fp8 layout at V3's 128 heads: the kernel against the fp32 reference on
    the same dequantised records, within twice the bf16 PyTorch path's error."""
    from latentattn.cache.fp8 import pack_record, unpack_record
    from latentattn.kernels import attention
    from latentattn.kernels.mla_decode import mla_decode_fp8_triton, mla_decode_ref

    g = torch.Generator(device="cuda").manual_seed(3)
    lengths, page, h = [130, 4096], 64, 128
    pages = sum(-(-n // page) for n in lengths)
    pool = pack_record(torch.randn(pages, page, R + DR, device="cuda", generator=g), R)
    order = torch.randperm(pages, device="cuda", generator=g).to(torch.int32)
    table = torch.full((2, 64), -1, dtype=torch.int32, device="cuda")
    table[0, :3], table[1, :64] = order[:3], order[3:67]
    n = torch.tensor(lengths, dtype=torch.int32, device="cuda")
    q = torch.randn(2, h, R + DR, device="cuda", generator=g)
    scale = (R + DR) ** -0.5
    kv = unpack_record(pool, R)
    ref, _ = mla_decode_ref(q, kv, n, scale, R, block_table=table)
    got, _ = mla_decode_fp8_triton(q.bfloat16(), pool, n, scale, R, block_table=table)
    base = []
    for i, m in enumerate(lengths):
        key = kv[table[i, : -(-m // page)].long()].reshape(-1, R + DR)[:m].bfloat16()[None, None]
        base.append(attention(q[i : i + 1, :, None].bfloat16(), key, key, scale)[0, :, 0, :R])
    assert _err(got, ref) <= 2 * _err(torch.stack(base), ref) + 1e-3


def test_sparse_decode_split_top_k_bf16() -> None:
    """One decode token per sequence, top-k 2048 split 16 ways, against the unsplit kernel and
    the fp32 reference."""
    from latentattn.kernels.sparse import sparse_mqa
    from latentattn.kernels.sparse_mla import sparse_mla_ref, sparse_mla_triton

    g = torch.Generator(device="cuda").manual_seed(4)
    b, s, k, h = 2, 65536, 2048, 128
    q = torch.randn(b, h, 1, R + DR, device="cuda", generator=g)
    kv = torch.randn(b, s, R + DR, device="cuda", generator=g)
    idx = torch.stack([torch.randperm(s, device="cuda", generator=g)[:k] for _ in range(b)])[:, None]
    idx[:, :, ::7] = -1
    scale = (R + DR) ** -0.5
    ref, _ = sparse_mla_ref(q, kv, idx, scale, R)
    got, _ = sparse_mla_triton(q.bfloat16(), kv.bfloat16(), idx, scale, R, num_splits=16)
    one, _ = sparse_mla_triton(q.bfloat16(), kv.bfloat16(), idx, scale, R, num_splits=1)
    base, _ = sparse_mqa(q.bfloat16(), kv.bfloat16(), idx, scale, R)  # it masks -1 itself
    assert _err(got, ref) <= 2 * _err(one, ref) + 1e-3
    assert _err(one, ref) <= 2 * _err(base, ref) + 1e-3


def test_sparse_decode_over_fp8_records_bf16() -> None:
    """FlashMLA's sparse decode format at V3.2's shapes: the kernel decoding the selected
    records against the fp32 reference on the same records dequantised."""
    from latentattn.cache.fp8 import pack_record, unpack_record
    from latentattn.kernels.sparse import sparse_mqa
    from latentattn.kernels.sparse_mla import sparse_mla_fp8_triton, sparse_mla_ref

    g = torch.Generator(device="cuda").manual_seed(5)
    b, s, k, h = 2, 16384, 2048, 128
    q = torch.randn(b, h, 1, R + DR, device="cuda", generator=g)
    records = pack_record(torch.randn(b, s, R + DR, device="cuda", generator=g), R)
    idx = torch.stack([torch.randperm(s, device="cuda", generator=g)[:k] for _ in range(b)])[:, None]
    scale = (R + DR) ** -0.5
    kv = unpack_record(records, R)
    ref, _ = sparse_mla_ref(q, kv, idx, scale, R)
    got, _ = sparse_mla_fp8_triton(q.bfloat16(), records, idx, scale, R)
    base, _ = sparse_mqa(q.bfloat16(), kv.bfloat16(), idx, scale, R)
    assert _err(got, ref) <= 2 * _err(base, ref) + 1e-3
