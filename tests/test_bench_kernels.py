"""``bench kernels`` on a CPU: the PyTorch path runs, the report says the kernels need a GPU,
bytes are counted with the latent once (FlashMLA's rule), and --device cuda without CUDA is a
clear error."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from conftest import cli_error
from latentattn.cli import main


@pytest.mark.skipif(torch.cuda.is_available(), reason="the CPU report; a GPU runs the kernels too")
def test_bench_kernels_on_cpu(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "k.json"
    assert main(["bench", "kernels", "--contexts", "100,300", "--batches", "2", "--heads", "3",
                 "--topk", "64", "--repeats", "2", "--json", str(out), "--plot",
                 str(tmp_path / "k.png"), "--quiet"]) == 0
    r = json.loads(out.read_text())
    assert not r["kernels_ran"] and "the Triton kernels need a GPU" in r["note"]
    assert {(p["kind"], p["impl"]) for p in r["points"]} == {("dense decode", "torch"),
                                                              ("sparse decode", "torch")}
    dense = next(p for p in r["points"] if p["kind"] == "dense decode" and p["context"] == 300)
    assert dense["bytes_moved"] == (2 * 300 * 576 + 2 * 3 * (576 + 512)) * 4  # latent once, fp32
    sparse = next(p for p in r["points"] if p["kind"] == "sparse decode" and p["context"] == 100)
    assert sparse["topk"] == 64 and sparse["flops"] == 2 * 2 * 3 * 64 * (576 + 512)
    assert r["copy_gb_s"] > 0 and all(p["median_ms"] > 0 for p in r["points"])
    assert (tmp_path / "k.png").read_bytes()[:4] == b"\x89PNG"
    assert "only the PyTorch path ran" in capsys.readouterr().out
    assert "CUDA is not available" in cli_error(
        capsys, ["bench", "kernels", "--device", "cuda", "--json", str(tmp_path / "x.json"),
                 "--plot", str(tmp_path / "x.png")])
    assert not (tmp_path / "x.json").exists()
