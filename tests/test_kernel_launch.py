"""How the kernels are launched, checked without a GPU: offsets past 2^31 elements (in the
interpreter, in a subprocess: int32 offsets read a wrapped address and crash it), grids past
CUDA's 65,535 limit, index tensors on the data's device, the device guard, the split policies
with the SM count of the device, no merge for one split, and the compile check's specialisation
of the launches as Triton's runtime makes it."""

from __future__ import annotations

import math
import os
import subprocess
import sys
from types import SimpleNamespace
from unittest import mock

import pytest
import torch

pytest.importorskip("triton")
from latentattn.errors import ConfigError
from latentattn.kernels import mla_decode, sparse_mla
from latentattn.kernels.mla_decode import default_splits, sm_count, split_count
from latentattn.kernels.sparse_mla import default_sparse_splits

# A q whose head (or token) stride is under 2^31 elements, so Triton passes it as an int32, while
# head (token) 2 starts past 2^31: with int32 offsets, h * stride wraps negative. The tensor spans
# ~8.6 GB of address space, of which only the rows the kernels read are ever touched.
OFFSETS = r"""
import torch
from latentattn.kernels.indexer_logits import indexer_logits_ref
from latentattn.kernels.sparse_mla import sparse_mla_ref
from latentattn.kernels.triton_indexer import launch_indexer
from latentattn.kernels.triton_sparse import launch_fwd

big = 2**30 + 1024  # < 2^31; 2 * big > 2^31
g = torch.Generator().manual_seed(0)

def strided(shape, axis):
    # a view of shape whose stride on axis is big, every row written, nothing else touched
    strides = list(torch.empty(shape).stride())
    strides[axis] = big
    for a in range(axis - 1, -1, -1):
        strides[a] = strides[a + 1] * shape[a + 1] if a + 1 != axis else big * shape[axis]
    base = torch.empty(big * (shape[axis] - 1) + strides[axis + 1] * shape[axis + 1] + 64)
    view = base.as_strided(shape, strides)
    small = torch.randn(*shape, generator=g)
    view.copy_(small)
    return view, small

# Sparse attention: q (1, 3 heads, 2 tokens, 32) with its head stride past 2^31 / 2.
q, q_small = strided((1, 3, 2, 32), 1)
kv = torch.randn(1, 8, 32, generator=g)
idx = torch.randint(0, 8, (1, 2, 4), generator=g, dtype=torch.int32)
o, lse = launch_fwd(q, kv, idx, 0.3, 16)
want_o, want_lse = sparse_mla_ref(q_small, kv, idx, 0.3, 16)
print("sparse", float((o - want_o).abs().max()), float((lse - want_lse).abs().max()))

# The indexer: q (1, 3 tokens, 2 heads, 16) with its token stride past 2^31 / 2.
qi, qi_small = strided((1, 3, 2, 16), 1)
w = torch.randn(1, 3, 2, generator=g)
k = torch.randn(1, 5, 16, generator=g)
pos = torch.tensor([[2, 3, 4]])
got = launch_indexer(qi, w, k, None, pos, 0.25)
want = indexer_logits_ref(qi_small, w, k, pos, 0.25)
finite = torch.isfinite(want)  # keys past a token's position: -inf in both
assert torch.equal(torch.isfinite(got), finite)
print("indexer", float((got - want)[finite].abs().max()))
"""


def test_offsets_past_2_31_elements_read_the_right_rows() -> None:
    """Fails (a crash, or wrong rows) with int32 offsets; the kernels compute them in int64. The
    results are compared at fp32 rounding: a wrong row would differ by O(1)."""
    env = {**os.environ, "TRITON_INTERPRET": "1"}
    run = subprocess.run([sys.executable, "-c", OFFSETS], capture_output=True, text=True, env=env,
                         timeout=300)
    assert run.returncode == 0, f"exit {run.returncode}: {run.stderr[-2000:]}"
    diffs = {line.split()[0]: [float(x) for x in line.split()[1:]] for line in run.stdout.splitlines()}
    # fp32 products of 32 (16) terms of N(0, 1) values: rounding ~1e-6; a wrong row gives O(1).
    assert set(diffs) == {"sparse", "indexer"}
    assert all(d < 1e-4 for d in diffs["sparse"] + diffs["indexer"]), diffs


# ---------------------------------------------------------------------------- split policies
def test_split_count_fills_the_gpu_with_wave_quantisation() -> None:
    assert split_count(8, 16, 132) == 14  # 8 blocks: 14 splits make 112 programs, one wave
    assert split_count(64, 16, 132) == 2  # 64 blocks: 128 programs in one wave, not 3 in two
    assert split_count(106, 16, 132) == 1  # 80% of the SMs busy: no split
    assert split_count(1, 1, 132) == 1  # too short to split
    assert split_count(1, 40, 132) == split_count(1, 16, 132) == 14  # capped at 16, then 85%
    # With 108 SMs (an A100), 8 blocks take 12 splits: 96 programs in one wave.
    assert split_count(8, 16, 108) == 12
    for blocks in range(1, 200):  # the rule, by brute force: fewest splits within 85% of best
        for sms in (78, 108, 132):
            def occupied(n: int, sms: int = sms) -> float:
                return n / (sms * math.ceil(n / sms))  # share of the waves' SM slots in use

            s = split_count(blocks, 16, sms)
            if blocks >= 0.8 * sms:
                assert s == 1
                continue
            best = max(occupied(blocks * n) for n in range(1, 17))
            assert occupied(blocks * s) >= 0.85 * best
            assert all(occupied(blocks * n) < 0.85 * best for n in range(1, s))


def test_dense_and_sparse_policies() -> None:
    assert default_splits(1, 128, 65536) == 14  # one sequence, 8 head blocks
    assert default_splits(8, 128, 65536) == 2  # the batch of 8 the review found unsplit
    assert default_splits(128, 128, 65536) == 1  # 1,024 head blocks fill the GPU
    assert default_splits(1, 16, 64) == 1  # never splits under 4 tiles of 32 rows
    assert default_splits(1, 16, 256) == 2  # 2 splits of 4 tiles at most
    assert default_sparse_splits(1, 128, 2048) == 14  # a decode token at 128 heads
    assert default_sparse_splits(8, 128, 2048) == 2  # a batch of 8: 64 programs, now 128
    assert default_sparse_splits(1, 16, 256) == 2  # never under 128 entries a split
    assert default_sparse_splits(4096, 128, 2048) == 1  # prefill and training never split


def test_the_sm_count_comes_from_the_device(monkeypatch: pytest.MonkeyPatch) -> None:
    props = SimpleNamespace(multi_processor_count=108)
    monkeypatch.setattr(torch.cuda, "get_device_properties", lambda device: props)
    assert sm_count(torch.device("cuda", 1)) == 108
    assert sm_count(torch.device("cpu")) == mla_decode.H100_SMS  # the interpreter: an H100's
    monkeypatch.setattr(mla_decode, "sm_count", lambda device: 108)
    q = torch.empty(1, 128, 576, device="meta")
    assert mla_decode._splits(q, 65536, None) == 12
    monkeypatch.setattr(sparse_mla, "sm_count", lambda device: 108)
    assert sparse_mla._splits(torch.empty(1, 128, 1, 576), torch.empty(1, 1, 2048), None) == 12


# ---------------------------------------------------------------------------- launches
def meta(*shape: int, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    return torch.empty(*shape, dtype=dtype, device="meta")


def test_one_split_launches_no_merge_and_index_tensors_move_to_q() -> None:
    from latentattn.kernels import triton_mla, triton_sparse

    q, kv = meta(2, 20, 48), meta(2, 300, 48)
    lengths = torch.tensor([300, 7], dtype=torch.int32)  # on the CPU, q on "meta"
    one, o, lse = triton_mla.decode_launches(q, kv, lengths, 0.1, 32, None, 1, 300)
    assert [x.name for x in one] == ["mla_decode_stage1"]
    assert o.dtype == q.dtype and o.shape == (2, 20, 32) and lse.shape == (2, 20)
    assert one[0].args[2].device == q.device  # lengths
    table = torch.zeros(2, 5, dtype=torch.int64)
    two, o, _ = triton_mla.decode_launches(q, meta(10, 64, 48), lengths, 0.1, 32, table, 3, 300)
    assert [x.name for x in two] == ["mla_decode_stage1", "mla_decode_stage2"]
    assert two[0].args[3].device == q.device and two[0].args[3].dtype == torch.int32  # the table
    assert two[0].args[4].dtype == torch.float32 and o.dtype == q.dtype  # fp32 partials, merged
    idx = torch.zeros(2, 3, 64, dtype=torch.int32)
    fwd, _, _ = triton_sparse.fwd_launches(meta(2, 20, 3, 48), meta(2, 40, 48),
                                           idx.to("meta"), 0.1, 32, 1)
    assert len(fwd) == 1


def test_prefills_past_65535_tokens_fit_the_grid() -> None:
    """Tokens share grid axis 0 (2^31 - 1 programs) with the head blocks; sequences take axis 1."""
    from latentattn.kernels import triton_indexer, triton_sparse

    t = 131072
    fwd, _, _ = triton_sparse.fwd_launches(meta(1, 128, t, 576, dtype=torch.bfloat16),
                                           meta(1, t, 576, dtype=torch.bfloat16),
                                           meta(1, t, 2048, dtype=torch.int32), 0.1, 512)
    assert fwd[0].grid == (8 * t, 1)
    bwd, _, _ = triton_sparse.bwd_launch(meta(1, 128, t, 576), meta(1, t, 576),
                                         meta(1, t, 2048, dtype=torch.int32), meta(1, 128, t, 512),
                                         meta(1, 128, t), meta(1, 128, t, 512), 0.1, 512)
    assert bwd.grid == (8 * t, 1)
    ix, _ = triton_indexer.indexer_launch(meta(1, t, 64, 128), meta(1, t, 64), meta(1, t, 128),
                                          None, meta(1, t, dtype=torch.int64), 0.1)
    assert ix.grid == (t * (t // triton_indexer.BLOCK_S), 1)
    with pytest.raises(ConfigError, match="past CUDA's limit of 65,535"):
        triton_sparse.fwd_launches(meta(70000, 16, 1, 48), meta(70000, 8, 48),
                                   meta(70000, 1, 8, dtype=torch.int32), 0.1, 32)
    with pytest.raises(ConfigError, match="at most 65,535, got B 70,000"):
        sparse_mla.check_sparse_inputs(meta(70000, 16, 1, 48), meta(70000, 8, 48),
                                       meta(70000, 1, 8, dtype=torch.int32), 32, False)


def test_kernels_launch_on_their_tensors_device(monkeypatch: pytest.MonkeyPatch) -> None:
    from latentattn.kernels import triton_launch

    entered: list[torch.device] = []

    class Guard:
        def __init__(self, device: torch.device) -> None:
            self.device = device

        def __enter__(self) -> None:
            entered.append(self.device)

        def __exit__(self, *exc: object) -> None:
            pass

    monkeypatch.setattr(torch.cuda, "device", Guard)
    on_gpu1 = mock.Mock(spec=torch.Tensor, is_cuda=True, device=torch.device("cuda", 1))
    with triton_launch.device_guard((torch.zeros(1), on_gpu1)):
        pass
    assert entered == [torch.device("cuda", 1)]
    with triton_launch.device_guard((torch.zeros(1), 3, 0.5)):
        pass  # CPU tensors (the interpreter): no CUDA guard
    assert entered == [torch.device("cuda", 1)]


def test_data_on_two_devices_is_refused() -> None:
    from latentattn.kernels.indexer_logits import indexer_logits_triton

    with pytest.raises(ConfigError, match=r"q is on cpu but a \(2, 3\) input is on meta"):
        mla_decode.check_devices("mla_decode", torch.zeros(1), meta(2, 3))
    q, w = torch.zeros(1, 1, 2, 16), torch.zeros(1, 1, 2)
    with pytest.raises(ConfigError, match=r"indexer_logits: q is on cpu but a \(1, 5, 16\) input"):
        indexer_logits_triton(q, w, meta(1, 5, 16), torch.zeros(1, 1, dtype=torch.int64), 0.1)


def test_the_compile_check_specialises_as_the_runtime_does() -> None:
    """Ints equal to 1 become constants and pointers and ints divisible by 16 carry
    tt.divisibility 16 (Triton's runtime binder); the launch's warps and stages are the ones the
    compile check uses, since it compiles the launcher's own Launch."""
    from latentattn.kernels import triton_mla

    q, kv = meta(2, 128, 576, dtype=torch.bfloat16), meta(2, 4096, 576, dtype=torch.bfloat16)
    (stage1,), _, _ = triton_mla.decode_launches(q, kv, meta(2, dtype=torch.int32), 0.1, 512,
                                                 None, 1, 4096)
    sig, consts, attrs = stage1.specialisation()
    names = triton_mla.mla_decode_stage1.arg_names
    assert sig["Q"] == "*bf16" and sig["sm_scale_log2"] == "fp32"
    assert sig["heads"] == "i32" and attrs[(names.index("heads"),)] == [["tt.divisibility", 16]]
    assert sig["stride_os"] == "i32" and consts["RANK"] == 512
    assert (names.index("Q"),) in attrs
    assert stage1.num_warps == triton_mla.decode_warps(512) and stage1.num_stages == 2
    (one_head,), _, _ = triton_mla.decode_launches(meta(2, 1, 576, dtype=torch.bfloat16), kv,
                                                   meta(2, dtype=torch.int32), 0.1, 512, None, 1,
                                                   4096)
    sig, consts, _ = one_head.specialisation()
    assert sig["heads"] == "constexpr" and consts["heads"] == 1
