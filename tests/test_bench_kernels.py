"""``bench kernels`` on a CPU: the PyTorch path runs, the report says the kernels need a GPU,
bytes are counted with the latent once (FlashMLA's rule), and --device cuda without CUDA is a
clear error."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from conftest import cli_error
from latentattn.bench.kernel_report import KINDS
from latentattn.cli import main


@pytest.mark.skipif(torch.cuda.is_available(), reason="the CPU report; a GPU runs the kernels too")
def test_bench_kernels_on_cpu(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "k.json"
    assert main(["bench", "kernels", "--contexts", "100,300", "--batches", "2", "--heads", "3",
                 "--topk", "64", "--repeats", "2", "--json", str(out), "--plot",
                 str(tmp_path / "k.png"), "--quiet"]) == 0
    r = json.loads(out.read_text())
    assert not r["kernels_ran"] and "the Triton kernels need a GPU" in r["note"]
    assert {(p["kind"], p["impl"]) for p in r["points"]} == {(k, "torch") for k in KINDS}
    step = next(p for p in r["points"] if p["kind"] == "dsa decode step" and p["context"] == 300)
    assert step["bytes_moved"] == 2 * 300 * 132 + (2 * 64 * 576 + 2 * 3 * (576 + 512)) * 4  # fp8 keys
    dense = next(p for p in r["points"] if p["kind"] == "dense decode" and p["context"] == 300)
    assert dense["bytes_moved"] == (2 * 300 * 576 + 2 * 3 * (576 + 512)) * 4  # latent once, fp32
    fp8 = next(p for p in r["points"] if p["kind"] == "dense decode fp8" and p["context"] == 300)
    assert fp8["bytes_moved"] == 2 * 300 * 656 + 2 * 3 * (576 + 512) * 4  # FlashMLA's records
    sparse8 = next(p for p in r["points"] if p["kind"] == "sparse decode fp8" and p["context"] == 100)
    assert sparse8["bytes_moved"] == 2 * 64 * 656 + 2 * 3 * (576 + 512) * 4  # k records
    sparse = next(p for p in r["points"] if p["kind"] == "sparse decode" and p["context"] == 100)
    assert sparse["topk"] == 64 and sparse["flops"] == 2 * 2 * 3 * 64 * (576 + 512)
    assert r["copy_gb_s"] > 0 and all(p["median_ms"] > 0 for p in r["points"])
    assert (tmp_path / "k.png").read_bytes()[:4] == b"\x89PNG"
    text = capsys.readouterr().out
    assert "only the PyTorch path ran" in text
    ratio = next(line for line in text.splitlines()
                 if "| 2 | 300 | sparse decode vs dense decode (torch) |" in line)
    dense_ms, sparse_ms = (next(p["median_ms"] for p in r["points"]
                                if p["kind"] == kind and p["context"] == 300)
                           for kind in ("dense decode", "sparse decode"))
    assert ratio.endswith(f"| {dense_ms / sparse_ms:.2f} |")
    assert "CUDA is not available" in cli_error(
        capsys, ["bench", "kernels", "--device", "cuda", "--json", str(tmp_path / "x.json"),
                 "--plot", str(tmp_path / "x.png")])
    assert not (tmp_path / "x.json").exists()


def test_every_kernel_path_of_the_bench_runs_in_the_interpreter() -> None:
    """The GPU branch (contiguous, paged and fp8 dense decode, sparse decode, the speed-up
    table), run here in Triton's interpreter at tiny dims: it runs, counts and labels; its times
    mean nothing and the note says so."""
    pytest.importorskip("triton")
    from latentattn.bench.kernel_report import kernel_table, speedups
    from latentattn.bench.kernels import run_kernel_bench

    report = run_kernel_bench(torch.device("cpu"), torch.float32, [128], [2], 40, repeats=1,
                              dims={"heads": 3, "rank": 32, "rope": 16}, interpreted=True)
    assert report.kernels_ran and "interpreter" in report.note
    got = {(p.kind, p.impl) for p in report.points}
    assert got == {(k, i) for k in KINDS for i in ("torch", "triton")} | {("dense decode", "triton paged")}
    assert {what for _, _, what, _ in speedups(report)} == {
        *(f"{k}: triton vs torch" for k in KINDS),
        *(f"{k} vs dense decode ({i})" for k in ("sparse decode", "dsa decode step")
          for i in ("torch", "triton")),
        *(f"sparse decode fp8 vs dense decode fp8 ({i})" for i in ("torch", "triton"))}
    assert "| dense decode | triton paged | 2 | 128 |" in kernel_table(report)
    for p in report.points:  # every kernel agrees with the PyTorch path on the same input (fp32)
        assert (p.max_abs_diff_vs_torch is None) == (p.impl == "torch")
        assert p.impl == "torch" or p.max_abs_diff_vs_torch < 1e-4
