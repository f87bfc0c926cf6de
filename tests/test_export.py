"""``latentattn export``: a train run becomes a Hugging Face DeepSeek checkpoint that transformers
loads with latentattn's own logits; what DeepSeek's format cannot hold is refused before OUT exists."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

import latentattn
from latentattn.cli import main

TINY = ["--steps", "2", "--batch-size", "2", "--seq-len", "32", "--dim", "32", "--layers", "1",
        "--heads", "2", "--eval-every", "2", "--quiet"]


@pytest.fixture(scope="module")
def mla_run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("runs") / "mla"
    assert main(["train", "--attn", "mla", *TINY, "--out", str(out)]) == 0
    return out


def test_export_run_loads_in_transformers(mla_run: Path, tmp_path: Path,
                                          capsys: pytest.CaptureFixture[str]) -> None:
    transformers = pytest.importorskip("transformers")
    out = tmp_path / "hf"
    assert main(["export", "--model", str(mla_run), str(out)]) == 0
    assert "wrote" in capsys.readouterr().out
    ours = latentattn.load(mla_run)
    theirs = transformers.DeepseekV3ForCausalLM.from_pretrained(out, dtype=torch.float32).eval()
    ids = torch.randint(0, ours.config.vocab_size, (1, 24), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        a, b = ours(ids), theirs(ids).logits
    # fp32 both sides, same weights: only summation order differs (a few ulps of the logits' size)
    assert torch.allclose(a, b, rtol=0, atol=1e-4 * float(a.abs().max())), (a - b).abs().max()


def test_export_dtype(mla_run: Path, tmp_path: Path) -> None:
    assert main(["export", "--model", str(mla_run), str(tmp_path / "bf16"), "--dtype", "bf16"]) == 0
    assert latentattn.load(tmp_path / "bf16").dtype == torch.bfloat16


@pytest.mark.parametrize("case", ["gqa", "preset", "exists", "dtype"])
def test_export_refusals(case: str, tmp_path: Path, mla_run: Path,
                         capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "out"
    model, extra = str(mla_run), []
    if case == "gqa":
        model = str(tmp_path / "gqa")
        assert main(["train", "--attn", "gqa", *TINY, "--out", model]) == 0
    elif case == "preset":
        model = "tiny-mla"
    elif case == "exists":
        out.mkdir()
        (out / "keep.txt").write_text("mine")
    else:
        extra = ["--dtype", "int8"]
    capsys.readouterr()
    assert main(["export", "--model", model, str(out), *extra]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("latentattn: error:") and "\n" not in err
    if case == "exists":
        assert sorted(p.name for p in out.iterdir()) == ["keep.txt"]
    else:
        assert not out.exists()
