"""V4's kernels against their references: the indexer selection (``kernels.v4.select_entries``)
against ``kernels.sparse.select_topk`` (itself tested against dense scores and
``topk_reference``): the same entries in the same order, on odd sizes, ragged rows, tiny blocks
that split the keys and queries many ways, fewer entries than k, exact ties, and bf16 keys; the
decode projection (``kernels.v4.linear``) against ``F.linear`` within rounding; the gathered
attention (``kernels.v4.v4_attend``) against the dense ``v4_attend_reference`` within rounding,
for every query block size."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from conftest import assert_within_rounding
from latentattn.kernels.sparse import select_topk
from latentattn.kernels.v4 import (
    ROW_BLOCKS,
    entry_visibility,
    linear,
    select_entries,
    selected_mask,
    v4_attend,
    v4_attend_reference,
)

CASES = {  # batch, queries, heads, dim, entries, k
    "decode": (1, 1, 16, 24, 301, 37),
    "prefill": (2, 45, 7, 20, 97, 13),
    "k-above-entries": (2, 9, 5, 12, 11, 40),
    "no-entries": (1, 3, 4, 8, 0, 5),
}


def inputs(case: str, seed: int = 0) -> tuple[torch.Tensor, ...]:
    b, t, h, d, e, _ = CASES[case]
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(b, t, h, d, generator=g)
    w = torch.randn(b, t, h, generator=g)
    keys = torch.randn(b, e, d, generator=g)
    # ragged: each row's queries see up to a different last entry, some none (-1)
    last = torch.randint(-1, max(e, 1), (b, t), generator=g).sort(dim=1).values
    return q, w, keys, last


@pytest.mark.parametrize("case", CASES)
@pytest.mark.parametrize(("rows", "block_bytes"), [(2048, 16 << 20), (1, 4), (20, 1000)])
def test_select_entries_is_select_topk(case: str, rows: int, block_bytes: int) -> None:
    q, w, keys, last = inputs(case)
    k = CASES[case][-1]
    want = select_topk(q, w, keys, last, k, 0.3)
    got = select_entries(q, w, keys, last, k, 0.3, rows=rows, block_bytes=block_bytes)
    assert torch.equal(got, want)


def test_ties_go_to_the_earlier_entry() -> None:
    """Every key scores 0 for queries whose heads all see negative dot products (ReLU): the
    selection is then the earliest visible entries, as select_topk picks them."""
    q, w, keys, last = inputs("prefill", seed=3)
    keys = keys.abs()
    q[:, ::2] = -q[:, ::2].abs()  # every other query: all dot products < 0, all scores 0
    want = select_topk(q, w, keys, last, 13, 1.0)
    got = select_entries(q, w, keys, last, 13, 1.0, rows=14, block_bytes=200)
    assert torch.equal(got, want)


def test_bf16_keys_are_scored_in_fp32() -> None:
    q, w, keys, last = inputs("prefill", seed=1)
    half = keys.bfloat16()
    want = select_topk(q, w, half.float(), last, 13, 0.3)
    assert torch.equal(select_entries(q, w, half, last, 13, 0.3, rows=20, block_bytes=1000), want)


@pytest.mark.parametrize("shape", [(1, 1, 97), (97,), (1, 3, 97)])  # one row (fast path), several
@pytest.mark.parametrize("out", [8 * ROW_BLOCKS * 5, 8 * ROW_BLOCKS * 5 + 3])  # blocks, or not
def test_linear_is_f_linear(shape: tuple[int, ...], out: int) -> None:
    g = torch.Generator().manual_seed(0)
    x, weight = torch.randn(shape, generator=g), torch.randn(out, shape[-1], generator=g)
    got, want = linear(x, weight), F.linear(x, weight)
    assert got.shape == want.shape
    assert_within_rounding(got, F.linear(x.double(), weight.double()), want, terms=shape[-1],
                           magnitude=float(want.abs().max()))
    half = linear(x.bfloat16(), weight.bfloat16())  # bf16 takes F.linear itself
    assert torch.equal(half, F.linear(x.bfloat16(), weight.bfloat16()))


def test_linear_gradients_are_f_linear_s() -> None:
    """Gradients through the row blocks (bmm of an expanded row) equal F.linear's within the
    rounding of their sums (x's gradient sums over the 4 * ROW_BLOCKS outputs)."""
    g = torch.Generator().manual_seed(1)
    x0, w0 = torch.randn(1, 1, 33, generator=g), torch.randn(4 * ROW_BLOCKS, 33, generator=g)

    def grads(fn: object, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        assert callable(fn)
        x, w = x0.to(dtype).clone().requires_grad_(), w0.to(dtype).clone().requires_grad_()
        fn(x, w).square().sum().backward()
        assert x.grad is not None and w.grad is not None
        return x.grad, w.grad

    got, base = grads(linear, torch.float32), grads(F.linear, torch.float32)
    exact = grads(F.linear, torch.float64)
    for a, b, c, terms in zip(got, base, exact, (4 * ROW_BLOCKS, 33), strict=True):
        assert_within_rounding(a, c, b, terms=terms, magnitude=float(c.abs().max()))


@pytest.mark.parametrize("form", ["sliding", "csa", "hca"])
@pytest.mark.parametrize("q_block", [1, 5, 16, 64])
def test_v4_attend_is_the_dense_reference(form: str, q_block: int) -> None:
    """A sequence from position 0 (the window ring empty, window_ok False): odd sizes, a window
    shorter than the sequence, CSA's selection random among each query's visible entries with
    -1 slots, HCA's every visible entry."""
    b, t, h, d, window, rate, k = 2, 29, 3, 20, 6, 3, 4
    g = torch.Generator().manual_seed(7)
    q, keys = torch.randn(b, t, h, d, generator=g), torch.randn(b, t, d, generator=g)
    entries, sinks = torch.randn(b, t // rate, d, generator=g), torch.randn(h, generator=g)
    visible = entry_visibility(torch.arange(t).expand(b, t), rate)  # (B, T)
    ring = torch.zeros(b, window, d)
    ok = torch.cat((torch.zeros(b, window, dtype=torch.bool), torch.ones(b, t, dtype=torch.bool)), 1)
    kw: dict[str, torch.Tensor] = {}
    mask = None
    if form == "csa":  # k random distinct visible entries, -1 where fewer are visible
        rank = torch.rand(b, t, t // rate, generator=g).masked_fill(
            torch.arange(t // rate) >= visible[..., None], 2.0).argsort(-1)[..., :k]
        kw["selected"] = rank.masked_fill(rank >= visible[..., None], -1)
        kw["entries"], mask = entries, selected_mask(kw["selected"], t // rate)
    elif form == "hca":
        kw["entries"], kw["visible_entries"] = entries, visible
        mask = torch.arange(t // rate) < visible[..., None]
    got = v4_attend(q, torch.cat((ring, keys), 1), ok, window, sinks, 0.2, q_block=q_block, **kw)
    ref = v4_attend_reference(q, keys, window, sinks, 0.2, kw.get("entries"), mask)
    exact = v4_attend_reference(q.double(), keys.double(), window, sinks.double(), 0.2,
                                None if mask is None else entries.double(), mask)
    assert_within_rounding(got, exact, ref, terms=d + window + t // rate, magnitude=float(exact.abs().max()))
    if form != "sliding":  # the compressed part's head-summed mass, the same for any block size
        probs: list[torch.Tensor] = []
        v4_attend(q, torch.cat((ring, keys), 1), ok, window, sinks, 0.2, q_block=q_block,
                  entry_probs=probs, **kw)
        whole: list[torch.Tensor] = []
        v4_attend(q, torch.cat((ring, keys), 1), ok, window, sinks, 0.2, q_block=t, entry_probs=whole, **kw)
        # sums of h probabilities <= 1 each: a few fp32 roundings apart at most
        eps = torch.finfo(torch.float32).eps
        torch.testing.assert_close(torch.cat(probs, 1), whole[0], rtol=0, atol=4 * h * eps)
        assert float(whole[0].max()) <= h
