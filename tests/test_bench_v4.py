"""``latentattn bench v4``: the smoke run produces every layer kind, the FLOP and byte counts equal
hand arithmetic at V4-Flash and V3.2 dims (and the layers' own weight counts), each point runs in
its own process, and points that cannot fit are skipped with their reason. No timings asserted.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from torch import nn

from latentattn.attention.dsa import SparseLatentAttention
from latentattn.attention.v4 import V4Attention
from latentattn.bench.dsa import V32_DIMS
from latentattn.bench.isolated import rss_mib, run_isolated
from latentattn.bench.v4 import KINDS
from latentattn.bench.v4_cost import (
    Cost,
    Rates,
    dsa_step,
    mla_weights,
    predicted_seconds,
    v4_step,
    v4_weights,
)
from latentattn.cli import main
from latentattn.config import CSA, HCA, SLIDING, V4AttentionConfig
from latentattn.presets import get_preset

FLASH = get_preset("deepseek-v4-flash")

# V4-Flash linear weights by hand (dim 4096, 64 heads x 512, q_lora 1024, 8 groups x o_lora 1024):
# q_a 4096*1024 + q_b 1024*32768 + kv 4096*512 + o_a 32768*1024 + o_b 8192*4096
MAIN = 4_194_304 + 33_554_432 + 2_097_152 + 33_554_432 + 33_554_432  # 106,954,752
CSA_EXTRA = 2 * 4096 * 1024 + 2 * 4096 * 256 + 1024 * 8192 + 4096 * 64  # compressor + indexer
HCA_EXTRA = 2 * 4096 * 512


def _linear_weights(module: nn.Module) -> int:
    return sum(m.weight.numel() for m in module.modules() if isinstance(m, nn.Linear))


@pytest.mark.parametrize(("kind", "extra"), [(SLIDING, 0), (CSA, CSA_EXTRA), (HCA, HCA_EXTRA)])
def test_v4_weights_are_the_hand_count_and_the_layers(kind: str, extra: int) -> None:
    a = FLASH.attention
    assert isinstance(a, V4AttentionConfig)
    assert v4_weights(FLASH, kind) == MAIN + extra
    with torch.device("meta"):  # the real module's weights, without allocating 0.5 GB
        layer = V4Attention(FLASH, a.layer_types.index(kind))
    assert _linear_weights(layer) == MAIN + extra


def test_v4_step_arithmetic_at_flash_dims() -> None:
    """CSA at 128k: E = 32,768 entries scored by 64 x 128 indexer heads, attention over the
    128-key window + top-512; HCA at 1M: all 8,192 entries + the window; fp32 (4 B) and bf16."""
    csa = v4_step(FLASH, CSA, 131072, torch.float32)
    assert csa["projections"] == Cost(2.0 * 126_091_264, 4.0 * 126_091_264, "float32")
    assert csa["indexer"] == Cost(2 * 64 * 128 * 32768, 32768 * 128 * 4, "float32")
    assert csa["indexer"].flop == 536_870_912
    assert csa["attention"] == Cost(4 * 64 * 512 * 640, 640 * 512 * 4, "float32")
    hca = v4_step(FLASH, HCA, 1048576, torch.bfloat16)
    assert set(hca) == {"projections", "attention"}
    assert hca["attention"] == Cost(4 * 64 * 512 * (128 + 8192), (128 + 8192) * 512 * 2, "bfloat16")
    assert hca["projections"].bytes == 2 * (MAIN + HCA_EXTRA)
    slide = v4_step(FLASH, SLIDING, 4096, torch.float32)
    assert slide["attention"] == Cost(4 * 64 * 512 * 128, 128 * 512 * 4, "float32")
    # bf16 keeps the indexer's GEMM in fp32 (it scores in fp32) and halves its key bytes
    half = v4_step(FLASH, CSA, 131072, torch.bfloat16)
    assert half["indexer"] == Cost(536_870_912, 32768 * 128 * 2, "float32")


def test_v32_step_arithmetic() -> None:
    """V3.2: q_a 7168*1536, q_b 1536*128*192, kv_a 7168*576, kv_b 512*128*256, o 16384*7168,
    indexer wq_b 1536*8192, wk 7168*128, weights_proj 7168*64; DSA top-2048 at 128k."""
    hand = 11_010_048 + 37_748_736 + 4_128_768 + 16_777_216 + 117_440_512 + 12_582_912 + 917_504 + 458_752
    assert mla_weights(V32_DIMS) == hand == 201_064_448
    with torch.device("meta"):
        layer = SparseLatentAttention(V32_DIMS.config(2048, 16))
    assert _linear_weights(layer) == hand
    sparse = dsa_step(V32_DIMS, 131072, 2048, torch.float32)
    assert sparse["indexer"] == Cost(2 * 64 * 128 * 131072, 131072 * 128 * 4, "float32")
    assert sparse["attention"] == Cost(2 * 128 * 2048 * (576 + 512), 2048 * 576 * 4, "float32")
    dense = dsa_step(V32_DIMS, 1048576, None, torch.float32)
    assert "indexer" not in dense
    assert dense["attention"].flop == 2 * 128 * 1048576 * 1088 == V32_DIMS.dense_decode_gflop(1048576) * 1e9


def test_prediction_takes_the_bound_of_each_part() -> None:
    rates = Rates(gemm_flops={"float32": 100e9}, copy_bytes=10e9)
    parts = {"memory": Cost(1e9, 1e9, "float32"), "compute": Cost(10e9, 1e6, "float32")}
    assert predicted_seconds(parts, rates) == pytest.approx(0.1 + 0.1)


def _allocate(mib: int) -> dict[str, float]:
    x = torch.ones(mib << 18)  # mib MiB of fp32, touched
    return {"sum": float(x.sum())}


def _fail() -> dict[str, float]:
    raise ValueError("no")


def test_each_point_runs_in_its_own_process() -> None:
    big = run_isolated(_allocate, 256)
    assert big["sum"] == 256 << 18
    assert big["peak_rss_mib"] >= 256
    held = torch.ones(512 << 18)  # 512 MiB here: a child's peak must not include it
    here = rss_mib()
    assert here is not None and held.sum() > 0
    assert run_isolated(_allocate, 1)["peak_rss_mib"] < here - 256
    assert run_isolated(_fail)["error"] == "ValueError: no"


def test_quick_run_has_every_kind(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out, png = tmp_path / "v4.json", tmp_path / "v4.png"
    code = main(["bench", "v4", "--quick", "--quiet", "--contexts", "64", "--prefill", "64",
                 "--repeats", "1", "--json", str(out), "--plot", str(png)])
    assert code == 0
    data = json.loads(out.read_text())
    decode = {p["kind"]: p for p in data["points"] if p["phase"] == "decode"}
    assert set(decode) == set(KINDS)
    for p in decode.values():
        assert p["note"] == "" and p["median_ms"] > 0 and p["part_ms"] > 0
        assert p["gflop"] > 0 and p["mbytes"] > 0 and p["predicted_ms"] > 0 and p["peak_rss_mib"] > 0
        assert p["gemm_gflops"] > 0 and p["copy_gbps"] > 0  # the rates its own process measured
    assert {p["kind"] for p in data["points"] if p["phase"] == "prefill"} == {"csa", "hca"}
    assert set(data["rates"]["gemm_gflops"]) == {"float32"} and data["rates"]["copy_gbps"] > 0
    assert [t["met"] for t in data["targets"]] == [None] * 4  # measured at V4-Flash sizes only
    text = capsys.readouterr().out
    assert all(f" {k} " in text for k in KINDS) and "prefill csa 64 tokens" in text
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_points_that_cannot_fit_are_skipped_with_the_reason(capsys: pytest.CaptureFixture[str]) -> None:
    code = main(["bench", "v4", "--quick", "--quiet", "--contexts", "64", "--no-prefill",
                 "--kinds", "csa,mla", "--memory-gib", "0.01"])
    assert code == 0
    text = capsys.readouterr().out
    assert text.count("skipped: predicted peak") == 2 and "wrote" not in text
