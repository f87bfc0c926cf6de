"""``latentattn.convert_model`` (issue 20 items 4 and 5): a conversion in one call, its defaults
(PCA on the builtin text, a head-wide RoRoPE key and the rank that halves the cache), its byte
report equal to ``kv-cache --kv-lora-rank``'s row and to the converted cache's real bytes, its
output written whole or not at all, and bad arguments refused with the CLI's one-line messages."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
import torch

import latentattn
from conftest import cli_error
from latentattn import LatentAttnError, Transformer, get_preset, load
from latentattn.calc.converted import rank_for_ratio, resolve_sizes
from latentattn.calc.kv_bytes import kv_table
from latentattn.cli import main
from latentattn.config import GQAConfig, ModelConfig


def _config(heads: int = 4, kv_heads: int = 2, head_dim: int = 8, bias: bool = False) -> ModelConfig:
    return ModelConfig(vocab_size=256, dim=32, n_layers=2, intermediate_size=48, max_seq_len=256,
                       attention=GQAConfig(heads, kv_heads, head_dim, qkv_bias=bias, o_bias=bias),
                       name="src")


@pytest.fixture(scope="module")
def src(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny GQA model (2 KV heads of 8, byte vocabulary) saved as a latentattn directory."""
    from latentattn.interop.native import save_native

    torch.manual_seed(0)
    model = Transformer(_config()).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.15)
    path = tmp_path_factory.mktemp("convert_api") / "src"
    save_native(model, path)
    return path


def test_full_rank_is_exact_and_saves_nothing(src: Path) -> None:
    torch.set_num_threads(1)
    r = latentattn.convert_model(src, kv_lora_rank="full", rope_dim="full")
    assert r.exact and (r.kv_lora_rank, r.rope_dim, r.sizes.rope_mode) == (16, 16, "blocks")
    assert r.bytes_before == r.bytes_after == 2 * 2 * 8 * 2 * 2  # 2 G d values, bf16, 2 layers
    assert r.out is None and r.method == "pca" and r.tokenizer is not None
    x = torch.randint(0, 256, (2, 40), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        assert (r.model(x) - load(src)(x)).abs().max().item() < 1e-4


def test_defaults_halve_the_cache_as_kv_cache_predicts(src: Path, tmp_path: Path,
                                                       capsys: pytest.CaptureFixture[str]) -> None:
    torch.set_num_threads(1)
    out = tmp_path / "mla"
    r = latentattn.convert_model(src, out=out)
    # RoRoPE's head-wide key (d = 8) and R = G d - d = 8: (8 + 8) = half of 2 G d = 32 values.
    assert (r.kv_lora_rank, r.rope_dim, r.sizes.rope_mode, r.method) == (8, 8, "rorope", "pca")
    assert r.sizes.rank_defaulted and r.sizes.rope_defaulted and not r.exact
    assert r.ratio == 0.5 and r.bytes_after * 2 == r.bytes_before
    assert r.sizes.line().startswith("kv-lora-rank 8, rope-dim 8: 0.50x the source's cache")
    assert r.out == out and json.loads((out / "latentattn.json").read_text())["info"]["method"] == "pca"
    # One formula: convert's report, kv-cache's row and the bytes the converted cache really holds.
    cfg = load(src).config
    table = kv_table(cfg, converted=resolve_sizes(cfg, r.kv_lora_rank, r.rope_dim))
    row = table.row("mla-converted")
    assert row.bytes_per_token == r.bytes_after
    cache = r.model.make_cache(batch=2, capacity=5, dtype=torch.bfloat16)
    assert cache.nbytes == row.bytes_per_token_per_layer * 2 * 5 * cfg.n_layers
    assert table.row("mla-converted-deepseek").bytes_per_token_per_layer == (8 + 8) * 2
    # The CLI prints the same line and the same bytes, and says it is an approximation.
    assert main(["convert", str(src), str(tmp_path / "cli")]) == 0
    captured = capsys.readouterr()
    assert "kv-lora-rank 8, rope-dim 8: 0.50x the source's cache" in captured.out
    report = f"KV cache (bf16, 2 layers): {r.bytes_before} -> {r.bytes_after} bytes/token (0.50x)"
    assert report in captured.out
    assert "heal it with" in captured.err
    assert main(["kv-cache", "--model", str(src), "--kv-lora-rank", "8", "--rope-dim", "8"]) == 0
    printed = capsys.readouterr().out
    assert "MLA as converted, R=8 rope 8 (RoRoPE)" in printed and "0.50x the source's cache" in printed


def test_deepseek_format_through_the_api(src: Path, tmp_path: Path) -> None:
    torch.set_num_threads(1)
    r = latentattn.convert_model(src, kv_lora_rank=12, format="deepseek", out=tmp_path / "ds",
                                 calib_tokens=512)
    assert (r.kv_lora_rank, r.rope_dim, r.sizes.rope_mode) == (12, 8, "rorope")
    config = json.loads((tmp_path / "ds" / "config.json").read_text())
    assert (config["model_type"], config["kv_lora_rank"], config["qk_rope_head_dim"]) == (
        "deepseek_v3", 12, 8)
    assert r.bytes_after == (12 + 8) * 2 * 2


def test_a_transformer_converts_in_memory() -> None:
    from latentattn.tokenizer import ByteTokenizer

    torch.manual_seed(0)
    model = Transformer(_config(heads=4, kv_heads=4)).eval()  # MHA
    r = latentattn.convert_model(model, kv_lora_rank=24, calib_tokens=256, tokenizer=ByteTokenizer())
    assert (r.rope_dim, r.sizes.rope_mode) == (8, "rorope") and r.ratio == (24 + 8) / 64
    with pytest.raises(LatentAttnError, match="needs its tokenizer"):
        latentattn.convert_model(model)
    assert latentattn.convert_model(model, calib=None, method="svd").kv_lora_rank == 24  # 4 x 8 - 8


BAD: list[tuple[dict[str, Any], list[str], str]] = [
    ({"kv_lora_rank": 33}, ["--kv-lora-rank", "33"],
     "--kv-lora-rank must lie in 1..32 (full rank at --rope-dim 8)"),
    ({"kv_lora_rank": 0}, ["--kv-lora-rank", "0"], "--kv-lora-rank must lie in 1..32"),
    ({"kv_lora_rank": "x"}, ["--kv-lora-rank", "x"], "--kv-lora-rank must be an integer or 'full'"),
    ({"rope_dim": 5}, ["--rope-dim", "5"], "--rope-dim must be even"),
    ({"rope_dim": 18}, ["--rope-dim", "18"], "between 4 and 2 x 8 = 16 (full), or 8 (one head wide"),
    ({"rope_dim": 4, "rope_mode": "rorope"}, ["--rope-dim", "4", "--rope-mode", "rorope"],
     "--rope-dim must be 8 (the head dim) or full"),
    ({"format": "deepseek", "rope_mode": "blocks"}, ["--format", "deepseek", "--rope-mode", "blocks"],
     "--format deepseek needs --rope-mode rorope"),
    ({"format": "deepseek", "calib": None}, ["--format", "deepseek", "--calib", "none"],
     "give --calib FILE (or builtin)"),
    ({"calib": None}, ["--calib", "none"], "--method pca factors the latent on calibration activations"),
    ({"calib_tokens": 100}, ["--calib-tokens", "100"], "--calib-tokens must be >= 256"),
    ({"calib_tokens": 10**7}, ["--calib-tokens", str(10**7)], "fewer than --calib-tokens 10,000,000"),
]


@pytest.mark.parametrize("kwargs,argv,message", BAD)
def test_bad_arguments_raise_the_clis_message(src: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str],
                                              kwargs: dict[str, Any], argv: list[str], message: str) -> None:
    out = tmp_path / "bad"
    with pytest.raises(LatentAttnError) as e:
        latentattn.convert_model(src, out=out, **kwargs)
    assert message in str(e.value)
    assert message in cli_error(capsys, ["convert", str(src), str(out), *argv])
    assert not out.exists() and not list(tmp_path.iterdir())


def test_mla_and_v4_sources_are_refused(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(LatentAttnError, match="tiny-mla is MLA already"):
        latentattn.convert_model("tiny-mla")
    assert "tiny-v4 is V4 already" in cli_error(capsys, ["convert", "tiny-v4", str(tmp_path / "x")])
    biased = _config(bias=True)
    with pytest.raises(LatentAttnError, match="attention biases, which DeepSeek's format cannot hold"):
        resolve_sizes(biased, format="deepseek")


def test_out_is_written_whole_or_not_at_all(src: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                            capsys: pytest.CaptureFixture[str]) -> None:
    import latentattn.interop.native as native

    full = tmp_path / "full"
    full.mkdir()
    (full / "keep").write_text("x")
    with pytest.raises(LatentAttnError, match="not an empty directory"):
        latentattn.convert_model(src, out=full)  # refused before any weight is read
    assert [p.name for p in full.iterdir()] == ["keep"]

    def fail(*_: Any) -> None:
        raise OSError("disk full")

    monkeypatch.setattr(native, "save_tokenizer", fail)  # fails halfway through writing OUT
    with pytest.raises(OSError, match="disk full"):
        latentattn.convert_model(src, kv_lora_rank="full", rope_dim="full", calib=None, method="svd",
                                 out=tmp_path / "out")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["full"]  # no OUT, no temp directory


def test_default_rank_per_model() -> None:
    smol = _config(heads=9, kv_heads=3, head_dim=64)  # SmolLM2-135M's attention
    llama = get_preset("llama-3-8b")
    assert (resolve_sizes(smol).kv_lora_rank, resolve_sizes(smol).rope_dim) == (128, 64)
    assert (resolve_sizes(llama).kv_lora_rank, resolve_sizes(llama).rope_dim) == (896, 128)
    assert resolve_sizes(llama).ratio == 0.5
    mqa = _config(heads=4, kv_heads=1, head_dim=8)  # one KV head: no latent left at 0.5x
    assert (rank_for_ratio(mqa, 8), resolve_sizes(mqa).ratio) == (4, 0.75)
    assert resolve_sizes(smol, rope_dim="full").rope_mode == "blocks"  # the exact form
    assert [rank_for_ratio(smol, 64, f) for f in (1 / 3, 1 / 2, 2 / 3)] == [64, 128, 192]  # bench convert


def test_kv_cache_rows(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["kv-cache", "--model", "llama-3-8b", "--kv-lora-rank", "896", "--rope-dim", "128",
                 "--json"]) == 0
    data = json.loads(capsys.readouterr().out)
    rows = {r["key"]: r for r in data["rows"]}
    assert rows["mla-converted"]["bytes_per_token_per_layer"] == (896 + 128) * 2
    assert rows["mla-converted-deepseek"]["bytes_per_token_per_layer"] == (896 + 128) * 2
    assert data["converted"]["ratio_vs_source"] == 0.5 and data["converted"]["rope_mode"] == "rorope"
    # Block rope: the latentattn row keeps --rope-dim, the DeepSeek row's rope key is one head wide.
    assert main(["kv-cache", "--model", "tiny-gqa", "--rope-dim", "full", "--kv-lora-rank", "8"]) == 0
    cfg = get_preset("tiny-gqa")
    a = cfg.attention
    assert isinstance(a, GQAConfig)
    out = capsys.readouterr().out
    assert f"({8}+{a.n_kv_heads * a.head_dim}) values" in out and f"({8}+{a.head_dim}) values" in out
    assert main(["kv-cache", "--model", "tiny-mqa", "--kv-lora-rank", "4"]) == 0  # MQA and MHA too
    assert main(["kv-cache", "--model", "tiny-mha", "--rope-dim", "full"]) == 0
    capsys.readouterr()
    assert "mla-converted" not in {r.key for r in kv_table(cfg).rows}  # only when asked


@pytest.mark.parametrize("argv,message", [
    (["--model", "deepseek-v3", "--kv-lora-rank", "128"], "--kv-lora-rank: deepseek-v3 is MLA already"),
    (["--model", "tiny-v4", "--rope-dim", "64"], "--rope-dim: tiny-v4 is V4 already"),
    (["--model", "llama-3-8b", "--kv-lora-rank", "2049"], "--kv-lora-rank must lie in 1..2048 (full rank"),
    (["--model", "llama-3-8b", "--rope-dim", "127"], "--rope-dim must be even"),
    (["--model", "llama-3-8b", "--rope-dim", "1040"], "between 16 and 8 x 128 = 1024"),
    (["--model", "llama-3-8b", "--kv-lora-rank", "lots"], "--kv-lora-rank must be an integer or 'full'"),
])
def test_kv_cache_conversion_bad_input(argv: list[str], message: str,
                                       capsys: pytest.CaptureFixture[str]) -> None:
    assert message in cli_error(capsys, ["kv-cache", *argv])
