"""MLA's fp8 latent cache (FlashMLA's record: e4m3 latent, one fp32 scale per 128 values, bf16
rope part): its byte count, its round trip, decoding through it, and ``bench fp8-cache``."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from conftest import cli_error
from latentattn import load
from latentattn.bench.fp8cache import run_fp8_cache_bench
from latentattn.cache import FP8LatentKV
from latentattn.cache.fp8 import dequantize_e4m3, pack_record, quantize_e4m3, record_parts, unpack_record
from latentattn.cache.kv import fresh_step
from latentattn.cli import main
from latentattn.errors import ConfigError


def test_the_record_is_656_bytes_at_deepseek_dims() -> None:
    cache = FP8LatentKV(2, 8, 512, 64)
    assert cache.nbytes == 2 * 8 * 656  # 512 e4m3 + 4 fp32 scales + 64 bf16
    assert cache.records.shape == (2, 8, 656) and cache.records.dtype == torch.uint8
    for rank in (160, 42):
        with pytest.raises(ConfigError, match="multiple of 128"):
            FP8LatentKV(1, 8, rank, 64)


def test_the_record_layout_is_flashmla_s() -> None:
    """Bytes 0..511 the e4m3 latent, 512..527 four fp32 scales, 528..655 the bf16 rope part."""
    g = torch.Generator().manual_seed(0)
    latent = torch.randn(3, 576, generator=g)
    rec = pack_record(latent, 512)
    c8, scales = quantize_e4m3(latent[:, :512])
    assert torch.equal(rec[:, :512], c8)
    assert torch.equal(rec[:, 512:528].contiguous().view(torch.float32), scales)
    assert torch.equal(rec[:, 528:].contiguous().view(torch.bfloat16), latent[:, 512:].bfloat16())
    parts = record_parts(rec, 512)
    assert torch.equal(parts[0], c8) and torch.equal(parts[1], scales)
    torch.testing.assert_close(unpack_record(rec, 512)[:, :512], dequantize_e4m3(c8, scales))


def test_a_paged_fp8_cache_reads_back_what_the_contiguous_one_does() -> None:
    model = load("tiny-mla", seed=0)
    prompt = torch.randint(0, 256, (2, 12), generator=torch.Generator().manual_seed(1))
    flat, paged = model.make_cache(2, 20, latent_fp8=True), model.make_cache(2, 20, latent_fp8=True,
                                                                              page_size=8)
    a, b = model(prompt, flat), model(prompt, paged)
    a2, b2 = model(prompt[:, -1:], flat), model(prompt[:, -1:], paged)
    torch.testing.assert_close(a2, b2, rtol=0, atol=0)
    torch.testing.assert_close(a, b, rtol=0, atol=0)
    assert paged.layers[0].pages.shape == (6, 8, 52) and paged.used_bytes == 2 * 2 * 2 * 8 * 52


def test_round_trip_is_e4m3_close_and_keeps_rope_in_bf16() -> None:
    g = torch.Generator().manual_seed(0)
    latent = torch.randn(2, 5, 256 + 16, generator=g) * torch.logspace(-2, 1, 272)
    cache = FP8LatentKV(2, 5, 256, 16)
    step = fresh_step(2, 5, torch.device("cpu"))
    cache.write(step, latent)
    (back,) = cache.read(step, torch.float32)
    c, rope = latent[..., :256], latent[..., 256:]
    # e4m3 keeps 3 mantissa bits: at most 2^-4 relative error for normal values, and half the
    # smallest subnormal step (2^-9, times the block's scale) for the tiny ones.
    scale = record_parts(cache.records, 256)[1].repeat_interleave(128, dim=-1)
    err = (back[..., :256] - c).abs()
    assert (err <= c.abs() / 16 + scale * 2**-10 * 1.0001).all() and err.max() > 0
    torch.testing.assert_close(back[..., 256:], rope.bfloat16().float(), rtol=0, atol=0)


def test_decode_through_the_fp8_cache_stays_close() -> None:
    model = load("tiny-mla", seed=0)
    prompt = torch.randint(0, 256, (2, 12), generator=torch.Generator().manual_seed(1))
    caches = [model.make_cache(2, 20), model.make_cache(2, 20, latent_fp8=True)]
    outs = [model(prompt, c) for c in caches]
    torch.testing.assert_close(outs[0], outs[1], rtol=0, atol=0)  # prefill reads the exact latent
    nxt = prompt[:, -1:]
    a, b = (model(nxt, c) for c in caches)
    assert 0 < (a - b).abs().max() < 0.05
    assert caches[1].bytes_per_token_per_layer == 32 + 4 + 8 * 2  # R 32, one scale, rope 8 in bf16
    with pytest.raises(ConfigError, match=r"latent of MLA \(impl auto or absorb\) or DSA"):
        load("tiny-gqa").make_cache(1, 8, latent_fp8=True)


def test_bench_fp8_cache(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "fp8.json"
    assert main(["bench", "fp8-cache", "--model", "tiny-mla", "--tokens", "12", "--prompt-tokens", "8",
                 "--json", str(out), "--plot", str(tmp_path / "fp8.png"), "--quiet"]) == 0
    r = json.loads(out.read_text())
    assert r["decode_tokens"] == 12 and len(r["per_step_kl"]) == 12
    assert 0 <= r["mean_kl"] <= r["max_kl"] and 0 <= r["argmax_agreement"] <= 1
    lo, hi = r["argmax_agreement_ci"]
    assert 0 <= lo <= r["argmax_agreement"] <= hi <= 1 and hi - lo > 0  # Wilson: never zero width
    assert r["mean_kl_ci"][0] <= r["mean_kl"] <= r["mean_kl_ci"][1]
    assert r["floor_dtype"] == "float32" and r["floor_mean_kl"] >= 0 and r["floor_max_abs_logit_error"] > 0
    assert r["bytes_per_token_per_layer_fp8"] == 52 and r["bytes_per_token_per_layer_bf16"] == 80
    text = capsys.readouterr().out
    assert "fp8 latent cache 52 B/token/layer" in text
    assert "noise floor, the bf16 cache against a float32" in text
    short = tmp_path / "short.txt"
    short.write_text("too short")
    assert "max_seq_len 512" in cli_error(
        capsys, ["bench", "fp8-cache", "--model", "tiny-mla", "--tokens", "30000", "--json",
                 str(tmp_path / "x.json"), "--plot", str(tmp_path / "x.png")])
    assert "fewer than --prompt-tokens + --tokens = 72" in cli_error(
        capsys, ["bench", "fp8-cache", "--model", "tiny-mla", "--data", str(short), "--tokens", "8",
                 "--json",
                 str(tmp_path / "x.json"), "--plot", str(tmp_path / "x.png")])
    assert "latent of MLA (impl auto or absorb) or DSA" in cli_error(
        capsys, ["bench", "fp8-cache", "--model", "tiny-gqa", "--tokens", "8", "--json",
                 str(tmp_path / "x.json"), "--plot", str(tmp_path / "x.png"), "--quiet"])
    assert not (tmp_path / "x.json").exists()


def test_a_dsa_cache_holds_the_latent_as_fp8_records_beside_its_indexer_keys() -> None:
    """V3.2 as served: the latent in FlashMLA's record, the indexer keys in fp8; decoding over
    it stays close to the full-precision cache, and bench fp8-cache takes a DSA model."""
    from latentattn.cache.kv import IndexedLatentKV

    model = load("tiny-dsa", seed=0, indexer_key_cache="fp8")
    prompt = torch.randint(0, 256, (2, 30), generator=torch.Generator().manual_seed(2))
    caches = [model.make_cache(2, 40), model.make_cache(2, 40, latent_fp8=True)]
    layer = caches[1][0]
    assert isinstance(layer, IndexedLatentKV) and layer.latent_fp8 and layer.kv.dtype == torch.uint8
    r, dr = model.config.attention.kv_lora_rank, model.config.attention.qk_rope_head_dim
    d_i = model.config.attention.indexer.index_head_dim
    assert caches[1].bytes_per_token_per_layer == (r + 4 + 2 * dr) + (d_i + 4)  # record + fp8 key
    outs = [model(prompt, c) for c in caches]
    outs2 = [model(prompt[:, -1:], c) for c in caches]
    for a, b in ((outs[0], outs[1]), (outs2[0], outs2[1])):
        assert 0 < (a - b).abs().max() < 0.1
    with pytest.raises(ConfigError, match="paged latent cache holds dense MLA's latent"):
        model.make_cache(1, 8, latent_fp8=True, page_size=4)
    plain = load("tiny-dsa", seed=0)  # keys in the cache dtype: the bench compares like with like
    r8 = run_fp8_cache_bench(plain, torch.arange(40) % 256, 16, 8, ("tiny-dsa", "x"), progress=False)
    assert r8.bytes_per_token_per_layer_bf16 == (r + dr) * 2 + d_i * 2
    assert r8.bytes_per_token_per_layer_fp8 == (r + 4 + 2 * dr) + d_i * 2
