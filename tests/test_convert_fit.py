"""Local fitting of a conversion (latentattn.convert.fit): each DeepSeek-format MLA layer, its
latent RMSNorm in the forward, trained to reproduce its source layer's attention output. It lowers
the held-out error, never leaves a layer worse than its closed form, keeps the export loadable by
transformers with latentattn's logits, and refuses bad settings in one line before writing."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import torch

import latentattn
from conftest import assert_within_rounding, cli_error
from latentattn.config import GQAConfig, ModelConfig
from latentattn.convert.calibrate import attention_inputs
from latentattn.convert.fit import FitSettings, fit_layers
from latentattn.errors import ConfigError
from latentattn.tokenizer import ByteTokenizer

TEXT = "Each token caches one latent and one rope key; every head reads them once. " * 120


def source() -> latentattn.Transformer:
    # Odd shapes: 6 query heads in 3 KV groups of width 10, three layers.
    cfg = ModelConfig(vocab_size=256, dim=40, n_layers=3, intermediate_size=72, max_seq_len=512,
                      attention=GQAConfig(n_heads=6, n_kv_heads=3, head_dim=10))
    return latentattn.load(cfg, seed=3)


def test_fitting_lowers_every_layers_held_out_error() -> None:
    gqa = source()
    fitted = latentattn.convert_model(gqa, format="deepseek", calib_tokens=1024, fit_steps=80,
                                      tokenizer=ByteTokenizer(), calib=_calib_file())
    fits = fitted.fits
    assert [f.layer for f in fits] == [0, 1, 2]
    assert all(f.after <= f.before for f in fits)
    assert sum(f.after for f in fits) < 0.9 * sum(f.before for f in fits)
    assert "local fit: held-out attention output error" in "\n".join(fitted.summary())


def test_a_layer_is_never_left_worse() -> None:
    # An absurd learning rate diverges; the layer keeps its closed-form weights.
    gqa = source()
    base = latentattn.convert_model(gqa, format="deepseek", calib_tokens=1024, tokenizer=ByteTokenizer(),
                                    calib=_calib_file())
    ids = torch.tensor(list(TEXT.encode()[:1024]))
    inputs = attention_inputs(gqa, ids, 256)
    before = {k: v.clone() for k, v in base.model.state_dict().items()}
    fits = fit_layers(gqa, base.model, inputs, 256, FitSettings(steps=30, lr=0.1))
    after = base.model.state_dict()
    for f in fits:
        assert f.after <= f.before
        if f.after == f.before:  # restored: the closed form exactly
            prefix = f"blocks.{f.layer}.self_attn."
            assert all(torch.equal(after[k], before[k]) for k in before if k.startswith(prefix))


def test_fitted_export_loads_in_transformers(tmp_path: Path) -> None:
    transformers = pytest.importorskip("transformers")
    out = tmp_path / "ds"
    r = latentattn.convert_model(source(), format="deepseek", calib_tokens=1024, fit_steps=40,
                                 tokenizer=ByteTokenizer(), calib=_calib_file(), out=out)
    assert r.out == out
    ours = latentattn.load(out)
    theirs = transformers.DeepseekV3ForCausalLM.from_pretrained(out, dtype=torch.float32).eval()
    exact = transformers.DeepseekV3ForCausalLM.from_pretrained(out, dtype=torch.float64).eval()
    x = torch.randint(0, 256, (2, 33), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        # a logit's longest chain per layer: the 72-wide MLP and attention over 33 positions
        assert_within_rounding(ours(x), exact(x).logits, theirs(x).logits, terms=3 * (72 + 33) + 40)


@pytest.mark.parametrize(("kwargs", "message"), [
    ({"fit_steps": -1}, "--fit-steps must be an integer in 0..100000"),
    ({"fit_steps": 10, "fit_lr": 0.0}, "--fit-lr must lie in (0, 0.1]"),
    ({"fit_steps": 10, "fit_lr": 1.0}, "--fit-lr must lie in (0, 0.1]"),
    ({"fit_steps": 10, "calib_tokens": 256}, "--fit-steps needs at least 512 calibration tokens"),
    ({"fit_steps": 10, "calib": None, "method": "svd", "format": "latentattn"},
     "--fit-steps fits each layer on calibration"),
])
def test_bad_fit_settings(kwargs: dict[str, object], message: str, tmp_path: Path) -> None:
    args: dict[str, object] = {"format": "deepseek", "calib": _calib_file(), "tokenizer": ByteTokenizer(),
                               "out": tmp_path / "out", **kwargs}
    with pytest.raises(ConfigError, match=re.escape(message)):
        latentattn.convert_model(source(), **args)  # type: ignore[arg-type]
    assert not (tmp_path / "out").exists()


def test_cli_fit_flags(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "out"
    err = cli_error(capsys, ["convert", "tiny-gqa", str(out), "--format", "deepseek", "--fit-steps", "5",
                             "--fit-lr", "2"])
    assert "--fit-lr must lie in (0, 0.1]" in err and not out.exists()
    from latentattn.cli import main

    assert main(["convert", "tiny-gqa", str(out), "--format", "deepseek", "--fit-steps", "5"]) == 0
    captured = capsys.readouterr()
    assert "local fit: held-out attention output error" in captured.out
    assert "layer 0: held-out error" in captured.err and "--fit-steps 200 fits" not in captured.err
    # Unfitted, the DeepSeek format points at the fit.
    assert main(["convert", "tiny-gqa", str(tmp_path / "plain"), "--format", "deepseek", "--quiet"]) == 0
    assert "--fit-steps 200 fits each layer to its source" in capsys.readouterr().err


_CALIB: Path | None = None


def _calib_file() -> str:
    global _CALIB
    if _CALIB is None:
        import tempfile

        _CALIB = Path(tempfile.mkdtemp()) / "calib.txt"
        _CALIB.write_text(TEXT)
    return str(_CALIB)
