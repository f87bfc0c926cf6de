"""The Triton lightning-indexer kernel against its PyTorch reference in the interpreter (fp32):
bf16 and fp8 keys, odd head counts and key dims, prefill and decode, the causal -inf pattern
exact; and its software e4m3 decoder against torch's float8_e4m3fn for every byte code."""

from __future__ import annotations

import pytest
import torch

pytest.importorskip("triton")  # conftest set TRITON_INTERPRET=1 before anything imported it
from conftest import INTERPRETER, assert_within_rounding
from latentattn.cache.fp8 import dequantize_e4m3, quantize_e4m3
from latentattn.errors import ConfigError
from latentattn.kernels.indexer_logits import indexer_logits_ref, indexer_logits_triton
from latentattn.kernels.sparse import index_scores, visible

pytestmark = INTERPRETER  # the kernels on CPU tensors: only in the interpreter


def _check(got: torch.Tensor, want: torch.Tensor, q: torch.Tensor, w: torch.Tensor, k: torch.Tensor,
           pos: torch.Tensor, scale: float, k_scale: torch.Tensor | None) -> None:
    """Within rounding of the float64 logits (index_scores on float64 inputs, fp8 keys
    dequantised, which is exact in fp32): at most a few times as far from them as the fp32 reference
    ``want`` is, not a fixed atol that one CPU's summation order fits; the causal -inf pattern
    exactly (conftest.assert_within_rounding)."""
    keys = (dequantize_e4m3(k, k_scale) if k_scale is not None else k).double()
    want64 = index_scores(q.double(), w.double(), keys, scale)
    want64 = want64.masked_fill(~visible(pos, 0, k.shape[1]), float("-inf"))
    # The size of what is summed, scale * sum_h |w_h| sum_i |q_hi k_i|: the sums round with their
    # terms, not with their (cancelling) result.
    size = float(index_scores(q.double().abs(), w.double().abs(), keys.abs(), scale).max())
    terms = q.shape[-1] + q.shape[-2]  # a head's dot product, then the weighted sum over heads
    assert_within_rounding(got, want64, want, terms=terms, magnitude=size)


@pytest.mark.parametrize(("heads", "dim", "keys", "positions"), [
    (1, 16, 9, [[8]]), (3, 40, 70, [[10, 40, 69]]), (16, 64, 33, [[32]]), (5, 24, 97, [[0, 1, 96]]),
])
@pytest.mark.parametrize("fp8", [False, True])
def test_logits_match_reference(heads: int, dim: int, keys: int, positions: list[list[int]],
                                fp8: bool) -> None:
    g = torch.Generator().manual_seed(heads)
    pos = torch.tensor(positions * 2)
    b, t = pos.shape
    q, w = torch.randn(b, t, heads, dim, generator=g), torch.randn(b, t, heads, generator=g)
    k = torch.randn(b, keys, dim, generator=g)
    args = quantize_e4m3(k) if fp8 else (k, None)
    _check(indexer_logits_triton(q, w, args[0], pos, 0.3, args[1]),
           indexer_logits_ref(q, w, args[0], pos, 0.3, args[1]), q, w, args[0], pos, 0.3, args[1])


def test_software_e4m3_decode_is_torchs() -> None:
    """Key s holds byte code s in every dim; one-hot queries with weights (1, -1) read
    relu(k) - relu(-k) = k back, so the scores are the decoded codes themselves."""
    codes = torch.tensor([c for c in range(256) if c & 0x7F != 0x7F], dtype=torch.uint8)  # no NaN
    k = codes[None, :, None].expand(1, len(codes), 16).contiguous()
    q = torch.zeros(1, 1, 2, 16)
    q[0, 0, 0, 0], q[0, 0, 1, 0] = 1.0, -1.0
    w = torch.tensor([[[1.0, -1.0]]])
    got = indexer_logits_triton(q, w, k, torch.tensor([[len(codes)]]), 1.0, torch.ones(1, len(codes), 1))
    torch.testing.assert_close(got[0, 0], codes.view(torch.float8_e4m3fn).float(), rtol=0, atol=0)


def test_bad_inputs_are_refused() -> None:
    q, w, k = torch.randn(1, 2, 3, 16), torch.randn(1, 2, 3), torch.randn(1, 5, 16)
    pos = torch.tensor([[3, 4]])
    for args, message in [
        ((q, w, k[..., :8], pos, 1.0), "indexer logits take"),
        ((q, w, k, pos[:, :1], 1.0), "positions must be"),
        ((q, w, k.to(torch.uint8), pos, 1.0), "uint8 e4m3 with k_scale"),
        ((q, w, k, pos, 1.0, torch.ones(1, 5, 1)), "fp8 indexer keys are uint8"),
    ]:
        with pytest.raises(ConfigError, match=message):
            indexer_logits_triton(*args)  # type: ignore[arg-type]
