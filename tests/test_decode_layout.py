"""decode_layout: the same model, its fp32 Linear weights stored input-major."""

from __future__ import annotations

import torch
from torch import nn

import latentattn
from latentattn.model.layout import decode_layout, input_major

EPS32 = torch.finfo(torch.float32).eps


def test_same_logits_with_input_major_weights() -> None:
    """Only the summation order of each dot product changes: every logit stays within the fp32
    bound of a d-term dot product, d * eps * sum |h_i w_i| (Higham, Accuracy and Stability of
    Numerical Algorithms, 3.1), taken at the LM head, where the products are largest."""
    model = latentattn.load("tiny-gqa", seed=0, tie_word_embeddings=True)
    ids = torch.randint(0, model.config.vocab_size, (2, 9), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        want = model.generate(ids, 6)
        cache = model.make_cache(2, 12)
        ref = model(ids, cache)
        decode_layout(model)
        assert model.lm_head.weight is not model.embed_tokens.weight  # untied: embedding rows stay rows
        for m in model.modules():
            if isinstance(m, nn.Linear):
                assert input_major(m.weight) and not m.weight.is_contiguous()
        cache = model.make_cache(2, 12)
        got = model(ids, cache)
        # Bound the whole network's drift by the head's own: the hidden state feeding it is the
        # same function of the same weights, only its sums are reordered the same way.
        h = model.norm(model.embed_tokens(ids)).abs()
        bound = model.config.dim * EPS32 * (h @ model.lm_head.weight.abs().t())
        assert torch.isfinite(bound).all()
        torch.testing.assert_close(got, ref, rtol=0.0, atol=float(bound.max()) * model.config.n_layers)
        assert torch.equal(model.generate(ids, 6), want)


def test_leaves_bf16_alone() -> None:
    model = latentattn.load("tiny-mla", seed=0, dtype="bfloat16")
    before = {n: p.stride() for n, p in model.named_parameters()}
    decode_layout(model)
    assert {n: p.stride() for n, p in model.named_parameters()} == before
