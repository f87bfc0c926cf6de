"""Issue 21's closed-form options: the whitened factorisation (SVD of the projections whitened by
the damped calibration covariance), sequential calibration (layer l converted on the converted
layers 0..l-1's outputs) and the calibration seed. Whitened is exact at full rank, spans PCA's
subspace without damping, moves toward the weights' SVD as the damping grows and says so when the
covariance is singular; sequential feeds each layer what the converted model feeds it."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

import latentattn
from conftest import cli_error
from latentattn.cli import main
from latentattn.config import GQAConfig, ModelConfig
from latentattn.convert.calibrate import CALIB_WINDOW, attention_inputs, calib_span, calibrate
from latentattn.convert.gqa_to_mla import Plan, _basis, covariance, damped_covariance
from latentattn.convert.sequential import convert_sequential
from latentattn.errors import ConfigError, LatentAttnError
from latentattn.interop.native import NATIVE_CONFIG
from latentattn.tokenizer import ByteTokenizer

TEXT = ("Each token caches one latent and one rope key; every head reads them once. "
        "The indexer scores the cache and the selector keeps the best k of them. ") * 60


def source(seed: int = 3) -> latentattn.Transformer:
    # Odd shapes: 6 query heads in 3 KV groups of width 10, three layers, 40 dims.
    cfg = ModelConfig(vocab_size=256, dim=40, n_layers=3, intermediate_size=72, max_seq_len=512,
                      attention=GQAConfig(n_heads=6, n_kv_heads=3, head_dim=10))
    return latentattn.load(cfg, seed=seed)


@pytest.fixture(scope="module")
def calib(tmp_path_factory: pytest.TempPathFactory) -> str:
    path = tmp_path_factory.mktemp("calib") / "calib.txt"
    path.write_text(TEXT)
    return str(path)


def _projector(u: torch.Tensor) -> torch.Tensor:
    return u @ u.T


def test_whitened_at_full_rank_is_exact(calib: str) -> None:
    torch.set_num_threads(1)
    gqa = source()
    r = latentattn.convert_model(gqa, kv_lora_rank="full", rope_dim="full", method="whitened",
                                 calib=calib, calib_tokens=1024, tokenizer=ByteTokenizer())
    assert r.exact and r.method == "whitened"  # damped where this short text's covariance is singular
    x = torch.randint(0, 256, (2, 40), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        got, want = r.model(x), gqa(x)
    # The basis is complete, so the only error is fp32 rounding of the folded weights (products of
    # float64 factors rounded once) carried through 3 layers: relative ~1e-6 of the logits' scale.
    assert (got - want).abs().max().item() < 1e-4 * want.abs().max().item()


def test_undamped_whitening_spans_pcas_subspace_and_damping_moves_it_to_svds() -> None:
    gen = torch.Generator().manual_seed(0)
    f64 = torch.float64
    m = torch.randn(30, 40, generator=gen, dtype=f64)
    b = torch.zeros(30, dtype=f64)
    # Correlated inputs, so that PCA of the outputs and the SVD of the weights disagree.
    x = torch.randn(2000, 40, generator=gen, dtype=f64) @ torch.randn(40, 40, generator=gen, dtype=f64)
    rank = 8
    pca = _basis(m, b, Plan((), rank, "pca"), x)
    svd = _basis(m, b, Plan((), rank, "svd"), x)
    tiny = 1e-12
    white = _basis(m, b, Plan((), rank, "whitened", damp=tiny), x)
    # Davis-Kahan: damping adds E = lambda M M^T to PCA's Gram M C M^T (C = X^T X / N), so the
    # subspace moves by at most ||E|| / gap, gap the distance between eigenvalues rank and rank + 1.
    c = covariance(x)[:40, :40]
    gram = m @ c @ m.T
    eig = torch.linalg.eigvalsh(gram).flip(0)
    lam = tiny * damped_covariance(x, 0.0).diagonal().mean()
    bound = (lam * torch.linalg.matrix_norm(m @ m.T, 2) / (eig[rank - 1] - eig[rank])).item()
    assert (_projector(white) - _projector(pca)).norm().item() <= 2 * (bound + 1e-10)
    assert (_projector(pca) - _projector(svd)).norm().item() > 0.1  # the test can tell them apart
    heavy = _basis(m, b, Plan((), rank, "whitened", damp=1e6), x)
    far = (_projector(heavy) - _projector(svd)).norm().item()
    assert far < 0.1 * (_projector(pca) - _projector(svd)).norm().item()


def test_a_singular_covariance_is_damped_and_said(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    # One repeated byte: layer 0's inputs are one vector at every position (rank 1 of 41).
    torch.set_num_threads(1)
    flat = tmp_path / "flat.txt"
    flat.write_text("a" * 2000)
    r = latentattn.convert_model(source(), method="whitened", calib=str(flat), calib_tokens=1024,
                                 tokenizer=ByteTokenizer())
    assert len(r.notes) == 1
    assert "whitened: the calibration covariance is singular in" in r.notes[0]
    assert "damped by 0.01 x its mean diagonal" in r.notes[0]
    x = torch.randint(0, 256, (1, 20), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        assert torch.isfinite(r.model(x)).all()
    out = tmp_path / "out"
    assert main(["convert", "tiny-gqa", str(out), "--method", "whitened", "--calib", str(flat),
                 "--calib-tokens", "256", "--quiet"]) == 0
    err = capsys.readouterr().err
    assert "latentattn: whitened: the calibration covariance is singular" in err and out.is_dir()


def test_sequential_feeds_each_layer_the_converted_models_inputs() -> None:
    torch.set_num_threads(1)
    gqa = source()
    ids = torch.tensor(list(TEXT.encode()[:1024]))
    window = CALIB_WINDOW
    pairs, one_pass = calibrate(gqa, 10, ids, rorope=True)
    assert one_pass is not None
    plan = Plan(pairs, 12, "pca", "rorope", latent_norm=True)
    seen: dict[int, torch.Tensor] = {}
    mla, fits = convert_sequential(gqa, plan, ids, window, seen=lambda i, x: seen.__setitem__(i, x))
    assert sorted(seen) == [0, 1, 2] and fits == []
    # What the finished model feeds each attention layer on the same windows.
    fed = attention_inputs(mla, ids, window, batch_size=len(ids) // window)
    for i in range(3):
        torch.testing.assert_close(seen[i], fed[i])  # the same ops in the same order: fp32 ulps
    torch.testing.assert_close(seen[0], one_pass[0])  # the embedding is not converted
    # Layers 1 and 2 see the converted layers' outputs, not the source's.
    for i in (1, 2):
        assert (seen[i] - one_pass[i]).abs().max() > 1e-3


def test_sequential_fit_through_convert_model(calib: str) -> None:
    torch.set_num_threads(1)
    r = latentattn.convert_model(source(), format="deepseek", calib=calib, calib_tokens=1024,
                                 tokenizer=ByteTokenizer(), sequential=True, fit_steps=20)
    assert [f.layer for f in r.fits] == [0, 1, 2] and all(f.after <= f.before for f in r.fits)
    assert "sequential calibration" in r.summary()[0] and r.info["sequential"] is True


def test_calibration_seed_picks_another_span(calib: str) -> None:
    ids = torch.arange(5000)
    assert torch.equal(calib_span(ids, 1000, 0), ids[:1000])
    one, again, two = (calib_span(ids, 1000, s) for s in (1, 1, 2))
    assert torch.equal(one, again) and not torch.equal(one, two)
    assert torch.equal(one, torch.arange(int(one[0]), int(one[0]) + 1000))  # consecutive tokens
    with pytest.raises(LatentAttnError, match="fewer than 6,000"):
        calib_span(ids, 6000, 1)
    torch.set_num_threads(1)
    first, other = (latentattn.convert_model(source(), calib=calib, calib_tokens=512, calib_seed=s,
                                             tokenizer=ByteTokenizer()) for s in (0, 1))
    w0, w1 = (r.model.blocks[0].self_attn.kv_a_proj_with_mqa.weight for r in (first, other))
    assert not torch.equal(w0, w1)
    assert other.info["calib_seed"] == 1
    with pytest.raises(ConfigError, match="--calib-seed must be an integer >= 0"):
        latentattn.convert_model(source(), calib=calib, calib_seed=-1, tokenizer=ByteTokenizer())


def test_cli_flags(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    torch.set_num_threads(1)
    out = tmp_path / "out"
    assert "--calib-seed must be an integer >= 0" in cli_error(
        capsys, ["convert", "tiny-gqa", str(out), "--calib-seed", "-2"])
    assert not out.exists()
    assert "--sequential calibrates on the converted layers' outputs" in cli_error(
        capsys, ["convert", "tiny-gqa", str(out), "--calib", "none", "--method", "svd", "--sequential"])
    assert "--method whitened factors the latent on calibration activations" in cli_error(
        capsys, ["convert", "tiny-gqa", str(out), "--calib", "none", "--method", "whitened"])
    assert main(["convert", "tiny-gqa", str(out), "--method", "whitened", "--sequential", "--calib-seed",
                 "3", "--quiet"]) == 0
    assert "whitened, sequential calibration" in capsys.readouterr().out
    info = json.loads((out / NATIVE_CONFIG).read_text())["info"]
    assert (info["method"], info["sequential"], info["calib_seed"]) == ("whitened", True, 3)


def test_bench_convert_sequential_whitened(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    torch.set_num_threads(1)
    from latentattn.data import default_text
    from latentattn.interop.native import save_native

    src = tmp_path / "src"
    save_native(source(), src, ByteTokenizer())
    data = tmp_path / "text.txt"
    data.write_text(default_text()[:20_000])
    report_path = tmp_path / "conv.json"
    assert main(["bench", "convert", "--model", str(src), "--data", str(data), "--ranks", "8",
                 "--format", "deepseek", "--method", "whitened", "--sequential", "--calib-seed", "1",
                 "--calib-tokens", "1024", "--seq-len", "64", "--max-tokens", "257", "--fit-steps", "5",
                 "--heal-steps", "0", "--json", str(report_path), "--quiet"]) == 0
    report = json.loads(report_path.read_text())
    assert (report["method"], report["sequential"], report["seed"]) == ("whitened", True, 1)
    _, row = report["rows"]
    assert row["perplexity"] > 1 and row["fitted_perplexity"] > 1 and row["fit_seconds"] > 0
    assert "fitted perplexity" in capsys.readouterr().out
