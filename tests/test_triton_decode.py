"""The Triton absorbed-decode kernel against its PyTorch reference in Triton's interpreter (fp32:
bf16 tl.dot is wrong there, triton #11584), and the kernels compiled for sm_80 and sm_90.

Shapes are odd on purpose (heads 1, 3, 16, 20 and 128; latent ranks that are not powers of two;
cached lengths 1, 63, 97, 1025; pages of 16 and 64 in a shuffled pool; ragged batches), and
every cache slot past a sequence's end is NaN, so an over-read shows (FlashMLA's tests)."""

from __future__ import annotations

import copy
import importlib
import os
import subprocess
import sys

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

pytest.importorskip("triton")  # conftest set TRITON_INTERPRET=1 before anything imported it
from conftest import INTERPRETER, ROUNDING_FACTOR, assert_within_rounding
from latentattn.errors import ConfigError
from latentattn.kernels import triton_mla
from latentattn.kernels.mla_decode import mla_decode_ref, mla_decode_triton

pytestmark = INTERPRETER  # the kernels on CPU tensors: only in the interpreter

if os.environ.get("TRITON_INTERPRET") == "1":
    importlib.reload(triton_mla)  # kernels defined as interpreted, whoever imported them first


def _case(batch: int, heads: int, rank: int, rope: int, lengths: list[int], seed: int = 0
          ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(batch, heads, rank + rope, generator=g)
    kv = torch.randn(batch, max(lengths) + 5, rank + rope, generator=g)
    for b, n in enumerate(lengths):
        kv[b, n:] = float("nan")
    return q, kv, torch.tensor(lengths, dtype=torch.int32)


def _paged(kv: torch.Tensor, lengths: torch.Tensor, page: int, seed: int = 0
           ) -> tuple[torch.Tensor, torch.Tensor]:
    """The same rows in pages of a shuffled pool (unused pool slots NaN, unused table cells -1)."""
    need = [-(-int(n) // page) for n in lengths]
    pool = torch.full((sum(need) + 3, page, kv.shape[-1]), float("nan"))
    order = torch.randperm(pool.shape[0], generator=torch.Generator().manual_seed(seed))
    table = torch.full((kv.shape[0], max(need) + 1), -1, dtype=torch.int32)
    k = 0
    for b, n in enumerate(lengths.tolist()):
        for p in range(need[b]):
            pid = int(order[k])
            k += 1
            table[b, p] = pid
            rows = kv[b, p * page : min((p + 1) * page, n)]
            pool[pid, : rows.shape[0]] = rows
    return pool, table


def _ref64(q: torch.Tensor, kv: torch.Tensor, lengths: torch.Tensor, scale: float, rank: int,
           block_table: torch.Tensor | None = None) -> tuple[tuple[torch.Tensor, torch.Tensor], list[float]]:
    """mla_decode_ref's arithmetic in float64 (it computes in fp32): the exact (o, lse), for fp32;
    and the size of what each sums: the largest value row o averages, the largest score's
    scale * sum_i |q_i k_i| (the dot product rounds with its terms, not their cancelling sum)."""
    outs, lses, size = [], [], [0.0, 0.0]
    for i, n in enumerate(lengths.tolist()):
        rows = kv[i] if block_table is None else kv[block_table[i].clamp(min=0).long()].flatten(0, 1)
        rows = rows[:n].double()
        s = (q[i].double() @ rows.T) * scale
        outs.append(torch.softmax(s, dim=-1) @ rows[:, :rank])
        lses.append(torch.logsumexp(s, dim=-1))
        size = [max(size[0], float(rows[:, :rank].abs().max())),
                max(size[1], float((q[i].double().abs() @ rows.abs().T).max()) * scale)]
    return (torch.stack(outs), torch.stack(lses)), size


def _check(got: tuple[torch.Tensor, torch.Tensor], q: torch.Tensor, kv: torch.Tensor, n: torch.Tensor,
           scale: float, rank: int, table: torch.Tensor | None = None,
           want: tuple[torch.Tensor, torch.Tensor] | None = None) -> None:
    """(o, lse) within rounding of the float64 result on the cache ``kv`` (fp8 records
    dequantised): at most a few times as far from it as the fp32 PyTorch reference ``want``
    (mla_decode_ref's by default) is, not a fixed atol that one CPU's summation order fits
    (conftest.assert_within_rounding)."""
    assert torch.isfinite(got[0]).all() and torch.isfinite(got[1]).all()
    if want is None:
        want = mla_decode_ref(q, kv, n, scale, rank, block_table=table)
    want64, size = _ref64(q, kv, n, scale, rank, table)
    terms = q.shape[-1] + int(n.max())  # a score's dot product, then the softmax's sum over rows
    for g, w, w64, m, what in zip(got, want, want64, size, ("o", "lse"), strict=True):
        assert_within_rounding(g, w64, w, terms=terms, magnitude=m, what=what)


@pytest.mark.parametrize(("heads", "rank", "rope", "lengths"), [
    (1, 16, 16, [1]), (3, 40, 8, [1, 63, 97]), (16, 64, 16, [97, 1]), (20, 24, 10, [33, 64]),
    (128, 16, 16, [5, 40]),  # DeepSeek-V3's head count: 8 head blocks per sequence
])
@pytest.mark.parametrize("splits", [1, 3])
def test_contiguous_matches_reference(heads: int, rank: int, rope: int, lengths: list[int],
                                      splits: int) -> None:
    q, kv, n = _case(len(lengths), heads, rank, rope, lengths)
    _check(mla_decode_triton(q, kv, n, 0.21, rank, num_splits=splits), q, kv, n, 0.21, rank)


@pytest.mark.parametrize("page", [16, 64])
def test_paged_matches_reference_and_the_contiguous_cache(page: int) -> None:
    q, kv, n = _case(3, 3, 40, 8, [1, 63, 97], seed=1)
    pool, table = _paged(kv, n, page)
    want = mla_decode_ref(q, kv, n, 0.3, 40)
    _check(mla_decode_ref(q, pool, n, 0.3, 40, block_table=table), q, kv, n, 0.3, 40, want=want)
    _check(mla_decode_triton(q, pool, n, 0.3, 40, block_table=table, num_splits=2), q, kv, n, 0.3, 40,
           want=want)


def test_split_kv_equals_no_split_at_a_long_context() -> None:
    q, kv, n = _case(1, 3, 32, 16, [1025], seed=2)
    want = mla_decode_ref(q, kv, n, 0.2, 32)
    _check(mla_decode_triton(q, kv, n, 0.2, 32, num_splits=5), q, kv, n, 0.2, 32, want=want)  # 5th short
    _check(mla_decode_triton(q, kv, n, 0.2, 32, num_splits=1), q, kv, n, 0.2, 32, want=want)


@pytest.mark.parametrize("page", [None, 16])
def test_a_known_max_len_gives_the_same_result_without_reading_lengths(page: int | None) -> None:
    """The model's decode path passes the longest length it knows on the host: same output, and
    the value checks (host syncs) are skipped, only max_len against the cache's room is checked."""
    q, kv, n = _case(3, 5, 24, 8, [1, 63, 97], seed=5)
    table = None
    if page is not None:
        kv, table = _paged(kv, n, page)
    for max_len in (None, 97):
        _check(mla_decode_triton(q, kv, n, 0.3, 24, block_table=table, num_splits=2, max_len=max_len),
               q, kv, n, 0.3, 24, table)
    room = kv.shape[1] if table is None else kv.shape[1] * table.shape[1]
    with pytest.raises(ConfigError, match=f"max_len {room + 1} must lie in 1..{room}"):
        mla_decode_triton(q, kv, n, 0.3, 24, block_table=table, max_len=room + 1)


def test_more_splits_than_rows_leave_empty_splits_out() -> None:
    q, kv, n = _case(2, 3, 16, 16, [1, 40], seed=3)
    _check(mla_decode_triton(q, kv, n, 0.5, 16, num_splits=4), q, kv, n, 0.5, 16)


def _records(rank: int, rope: int, lengths: list[int], seed: int) -> torch.Tensor:
    """FlashMLA's fp8 records of random latents, every byte past a sequence's end 0xFF (its
    scales then read as NaN, so an over-read shows)."""
    from latentattn.cache.fp8 import pack_record

    g = torch.Generator().manual_seed(seed)
    latent = torch.randn(len(lengths), max(lengths) + 3, rank + rope, generator=g)
    records = pack_record(latent * torch.logspace(-1, 1, rank + rope), rank)
    for b, n in enumerate(lengths):
        records[b, n:] = 255
    return records


@pytest.mark.parametrize(("heads", "rank", "lengths"), [(3, 40, [1, 63, 97]), (16, 256, [97, 1025]),
                                                         (1, 128, [5])])
def test_fp8_records_match_the_reference_on_their_dequantised_cache(heads: int, rank: int,
                                                                    lengths: list[int]) -> None:
    """FlashMLA's practice: the reference reads the same dequantised cache, so quantisation
    error stays out of the tolerance (its size is bench fp8-cache's business)."""
    from latentattn.cache.fp8 import unpack_record
    from latentattn.kernels.mla_decode import mla_decode_fp8_ref, mla_decode_fp8_triton

    records = _records(rank, 16, lengths, seed=rank)
    q = torch.randn(len(lengths), heads, rank + 16, generator=torch.Generator().manual_seed(1))
    n = torch.tensor(lengths, dtype=torch.int32)
    want = mla_decode_fp8_ref(q, records, n, 0.2, rank)
    assert torch.isfinite(want[0]).all()
    _check(mla_decode_fp8_triton(q, records, n, 0.2, rank, num_splits=2), q,
           unpack_record(records, rank), n, 0.2, rank, want=want)


@pytest.mark.parametrize("page", [16, 64])
def test_paged_fp8_records_match_the_contiguous_ones(page: int) -> None:
    from latentattn.cache.fp8 import unpack_record
    from latentattn.kernels.mla_decode import mla_decode_fp8_ref, mla_decode_fp8_triton

    records = _records(48, 8, [1, 63, 97], seed=3)
    n = torch.tensor([1, 63, 97], dtype=torch.int32)
    pool, table = _paged(records.float(), n, page, seed=page)
    pool = pool.nan_to_num(255).to(torch.uint8)  # unused pool bytes 0xFF, as past the ends
    q = torch.randn(3, 5, 56, generator=torch.Generator().manual_seed(2))
    want, latent = mla_decode_fp8_ref(q, records, n, 0.3, 48), unpack_record(records, 48)
    _check(mla_decode_fp8_ref(q, pool, n, 0.3, 48, block_table=table), q, latent, n, 0.3, 48, want=want)
    _check(mla_decode_fp8_triton(q, pool, n, 0.3, 48, block_table=table, num_splits=3), q, latent, n,
           0.3, 48, want=want)


def test_fp8_records_refuse_what_they_cannot_hold() -> None:
    from latentattn.kernels.mla_decode import mla_decode_fp8_triton

    records = _records(40, 16, [4, 5], seed=0)
    q, n = torch.zeros(2, 3, 56), torch.tensor([4, 5], dtype=torch.int32)
    for call, message in [
        (lambda: mla_decode_fp8_triton(q, records[..., :-2], n, 0.2, 40), "holds 76 bytes, not 74"),
        (lambda: mla_decode_fp8_triton(q, records.float(), n, 0.2, 40), "uint8 records"),
        (lambda: mla_decode_fp8_triton(torch.zeros(2, 3, 176), records, n, 0.2, 160), "multiple of 128"),
        (lambda: mla_decode_fp8_triton(q, records, n + 9, 0.2, 40), "exceed the contiguous cache"),
    ]:
        with pytest.raises(ConfigError, match=message):
            call()


@pytest.mark.parametrize("page_size", [None, 4])
def test_a_tiny_model_decodes_through_the_fp8_kernel(page_size: int | None) -> None:
    from latentattn import load
    from latentattn.kernels.backend import use_backend

    model = load("tiny-mla", seed=0)
    prompt = torch.randint(0, 256, (2, 9), generator=torch.Generator().manual_seed(0))
    cache = model.make_cache(2, 16, latent_fp8=True, page_size=page_size)
    model(prompt, cache)  # the prefill (no kernel): three decodes read the same records
    caches = [cache, copy.deepcopy(cache), copy.deepcopy(cache)]
    want = model(prompt[:, -1:], caches[0])  # SDPA over the dequantised records
    with use_backend("triton"):
        got = model(prompt[:, -1:], caches[1])
    with use_backend("reference"):
        other = model(prompt[:, -1:], caches[2])
    # Two PyTorch paths (SDPA, the fp32 reference softmax) differ by rounding alone; the kernel,
    # one more fp32 order over the same records, may differ from SDPA by a few times as much
    # (flash-attention's rule), plus a floor of sqrt(terms) ulps of the logits.
    err, noise = float((got - want).abs().max()), float((other - want).abs().max())
    floor = (model.config.dim ** 0.5) * torch.finfo(torch.float32).eps * float(want.abs().max())
    assert err <= ROUNDING_FACTOR * noise + floor, (err, noise, floor)


def test_bad_inputs_are_refused() -> None:
    q, kv, n = _case(2, 3, 16, 16, [5, 9])
    pool, table = _paged(kv, n, 16)
    for call, message in [
        (lambda: mla_decode_triton(q, kv.double(), n, 0.5, 16), "same dtype"),
        (lambda: mla_decode_triton(q, kv, torch.tensor([5, 99], dtype=torch.int32), 0.5, 16),
         "exceed the contiguous cache"),
        (lambda: mla_decode_triton(q, kv, n, 0.5, 32), "must lie inside the cache row"),
        (lambda: mla_decode_triton(q, pool, n, 0.5, 16, block_table=table + 100),
         "points outside the pool"),
        (lambda: mla_decode_triton(q, pool, n, 0.5, 16, block_table=table[:, :0]), "more pages"),
        (lambda: mla_decode_triton(q, kv, n, 0.5, 16, num_splits=0), "num_splits must be >= 1"),
        (lambda: mla_decode_triton(torch.zeros(2, 3, 1100), torch.zeros(2, 9, 1100), n, 0.5, 1040),
         "latents up to 1024"),
    ]:
        with pytest.raises(ConfigError, match=message):
            call()


def test_kernels_compile_for_sm80_and_sm90() -> None:
    """No GPU needed: Triton's compiler and the wheel's ptxas lower every kernel to a cubin."""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    run = subprocess.run([sys.executable, "-m", "latentattn", "kernels", "compile", "--arch",
                          "sm_80,sm_90"], capture_output=True, text=True, env=env, timeout=600)
    assert run.returncode == 0, run.stdout + run.stderr
    assert "60 of 60 kernel configurations compiled within the limits of sm_80, sm_90" in run.stdout
    rows = [line for line in run.stdout.splitlines()
            if line.startswith(("| mla_decode", "| sparse_mla", "| indexer"))]
    assert len(rows) == 60 and all(line.endswith(("| ok |", "| ok, spills |")) for line in rows)
    # fp8 records, per arch and shape: dense decode contiguous/paged x one/4 splits, sparse one/4
    assert sum("fp8 record" in line for line in rows) == 2 * 2 * (4 + 2)
    assert {line.split(" | ")[0] for line in rows} == {"| mla_decode_stage1", "| mla_decode_stage2",
                                                        "| sparse_mla_fwd", "| sparse_mla_bwd",
                                                        "| indexer_logits"}
    bad = subprocess.run([sys.executable, "-m", "latentattn", "kernels", "compile", "--arch", "sm_70"],
                         capture_output=True, text=True, env=env, timeout=120)
    assert bad.returncode == 2 and "--arch takes a comma-separated list of sm_80, sm_90" in bad.stderr


def test_a_tiny_model_generates_through_the_kernel(monkeypatch: pytest.MonkeyPatch) -> None:
    from latentattn import load
    from latentattn.kernels.backend import get_backend, use_backend

    calls = []
    launch = triton_mla.launch_decode
    monkeypatch.setattr(triton_mla, "launch_decode", lambda *a: calls.append(a[0].shape) or launch(*a))
    model = load("tiny-mla", seed=0)
    prompt = torch.randint(0, 256, (2, 9), generator=torch.Generator().manual_seed(0))
    want = model.generate(prompt, 6)
    assert not calls and get_backend() == "auto"  # CPU tensors by default: PyTorch
    with use_backend("triton"):
        got = model.generate(prompt, 6)
    assert get_backend() == "auto"
    torch.testing.assert_close(got, want, rtol=0, atol=0)
    layers = model.config.n_layers
    assert len(calls) == 5 * layers and calls[0] == (2, 4, 40)  # 5 decode steps, (B, H, R + Dr)


@settings(max_examples=20, deadline=None, derandomize=True)
@given(heads=st.integers(1, 40), rank=st.sampled_from([8, 24, 40, 64]), rope=st.sampled_from([8, 16, 24]),
       lengths=st.lists(st.integers(1, 150), min_size=1, max_size=3),
       page=st.sampled_from([None, 4, 16]), splits=st.integers(1, 5), fp8=st.booleans())
def test_any_shape_matches_the_reference(heads: int, rank: int, rope: int, lengths: list[int],
                                         page: int | None, splits: int, fp8: bool) -> None:
    """Random shapes (hypothesis): bf16-row and fp8-record caches, contiguous or paged, split
    or not, NaN / 0xFF past every end, within rounding of the float64 result (_check)."""
    from latentattn.cache.fp8 import unpack_record
    from latentattn.kernels.mla_decode import mla_decode_fp8_ref, mla_decode_fp8_triton

    q, kv, n = _case(len(lengths), heads, rank, rope, lengths, seed=heads)
    if fp8:
        kv = _records(rank, rope, lengths, seed=heads).float()
    table = None
    if page is not None:
        kv, table = _paged(kv, n, page, seed=rank)
    if fp8:
        kv = kv.nan_to_num(255).to(torch.uint8)
        _check(mla_decode_fp8_triton(q, kv, n, 0.3, rank, block_table=table, num_splits=splits), q,
               unpack_record(kv, rank), n, 0.3, rank, table,
               want=mla_decode_fp8_ref(q, kv, n, 0.3, rank, block_table=table))
    else:
        _check(mla_decode_triton(q, kv, n, 0.3, rank, block_table=table, num_splits=splits), q, kv, n,
               0.3, rank, table)
