"""The attention backends agree with each other and with PyTorch's SDPA."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st

from conftest import assert_close
from latentattn.kernels import attention_ref, attention_sdpa


def _qkv(b: int, hq: int, hkv: int, t: int, s: int, d: int, dv: int, dtype: torch.dtype = torch.float32):
    q = torch.randn(b, hq, t, d, dtype=dtype)
    k = torch.randn(b, hkv, s, d, dtype=dtype)
    v = torch.randn(b, hkv, s, dv, dtype=dtype)
    return q, k, v


@pytest.mark.parametrize("t", [1, 7, 97])
@pytest.mark.parametrize("causal", [False, True])
def test_reference_equals_torch_sdpa(t: int, causal: bool) -> None:
    q, k, v = _qkv(2, 4, 4, t, t, 24, 24)
    expected = F.scaled_dot_product_attention(q, k, v, is_causal=causal, scale=0.3)
    assert_close(attention_ref(q, k, v, 0.3, causal=causal), expected)


@given(
    b=st.integers(1, 3), hkv=st.integers(1, 3), group=st.integers(1, 4), t=st.integers(1, 9),
    extra=st.integers(0, 13), d=st.integers(1, 40), dv=st.integers(1, 33),
    masked=st.booleans(),
)
@settings(max_examples=60, deadline=None)
def test_sdpa_backend_matches_reference(
    b: int, hkv: int, group: int, t: int, extra: int, d: int, dv: int, masked: bool
) -> None:
    """Odd sizes, grouped heads folded into the query axis, offset-causal and explicit masks."""
    s = t + extra
    q, k, v = _qkv(b, hkv * group, hkv, t, s, d, dv)
    if masked:
        pos = torch.randint(0, s, (b, t)) if extra else torch.arange(t).expand(b, t)
        mask = (torch.arange(s)[None, None, :] <= pos[:, :, None]).unsqueeze(1)
        got, want = attention_sdpa(q, k, v, 0.5, mask=mask), attention_ref(q, k, v, 0.5, mask=mask)
    else:
        got = attention_sdpa(q, k, v, 0.5, causal=True)
        want = attention_ref(q, k, v, 0.5, causal=True)
    assert_close(got, want)


def test_offset_causal_sees_the_whole_prefix() -> None:
    """Queries are the last T positions: the first query sees S - T + 1 keys, not 1."""
    q, k, v = _qkv(1, 1, 1, 2, 5, 4, 4)
    out = attention_ref(q, k, v, 1.0, causal=True)
    full = attention_ref(q[:, :, 1:], k, v, 1.0)  # last query sees every key
    assert_close(out[:, :, 1:], full)
    prefix = attention_ref(q[:, :, :1], k[:, :, :4], v[:, :, :4], 1.0)
    assert_close(out[:, :, :1], prefix)
