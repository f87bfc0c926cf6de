"""Shared fixtures and the tolerance table.

Tolerances are keyed by dtype. fp32: naive and absorbed MLA sum the same products in a different
order (W_UK applied to k vs folded into q), so they agree to ~1e-6 relative, not bit for bit.
bf16: 8 mantissa bits; a 100-term dot product carries ~1e-2 relative error, so 2e-2 abs on O(1)
activations. fp64 is exact enough for 1e-10.
"""

from __future__ import annotations

import os
import stat
from pathlib import Path
from typing import Any

import pytest
import torch

# The interpreter tests (tests/test_triton_*.py) run the Triton kernels in Triton's interpreter on
# CPU tensors, on every machine, GPU or not: Triton reads this when it is imported, so it is set
# before any test module can import it. The GPU tests (tests/test_triton_gpu.py) run the kernels
# compiled and only with TRITON_INTERPRET=0 on a CUDA machine: `make gpu-check` does that.
os.environ.setdefault("TRITON_INTERPRET", "1")

INTERPRETER = pytest.mark.skipif(
    os.environ.get("TRITON_INTERPRET") != "1",
    reason="runs the Triton kernels on CPU tensors in Triton's interpreter (TRITON_INTERPRET=1, "
    "which make test sets); the compiled kernels are tested by make gpu-check")

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


NEAR_TIE = 1e-4  # fp32 logits of two computations of one model differ by ~1e-6


def assert_same_greedy(got: torch.Tensor, want: torch.Tensor, model: torch.nn.Module, prompt_len: int,
                       tol: float = NEAR_TIE) -> None:
    """Two greedy generations (B, T) from the same prompts, computed two ways (with and without
    the cache, batched and alone, ...): equal, unless a row reaches a near-tie, a step whose top
    two logits (``model`` without a cache on the common prefix) are within ``tol``; rounding may
    then pick either, and the rows may part there. A difference anywhere else fails."""
    assert got.shape == want.shape and torch.equal(got[:, :prompt_len], want[:, :prompt_len])
    for row in range(got.shape[0]):
        differ = (got[row] != want[row]).nonzero()
        if len(differ) == 0:
            continue
        j = int(differ[0])
        with torch.no_grad():
            logits = model(want[row : row + 1, :j])[0, -1].float()
        top2 = logits.topk(2).values
        margin = float(top2[0] - top2[1])
        assert margin < tol, (f"row {row} differs at token {j} ({int(got[row, j])} vs "
                              f"{int(want[row, j])}) where the top-2 logit margin is {margin:.2e}")


def min_greedy_margin(model: torch.nn.Module, ids: torch.Tensor, n: int) -> float:
    """The smallest top-1 minus top-2 logit gap over ``n`` greedy steps from ``ids`` (B, T),
    without a cache. Above NEAR_TIE, two computations of the model that differ only by rounding
    (naive vs absorbed MLA, cached vs not) must generate the same tokens: a test comparing
    their text asserts this first, so that a near-tie fails as such instead of as a mismatch."""
    seq = ids
    with torch.no_grad():
        for _ in range(n):
            seq = torch.cat([seq, model(seq)[:, -1:].argmax(-1)], dim=1)
        logits = model(seq[:, :-1])[:, ids.shape[1] - 1 :].float()
    top2 = logits.topk(2, dim=-1).values
    return float((top2[..., 0] - top2[..., 1]).min())


def cli_error(capsys: pytest.CaptureFixture[str], argv: list[str]) -> str:
    """Run the CLI expecting a user error: exit 2, one ``latentattn: error:`` line, no traceback."""
    from latentattn.cli import main

    assert main(argv) == 2
    err = capsys.readouterr().err
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("latentattn: error: "), err
    assert "Traceback" not in err
    return lines[0]


class FsyncRecorder:
    """Spies on os.fsync and os.replace: events ("fsync-file" | "fsync-dir", inode) and
    ("replace", destination). A rename keeps the inode, so the fsynced temp file's inode is the
    target's afterwards."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch) -> None:
        self.events: list[tuple[str, Any]] = []
        real_fsync, real_replace = os.fsync, os.replace

        def fsync(fd: int) -> None:
            st = os.fstat(fd)
            kind = "fsync-dir" if stat.S_ISDIR(st.st_mode) else "fsync-file"
            self.events.append((kind, st.st_ino))
            real_fsync(fd)

        def replace(src: Any, dst: Any) -> None:
            real_replace(src, dst)
            self.events.append(("replace", Path(dst).name))

        monkeypatch.setattr(os, "fsync", fsync)
        monkeypatch.setattr(os, "replace", replace)

    def index(self, event: tuple[str, Any]) -> int:
        assert event in self.events, (event, self.events)
        return self.events.index(event)


def assert_durable(rec: FsyncRecorder, target: Path) -> None:
    """target's data was fsynced before its rename, its directory after."""
    renamed = rec.index(("replace", target.name))
    assert rec.index(("fsync-file", target.stat().st_ino)) < renamed
    dir_syncs = [i for i, e in enumerate(rec.events) if e == ("fsync-dir", target.parent.stat().st_ino)]
    assert any(i > renamed for i in dir_syncs), rec.events


# ---------------------------------------------------------------------------- rounding bounds
ROUNDING_FACTOR = 4.0  # c below; flash-attention's tests take 2 (3 with a softcap)


def max_error(got: torch.Tensor, want64: torch.Tensor) -> float:
    """max |got - want64| over want64's finite entries, after checking that ``got`` is non-finite
    exactly where ``want64`` is, with the same values there (an LSE of -inf, say); 0 if none."""
    finite = torch.isfinite(want64)
    assert got.shape == want64.shape, (got.shape, want64.shape)
    assert torch.equal(torch.isfinite(got), finite), "non-finite entries differ"
    assert torch.equal(got[~finite].double(), want64[~finite]), "non-finite entries differ"
    return float((got[finite].double() - want64[finite]).abs().max()) if finite.any() else 0.0


def assert_within_rounding(got: torch.Tensor, want64: torch.Tensor, baseline: torch.Tensor, *,
                           terms: int, magnitude: float | None = None, c: float = ROUNDING_FACTOR,
                           what: str = "") -> None:
    """``got`` (a kernel's output) is no further from the exact result than rounding explains.

    ``want64`` is the reference computed in float64 (rounding ~1e-16 relative: the exact result,
    for an fp32 or bf16 test); ``baseline`` the PyTorch path on the same inputs at ``got``'s
    precision. Both ``got`` and ``baseline`` round every product and partial sum, each in its
    own order (BLAS blocking, SIMD width and thread count, the kernel's tiles, its online softmax
    and split merges), so they differ by a few units in the last place, and by how many depends
    on the CPU: a fixed atol fitted on one machine fails on another. What carries over is the
    size of the rounding, so this is flash-attention's rule (hopper/test_flash_attn.py: c = 2,
    its floor the rounding of one addition to the output)::

        max|got - want64| <= c * max|baseline - want64| + floor,
        floor = sqrt(terms) * eps(dtype) * magnitude

    c (ROUNDING_FACTOR, 4) lets the kernel's order round a few times worse than PyTorch's (an
    online softmax rescales each partial sum once per tile; base-2 exponentials add a product
    by log2 e), and a maximum over the hundreds of elements these tests compare is a noisier
    statistic than over flash-attention's millions. ``baseline`` must be right itself (it is
    the reference the suite trusts): a wrong one loosens the bound instead of failing.

    The floor is the typical rounding of a sum of ``terms`` terms (the longest chain of
    additions behind one output: a dot product's width plus a softmax's length, say) as a
    random walk of sqrt(terms) units in the last place of ``magnitude``, the size of what is
    summed: max|want64| by default; pass the terms' size where they cancel (a score
    scale * sum_i |q_i k_i|, the largest value an attention output averages). It matters where
    the baseline is almost exact by luck (one key; a sum that rounds exactly; an output of one
    or two elements, whose errors are single samples, not a maximum over many), and spares the
    kernel the same luck. Both terms stay orders of magnitude below what a bug does (a wrong
    scale, mask or index, a dropped tile): an error of 1e-3 relative fails. Non-finite entries
    must match exactly (:func:`max_error`)."""
    assert want64.dtype == torch.float64 and got.dtype == baseline.dtype, (want64.dtype, got.dtype,
                                                                           baseline.dtype)
    err, base = max_error(got, want64), max_error(baseline, want64)
    if magnitude is None:
        finite = want64[torch.isfinite(want64)]
        magnitude = float(finite.abs().max()) if finite.numel() else 0.0
    floor = terms**0.5 * torch.finfo(got.dtype).eps * magnitude
    assert err <= c * base + floor, (
        f"{what or 'output'}: max |got - float64 reference| = {err:.3g} exceeds {c:g} x the "
        f"{got.dtype} PyTorch path's {base:.3g} + a floor of {floor:.3g} (sqrt({terms}) ulps of "
        f"{magnitude:.3g})")
