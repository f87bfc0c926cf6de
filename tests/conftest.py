"""Shared fixtures and the tolerance table.

Tolerances are keyed by dtype. fp32: naive and absorbed MLA sum the same products in a different
order (W_UK applied to k vs folded into q), so they agree to ~1e-6 relative, not bit for bit.
bf16: 8 mantissa bits; a 100-term dot product carries ~1e-2 relative error, so 2e-2 abs on O(1)
activations. fp64 is exact enough for 1e-10.
"""

from __future__ import annotations

import pytest
import torch

TOL: dict[torch.dtype, dict[str, float]] = {
    torch.float64: {"atol": 1e-10, "rtol": 1e-10},
    torch.float32: {"atol": 2e-5, "rtol": 1e-4},
    torch.bfloat16: {"atol": 2e-2, "rtol": 2e-2},
}


def assert_close(actual: torch.Tensor, expected: torch.Tensor, dtype: torch.dtype | None = None) -> None:
    tol = TOL[dtype or expected.dtype]
    torch.testing.assert_close(actual.to(expected.dtype), expected, **tol)


@pytest.fixture(autouse=True)
def _seed() -> None:
    torch.manual_seed(0)


def cli_error(capsys: pytest.CaptureFixture[str], argv: list[str]) -> str:
    """Run the CLI expecting a user error: exit 2, one ``latentattn: error:`` line, no traceback."""
    from latentattn.cli import main

    assert main(argv) == 2
    err = capsys.readouterr().err
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("latentattn: error: "), err
    assert "Traceback" not in err
    return lines[0]
