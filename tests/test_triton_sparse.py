"""The Triton sparse MLA kernels (DSA's attention over top-k indices), forward and backward,
against their PyTorch reference in Triton's interpreter (fp32), on odd shapes: heads 1, 3, 16,
20 and 128; -1 slots, a token with no valid index at all, prefill and decode; every cache row no
token selects is NaN, so a read outside the selection shows."""

from __future__ import annotations

from collections.abc import Callable

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

pytest.importorskip("triton")  # conftest set TRITON_INTERPRET=1 before anything imported it
from conftest import INTERPRETER, assert_within_rounding
from latentattn.errors import ConfigError
from latentattn.kernels.sparse import gather_rows, sparse_mqa
from latentattn.kernels.sparse_mla import sparse_mla_ref, sparse_mla_triton

pytestmark = INTERPRETER  # the kernels on CPU tensors: only in the interpreter


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


def _ref64(q: torch.Tensor, kv: torch.Tensor, idx: torch.Tensor, scale: float, rank: int
           ) -> tuple[torch.Tensor, torch.Tensor]:
    """sparse_mla_ref's arithmetic in float64 (it computes in fp32), differentiable: the exact
    result, for fp32."""
    sel = gather_rows(kv.double(), idx.long())  # (B, T, K, D)
    s = torch.einsum("bhtd,btkd->bhtk", q.double(), sel) * scale
    s = s.masked_fill(~((idx >= 0) & (idx < kv.shape[1]))[:, None], float("-inf"))
    lse = torch.logsumexp(s, dim=-1)
    p = torch.exp(s - torch.where(torch.isinf(lse), 0.0, lse)[..., None])
    return torch.einsum("bhtk,btkc->bhtc", p, sel[..., :rank]), lse


def _check(got: tuple[torch.Tensor, torch.Tensor], q: torch.Tensor, kv: torch.Tensor, idx: torch.Tensor,
           scale: float, rank: int, want: tuple[torch.Tensor, torch.Tensor] | None = None) -> None:
    """(o, lse) within rounding of the float64 result: at most a few times as far from it as the
    fp32 PyTorch reference ``want`` (sparse_mla_ref's by default) is, and -inf exactly where it
    is, not a fixed atol that one CPU's summation order fits (conftest.assert_within_rounding)."""
    if want is None:
        want = sparse_mla_ref(q, kv, idx, scale, rank)
    terms = q.shape[-1] + idx.shape[-1]  # a score's dot product, then the softmax's sum over top-k
    for g, w, w64, m, what in zip(got, want, _ref64(q, kv, idx, scale, rank), _size(q, kv, scale, rank),
                                  ("o", "lse"), strict=True):
        assert_within_rounding(g, w64, w, terms=terms, magnitude=m, what=what)


def _size(q: torch.Tensor, kv: torch.Tensor, scale: float, rank: int) -> tuple[float, float]:
    """What o and the LSE sum: the largest value row (o averages them), the largest score's
    scale * sum_i |q_i k_i| (the dot product rounds with its terms, not their cancelling sum),
    over every row, selected or not (an upper bound)."""
    keys = kv.double().abs().nan_to_num()
    s = torch.einsum("bhtd,bsd->bhts", q.double().abs(), keys) * scale
    return float(keys[..., :rank].max()), float(s.max())


Attention = Callable[[torch.Tensor, torch.Tensor], tuple[torch.Tensor, torch.Tensor]]


def _check_grads(fn: Attention, q: torch.Tensor, kv: torch.Tensor, idx: torch.Tensor, scale: float,
                 rank: int, do: torch.Tensor) -> None:
    """dq and dkv of ``fn(q, kv)`` (o, lse) within rounding of float64 autograd through _ref64,
    judged by sparse_mla_ref's fp32 gradients' own error (conftest.assert_within_rounding)."""
    def grads(f: Attention, dtype: torch.dtype) -> tuple[torch.Tensor, ...]:
        qq, kk = q.to(dtype).requires_grad_(), kv.to(dtype).requires_grad_()
        return torch.autograd.grad(f(qq, kk)[0], (qq, kk), do.to(dtype))

    want = grads(lambda a, b: sparse_mla_ref(a, b, idx, scale, rank), torch.float32)
    want64 = grads(lambda a, b: _ref64(a, b, idx, scale, rank), torch.float64)
    # dkv sums over every (head, token, slot) that selected the row, after dq's sum over top-k
    terms = q.shape[-1] + idx.shape[-1] + q.shape[1] * q.shape[2] * idx.shape[-1]
    for g, w, w64, what in zip(grads(fn, torch.float32), want, want64, ("dq", "dkv"), strict=True):
        assert_within_rounding(g, w64, w, terms=terms, what=what)


SHAPES = [(1, 1, 1, 9, 5, 16, 16), (2, 3, 5, 40, 20, 24, 8), (1, 16, 3, 70, 33, 32, 16),
          (2, 20, 2, 30, 17, 40, 10), (1, 128, 1, 50, 21, 16, 16)]


@pytest.mark.parametrize("shape", SHAPES)
def test_forward_matches_reference(shape: tuple[int, ...]) -> None:
    q, kv, idx = _case(*shape)
    o, lse = sparse_mla_triton(q, kv, idx, 0.25, shape[5])
    _check((o, lse), q, kv.nan_to_num(), idx, 0.25, shape[5])  # -inf exactly where nothing is valid
    assert (o[0, :, 0] == 0).all()  # the token that selects nothing attends to nothing


@pytest.mark.parametrize("shape", SHAPES[1:3])
def test_gradients_match_reference(shape: tuple[int, ...]) -> None:
    q, kv, idx = _case(*shape, seed=1)
    kv = kv.nan_to_num()  # the reference's gather reads row 0 for -1 slots
    do = torch.randn(*q.shape[:3], shape[5], generator=torch.Generator().manual_seed(2))
    _check_grads(lambda qq, kk: sparse_mla_triton(qq, kk, idx, 0.25, shape[5]), q, kv, idx, 0.25,
                 shape[5], do)


@pytest.mark.parametrize("splits", [2, 3, 7])
def test_split_top_k_equals_no_split(splits: int) -> None:
    """Decode splits each token's top-k list (vLLM's policy) and merges the parts by LSE: the
    same output, a split whose every slot is invalid weighs nothing, and a token with nothing
    valid anywhere still gets 0 and LSE -inf."""
    q, kv, idx = _case(2, 3, 1, 300, 100, 24, 8, seed=4)
    idx[1, 0, 16:48] = -1  # a whole split of 16 (at 7 splits) with nothing valid
    kv = kv.nan_to_num()
    want = sparse_mla_ref(q, kv, idx, 0.2, 24)
    got = sparse_mla_triton(q, kv, idx, 0.2, 24, num_splits=splits)
    _check(sparse_mla_triton(q, kv, idx, 0.2, 24, num_splits=1), q, kv, idx, 0.2, 24, want)
    _check(got, q, kv, idx, 0.2, 24, want)
    assert (got[0][0, :, 0] == 0).all() and torch.isneginf(got[1][0, :, 0]).all()
    do = torch.randn(2, 3, 1, 24, generator=torch.Generator().manual_seed(5))
    _check_grads(lambda qq, kk: sparse_mla_triton(qq, kk, idx, 0.2, 24, num_splits=splits), q, kv, idx,
                 0.2, 24, do)


def test_agrees_with_the_models_sparse_path() -> None:
    """The PyTorch path DSA runs today (kernels.sparse.sparse_mqa) is the same function."""
    q, kv, idx = _case(2, 3, 6, 50, 12, 24, 8, seed=3)
    idx[0, 0, 0] = 4  # sparse_mqa needs one valid slot per token
    kv = kv.nan_to_num()
    # Both within rounding of the float64 result, as judged by sparse_mla_ref's error.
    o64, ref_o = _ref64(q, kv, idx, 0.3, 24)[0], sparse_mla_ref(q, kv, idx, 0.3, 24)[0]
    terms, size = q.shape[-1] + idx.shape[-1], _size(q, kv, 0.3, 24)[0]
    for got in (sparse_mla_triton(q, kv, idx, 0.3, 24)[0], sparse_mqa(q, kv, idx, 0.3, 24)[0]):
        assert_within_rounding(got, o64, ref_o, terms=terms, magnitude=size)


def test_bad_inputs_are_refused() -> None:
    q, kv, idx = _case(1, 3, 2, 9, 4, 16, 16)
    for args, message in [
        ((q, kv, idx + 100, 0.5, 16), "selects row"),
        ((q, kv.double(), idx, 0.5, 16), "of the same dtype"),
        ((q, kv, idx.float(), 0.5, 16), "int32 or int64"),
        ((q, kv, idx[:, :1], 0.5, 16), "do not match"),
        ((q, kv, idx, 0.5, 40), "inside the cache row"),
        ((q, kv, idx, 0.5, 16, 0), "num_splits must be >= 1"),
        # Tokens fit grid axis 0 (2^31 - 1 programs); sequences take axis 1, CUDA's 65,535.
        ((torch.zeros(1, 1, 1, 32).expand(65536, 1, 1, 32), torch.zeros(1, 9, 32).expand(65536, 9, 32),
          torch.zeros(1, 1, 1, dtype=torch.int32).expand(65536, 1, 1), 0.5, 16),
         "call it on smaller batches"),
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

    def grads(m: torch.nn.Module) -> list[torch.Tensor]:
        m.zero_grad()
        logits = m(x[:, :-1])
        loss = torch.nn.functional.cross_entropy(logits.flatten(0, 1), x[:, 1:].flatten())
        loss.backward()
        return [p.grad.clone() for p in m.parameters() if p.grad is not None]

    torch_grads = grads(model)
    with use_backend("triton"):
        triton_grads = grads(model)
    # The exact gradients: the same weights in float64, through the PyTorch path.
    exact = load("tiny-dsa", seed=0, dtype=torch.float64)
    exact.load_state_dict({k: v.double() for k, v in model.state_dict().items()})
    set_dsa_stage(exact, "sparse")
    want64 = grads(exact.train())
    assert len(triton_grads) == len(torch_grads) == len(want64) > 0
    terms = x.numel() + model.config.dim  # a weight's gradient sums over tokens, after a width's
    for got, want, w64 in zip(triton_grads, torch_grads, want64, strict=True):
        assert_within_rounding(got, w64, want, terms=terms)


@settings(max_examples=15, deadline=None, derandomize=True)
@given(b=st.integers(1, 2), h=st.integers(1, 40), t=st.integers(1, 4), s=st.integers(2, 90),
       k=st.integers(1, 70), rank=st.sampled_from([8, 24, 40]), rope=st.sampled_from([8, 16]),
       splits=st.integers(1, 4))
def test_any_shape_matches_the_reference(b: int, h: int, t: int, s: int, k: int, rank: int, rope: int,
                                         splits: int) -> None:
    """Random shapes (hypothesis), split or not: output, LSE (-inf exactly where nothing is
    valid) and both gradients within rounding of the float64 result; unselected rows NaN."""
    q, kv, idx = _case(b, h, t, s, k, rank, rope, seed=h * 7 + k)
    _check(sparse_mla_triton(q, kv, idx, 0.3, rank, num_splits=splits), q, kv.nan_to_num(), idx, 0.3,
           rank)
    do = torch.randn(b, h, t, rank, generator=torch.Generator().manual_seed(k))
    _check_grads(lambda qq, kk: sparse_mla_triton(qq, kk, idx, 0.3, rank, num_splits=splits), q,
                 kv.nan_to_num(), idx, 0.3, rank, do)


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
    _check(sparse_mla_fp8_triton(q, records, idx, 0.3, rank, num_splits=splits), q,
           unpack_record(records, rank).nan_to_num(), idx, 0.3, rank)
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
