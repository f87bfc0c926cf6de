"""The Triton sparse MLA kernels (DSA's attention over top-k indices), forward and backward,
against their PyTorch reference in Triton's interpreter (fp32), on odd shapes: heads 1, 3, 16,
20 and 128; -1 slots, a token with no valid index at all, prefill and decode; every cache row no
token selects is NaN, so a read outside the selection shows."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

pytest.importorskip("triton")  # conftest set TRITON_INTERPRET=1 before anything imported it
from latentattn.errors import ConfigError
from latentattn.kernels.sparse import sparse_mqa
from latentattn.kernels.sparse_mla import sparse_mla_ref, sparse_mla_triton


def _case(b: int, h: int, t: int, s: int, k: int, rank: int, rope: int, seed: int = 0
          ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(b, h, t, rank + rope, generator=g)
    kv = torch.randn(b, s, rank + rope, generator=g)
    idx = torch.randint(0, s, (b, t, k), generator=g)
    idx[..., ::3] = -1  # invalid slots
    idx[0, 0] = -1  # a token that selects nothing
    chosen = torch.zeros(b, s, dtype=torch.bool)
    for i in range(b):
        chosen[i, idx[i][idx[i] >= 0]] = True
    kv[~chosen] = float("nan")  # rows nobody selected: an over-read would show
    return q, kv, idx


SHAPES = [(1, 1, 1, 9, 5, 16, 16), (2, 3, 5, 40, 20, 24, 8), (1, 16, 3, 70, 33, 32, 16),
          (2, 20, 2, 30, 17, 40, 10), (1, 128, 1, 50, 21, 16, 16)]


@pytest.mark.parametrize("shape", SHAPES)
def test_forward_matches_reference(shape: tuple[int, ...]) -> None:
    q, kv, idx = _case(*shape)
    o, lse = sparse_mla_triton(q, kv, idx, 0.25, shape[5])
    want_o, want_lse = sparse_mla_ref(q, kv.nan_to_num(), idx, 0.25, shape[5])
    torch.testing.assert_close(o, want_o, atol=2e-5, rtol=1e-5)
    assert torch.equal(torch.isinf(lse), torch.isinf(want_lse))  # -inf exactly where nothing is valid
    finite = torch.isfinite(want_lse)
    torch.testing.assert_close(lse[finite], want_lse[finite], atol=2e-5, rtol=1e-5)
    assert (o[0, :, 0] == 0).all()  # the token that selects nothing attends to nothing


@pytest.mark.parametrize("shape", SHAPES[1:3])
def test_gradients_match_reference(shape: tuple[int, ...]) -> None:
    q, kv, idx = _case(*shape, seed=1)
    kv = kv.nan_to_num()  # the reference's gather reads row 0 for -1 slots
    do = torch.randn(*q.shape[:3], shape[5], generator=torch.Generator().manual_seed(2))
    grads = []
    for fn in (sparse_mla_triton, sparse_mla_ref):
        qq, kk = q.clone().requires_grad_(), kv.clone().requires_grad_()
        o, _ = fn(qq, kk, idx, 0.25, shape[5])
        grads.append(torch.autograd.grad(o, (qq, kk), do))
    for got, want in zip(grads[0], grads[1], strict=True):
        torch.testing.assert_close(got, want, atol=5e-5, rtol=1e-4)


@pytest.mark.parametrize("splits", [2, 3, 7])
def test_split_top_k_equals_no_split(splits: int) -> None:
    """Decode splits each token's top-k list (vLLM's policy) and merges the parts by LSE: the
    same output, a split whose every slot is invalid weighs nothing, and a token with nothing
    valid anywhere still gets 0 and LSE -inf."""
    q, kv, idx = _case(2, 3, 1, 300, 100, 24, 8, seed=4)
    idx[1, 0, 16:48] = -1  # a whole split of 16 (at 7 splits) with nothing valid
    kv = kv.nan_to_num()
    one = sparse_mla_triton(q, kv, idx, 0.2, 24, num_splits=1)
    got = sparse_mla_triton(q, kv, idx, 0.2, 24, num_splits=splits)
    torch.testing.assert_close(got[0], one[0], atol=2e-5, rtol=1e-5)
    torch.testing.assert_close(got[1], one[1], atol=2e-5, rtol=1e-5)
    assert (got[0][0, :, 0] == 0).all() and torch.isneginf(got[1][0, :, 0]).all()
    want = sparse_mla_ref(q, kv, idx, 0.2, 24)
    torch.testing.assert_close(got[0], want[0], atol=2e-5, rtol=1e-5)
    qq, kk = q.clone().requires_grad_(), kv.clone().requires_grad_()
    do = torch.randn(2, 3, 1, 24, generator=torch.Generator().manual_seed(5))
    split_grads = torch.autograd.grad(sparse_mla_triton(qq, kk, idx, 0.2, 24, num_splits=splits)[0],
                                      (qq, kk), do)
    ref_grads = torch.autograd.grad(sparse_mla_ref(qq, kk, idx, 0.2, 24)[0], (qq, kk), do)
    for a, b in zip(split_grads, ref_grads, strict=True):
        torch.testing.assert_close(a, b, atol=5e-5, rtol=1e-4)


def test_split_policy() -> None:
    from latentattn.kernels.sparse_mla import default_sparse_splits

    assert default_sparse_splits(1, 128, 2048) == 16  # one decode token, 8 head blocks: split
    assert default_sparse_splits(1, 16, 256) == 2  # never under 128 entries a split
    assert default_sparse_splits(64, 128, 2048) == 1  # 512 programs fill 132 SMs already
    assert default_sparse_splits(4096, 128, 2048) == 1  # prefill and training never split


def test_agrees_with_the_models_sparse_path() -> None:
    """The PyTorch path DSA runs today (kernels.sparse.sparse_mqa) is the same function."""
    q, kv, idx = _case(2, 3, 6, 50, 12, 24, 8, seed=3)
    idx[0, 0, 0] = 4  # sparse_mqa needs one valid slot per token
    kv = kv.nan_to_num()
    o, _ = sparse_mla_triton(q, kv, idx, 0.3, 24)
    want, _ = sparse_mqa(q, kv, idx, 0.3, 24)
    torch.testing.assert_close(o, want, atol=2e-5, rtol=1e-5)


def test_bad_inputs_are_refused() -> None:
    q, kv, idx = _case(1, 3, 2, 9, 4, 16, 16)
    for args, message in [
        ((q, kv, idx + 100, 0.5, 16), "selects row"),
        ((q, kv.double(), idx, 0.5, 16), "of the same dtype"),
        ((q, kv, idx.float(), 0.5, 16), "int32 or int64"),
        ((q, kv, idx[:, :1], 0.5, 16), "do not match"),
        ((q, kv, idx, 0.5, 40), "inside the cache row"),
        ((q, kv, idx, 0.5, 16, 0), "num_splits must be >= 1"),
        ((torch.zeros(1, 1, 65536, 32), kv, torch.zeros(1, 65536, 1, dtype=torch.int32), 0.5, 16),
         "call it on chunks"),
    ]:
        with pytest.raises(ConfigError, match=message):
            sparse_mla_triton(*args)  # type: ignore[arg-type]


def test_a_tiny_dsa_model_generates_and_trains_through_the_kernels() -> None:
    from latentattn import load
    from latentattn.kernels.backend import use_backend
    from latentattn.train.dsa import set_dsa_stage

    model = load("tiny-dsa", seed=0)
    prompt = torch.randint(0, 256, (2, 40), generator=torch.Generator().manual_seed(0))
    want = model.generate(prompt, 6)  # 40 > index_topk 8: the selection is sparse for real
    with use_backend("triton"):
        got = model.generate(prompt, 6)
    torch.testing.assert_close(got, want, rtol=0, atol=0)
    set_dsa_stage(model, "sparse")
    model.train()
    x = torch.randint(0, 256, (2, 33), generator=torch.Generator().manual_seed(1))

    def grads() -> list[torch.Tensor]:
        model.zero_grad()
        logits = model(x[:, :-1])
        loss = torch.nn.functional.cross_entropy(logits.flatten(0, 1), x[:, 1:].flatten())
        loss.backward()
        return [p.grad.clone() for p in model.parameters() if p.grad is not None]

    torch_grads = grads()
    with use_backend("triton"):
        triton_grads = grads()
    assert len(triton_grads) == len(torch_grads) > 0
    for a, b in zip(triton_grads, torch_grads, strict=True):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-4)


@settings(max_examples=15, deadline=None, derandomize=True)
@given(b=st.integers(1, 2), h=st.integers(1, 40), t=st.integers(1, 4), s=st.integers(2, 90),
       k=st.integers(1, 70), rank=st.sampled_from([8, 24, 40]), rope=st.sampled_from([8, 16]),
       splits=st.integers(1, 4))
def test_any_shape_matches_the_reference(b: int, h: int, t: int, s: int, k: int, rank: int, rope: int,
                                         splits: int) -> None:
    """Random shapes (hypothesis), split or not: output, LSE (-inf exactly where nothing is
    valid) and both gradients against the fp32 reference; unselected rows NaN."""
    q, kv, idx = _case(b, h, t, s, k, rank, rope, seed=h * 7 + k)
    o, lse = sparse_mla_triton(q, kv, idx, 0.3, rank, num_splits=splits)
    want_o, want_lse = sparse_mla_ref(q, kv.nan_to_num(), idx, 0.3, rank)
    torch.testing.assert_close(o, want_o, atol=2e-5, rtol=1e-5)
    assert torch.equal(torch.isinf(lse), torch.isinf(want_lse))
    finite = torch.isfinite(want_lse)
    torch.testing.assert_close(lse[finite], want_lse[finite], atol=2e-5, rtol=1e-5)
    kv = kv.nan_to_num()
    do = torch.randn(b, h, t, rank, generator=torch.Generator().manual_seed(k))
    grads = []
    for fn in (lambda qq, kk: sparse_mla_triton(qq, kk, idx, 0.3, rank, num_splits=splits),
               lambda qq, kk: sparse_mla_ref(qq, kk, idx, 0.3, rank)):
        qq, kk = q.clone().requires_grad_(), kv.clone().requires_grad_()
        grads.append(torch.autograd.grad(fn(qq, kk)[0], (qq, kk), do))
    for got, want in zip(grads[0], grads[1], strict=True):
        torch.testing.assert_close(got, want, atol=5e-5, rtol=1e-4)


@pytest.mark.parametrize("keys", ["model", "fp8"])
def test_dsa_decode_reads_the_stored_keys_and_latents_in_place(keys: str,
                                                               monkeypatch: pytest.MonkeyPatch) -> None:
    """At decode the indexer kernel gets the cache's own keys (fp8 bytes and scales, or the model
    dtype), not an fp32 copy, and the sparse kernel the cache's latent rows as a strided view
    of the whole buffer; the tokens equal the PyTorch path's."""
    from latentattn import load
    from latentattn.kernels import triton_indexer, triton_sparse
    from latentattn.kernels.backend import use_backend

    seen: list[tuple[torch.dtype, bool, bool]] = []
    launch_indexer, launch_fwd = triton_indexer.launch_indexer, triton_sparse.launch_fwd

    def indexer(q: torch.Tensor, w: torch.Tensor, k: torch.Tensor, *rest: object) -> torch.Tensor:
        seen.append((k.dtype, rest[0] is not None, k.is_contiguous()))
        return launch_indexer(q, w, k, *rest)  # type: ignore[arg-type]

    strided: list[bool] = []

    def fwd(q: torch.Tensor, kv: torch.Tensor, *rest: object) -> tuple[torch.Tensor, torch.Tensor]:
        strided.append(not kv.is_contiguous())
        return launch_fwd(q, kv, *rest)  # type: ignore[arg-type]

    monkeypatch.setattr(triton_indexer, "launch_indexer", indexer)
    monkeypatch.setattr(triton_sparse, "launch_fwd", fwd)
    model = load("tiny-dsa", seed=0, indexer_key_cache=keys)
    prompt = torch.randint(0, 256, (2, 40), generator=torch.Generator().manual_seed(3))
    want = model.generate(prompt, 5)
    assert not seen
    with use_backend("triton"):
        got = model.generate(prompt, 5)
    torch.testing.assert_close(got, want, rtol=0, atol=0)
    stored = torch.uint8 if keys == "fp8" else torch.float32
    assert seen and all(s == (stored, keys == "fp8", False) for s in seen)  # in place, as stored
    assert strided and all(strided)  # the latent too: [:, :kv_len] of the whole cache


@pytest.mark.parametrize(("shape", "splits"), [((2, 3, 2, 60, 20, 40, 8), 1),
                                               ((2, 17, 1, 300, 150, 128, 16), 2)])
def test_fp8_records_match_the_reference_on_their_dequantised_cache(shape: tuple[int, ...],
                                                                    splits: int) -> None:
    """FlashMLA's sparse decode format: each selected 656-style record decoded in the kernel,
    against the reference on the same records dequantised; records nobody selected are 0xFF
    (NaN scales), so a read outside the selection shows."""
    from latentattn.cache.fp8 import pack_record, unpack_record
    from latentattn.kernels.sparse_mla import sparse_mla_fp8_triton

    s, rank = shape[3], shape[5]
    q, kv, idx = _case(*shape, seed=9)
    records = pack_record(kv.nan_to_num(), rank)
    records[kv.isnan().any(-1)] = 255
    o, lse = sparse_mla_fp8_triton(q, records, idx, 0.3, rank, num_splits=splits)
    want_o, want_lse = sparse_mla_ref(q, unpack_record(records, rank).nan_to_num(), idx, 0.3, rank)
    torch.testing.assert_close(o, want_o, atol=2e-5, rtol=1e-5)
    finite = torch.isfinite(want_lse)
    assert torch.equal(finite, torch.isfinite(lse))
    torch.testing.assert_close(lse[finite], want_lse[finite], atol=2e-5, rtol=1e-5)
    for call, message in [
        (lambda: sparse_mla_fp8_triton(q, records[..., :-2], idx, 0.3, rank), "do not hold"),
        (lambda: sparse_mla_fp8_triton(q, records, idx.clamp(min=0) + s, 0.3, rank), "selects row"),
        (lambda: sparse_mla_fp8_triton(q.requires_grad_(), records, idx, 0.3, rank), "no backward"),
    ]:
        with pytest.raises(ConfigError, match=message):
            call()


def test_dsa_decodes_over_fp8_latent_records_through_the_kernel(monkeypatch: pytest.MonkeyPatch) -> None:
    """V3.2 as served: fp8 indexer keys and fp8 latent records, both read in place by the
    kernels at decode; the tokens equal the PyTorch path's over the same cache."""
    from latentattn import load
    from latentattn.kernels import triton_sparse
    from latentattn.kernels.backend import use_backend

    calls: list[bool] = []
    launch_fwd = triton_sparse.launch_fwd

    def fwd(*args: object, **kw: object) -> tuple[torch.Tensor, torch.Tensor]:
        calls.append(bool(kw.get("fp8")))
        return launch_fwd(*args, **kw)  # type: ignore[arg-type]

    monkeypatch.setattr(triton_sparse, "launch_fwd", fwd)
    model = load("tiny-dsa", seed=0, indexer_key_cache="fp8")
    prompt = torch.randint(0, 256, (2, 40), generator=torch.Generator().manual_seed(4))
    want = model.generate(prompt, 5, latent_fp8=True)
    with use_backend("triton"):
        got = model.generate(prompt, 5, latent_fp8=True)
    torch.testing.assert_close(got, want, rtol=0, atol=0)
    assert calls and all(calls)  # every decode step's sparse attention read the records
