"""Training precision: detecting a CPU's native bf16 from its cpuinfo, the ``--dtype auto``
policy, ``train --dtype`` (bf16 and fp32 its aliases, a resume keeping its checkpoint's
precision; the old ``--precision`` and ``--bf16`` are in test_cli_vocabulary.py), and ``bench
precision`` at toy size. No timings are asserted."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch

from conftest import cli_error
from latentattn import precision
from latentattn.bench.convert import Heal
from latentattn.bench.precision import (
    PrecisionBenchSettings,
    bootstrap_median_ci,
    bootstrap_ratio_ci,
    precision_table,
    run_precision_bench,
)
from latentattn.cli import main
from latentattn.config import GQAConfig, ModelConfig
from latentattn.convert import Plan, choose_pairs, convert
from latentattn.data import default_text, train_val_split
from latentattn.errors import ConfigError
from latentattn.model.transformer import Transformer
from latentattn.precision import CpuBf16, choose_precision, cpu_bf16, parse_cpuinfo
from latentattn.train.checkpoint import read_state

EPYC = """processor\t: 0
vendor_id\t: AuthenticAMD
cpu family\t: 25
model\t\t: 17
model name\t: AMD EPYC
flags\t\t: fpu vme de sse sse2 avx2 avx512f avx512_bf16 avx512_vnni clzero
processor\t: 1
model name\t: AMD EPYC
flags\t\t: fpu vme de sse sse2 avx2 avx512f avx512_bf16 avx512_vnni clzero
"""
SAPPHIRE = "model name\t: Intel(R) Xeon(R) Platinum 8480+\nflags\t\t: avx512f avx512_bf16 amx_bf16 amx_tile\n"
SKYLAKE = "model name\t: Intel(R) Xeon(R) Gold 6148\nflags\t\t: avx2 avx512f avx512bw avx512_vnni\n"
NATIVE = CpuBf16(native=True, flags=("avx512_bf16",), model="AMD EPYC", source="/proc/cpuinfo")
NOT_NATIVE = CpuBf16(native=False, flags=(), model="Xeon", source="/proc/cpuinfo")


def test_cpuinfo_flags_say_whether_bf16_is_native(tmp_path: Path) -> None:
    epyc = parse_cpuinfo(EPYC)
    assert epyc == CpuBf16(native=True, flags=("avx512_bf16",), model="AMD EPYC", source="/proc/cpuinfo")
    assert epyc.describe() == "AMD EPYC (avx512_bf16)"
    assert parse_cpuinfo(SAPPHIRE).flags == ("avx512_bf16", "amx_bf16")
    skylake = parse_cpuinfo(SKYLAKE)  # AVX-512 without its BF16 extension: emulated bf16
    assert not skylake.native and skylake.flags == ()
    assert skylake.describe() == "Intel(R) Xeon(R) Gold 6148 (no native bf16)"
    assert not parse_cpuinfo("model name : X\nflags : sse avx512_bf16x\n").native  # whole words only
    path = tmp_path / "cpuinfo"
    path.write_text(SAPPHIRE)
    assert cpu_bf16(path) == parse_cpuinfo(SAPPHIRE, str(path))
    unknown = cpu_bf16(tmp_path / "missing")  # no /proc (macOS, Windows): unknown, so not native
    assert not unknown.native and unknown.source == "unknown" and unknown.model
    assert unknown.describe().endswith("(bf16 support unknown)")


def test_auto_takes_bf16_only_where_it_is_native() -> None:
    assert choose_precision("auto", "cpu", NATIVE) == precision.PrecisionChoice(
        True, "CPU has native bf16: avx512_bf16")
    assert choose_precision("auto", "cpu", NATIVE).line() == \
        "precision: bf16 autocast (CPU has native bf16: avx512_bf16)"
    assert choose_precision("auto", "cpu", NOT_NATIVE).line() == "precision: fp32 (CPU has no native bf16)"
    unknown = CpuBf16(native=False, flags=(), model="arm64", source="unknown")
    assert choose_precision("auto", "cpu", unknown).line() == "precision: fp32 (CPU bf16 support unknown)"
    assert not choose_precision("auto", "meta", NATIVE).bf16  # not measured there
    # An explicit choice wins whatever the CPU.
    assert not choose_precision("fp32", "cpu", NATIVE).bf16
    assert choose_precision("bf16", "cpu", NOT_NATIVE).line() == "precision: bf16 autocast (as asked)"
    with pytest.raises(ConfigError, match="precision must be one of auto, fp32, bf16"):
        choose_precision("fp16", "cpu")


def test_auto_reads_this_machine_unless_told(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(precision, "cpu_bf16", lambda: NOT_NATIVE)
    assert not choose_precision("auto", torch.device("cpu")).bf16
    monkeypatch.setattr(precision, "cpu_bf16", lambda: NATIVE)
    assert choose_precision("auto", torch.device("cpu")).bf16


TEXT = default_text()[:20_000]
SMALL = TEXT[:2_000]  # a validation tenth of 12 windows: the end-of-run evaluation stays short
TRAIN = ["train", "--attn", "mla", "--dim", "32", "--layers", "1", "--heads", "2", "--seq-len", "16",
         "--kv-lora-rank", "8", "--batch-size", "2", "--eval-every", "0", "--quiet"]


def test_train_precision_flag_auto_and_resume(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                              capsys: pytest.CaptureFixture[str]) -> None:
    data = tmp_path / "text.txt"
    data.write_text(SMALL)
    base = [*TRAIN, "--data", str(data)]
    monkeypatch.setattr(precision, "cpu_bf16", lambda: NATIVE)
    out = tmp_path / "auto"
    assert main([*base, "--steps", "1", "--out", str(out)]) == 0
    assert "precision: bf16 autocast (CPU has native bf16: avx512_bf16)" in capsys.readouterr().out
    assert read_state(out)["settings"]["bf16"] is True
    # Continued on a machine without native bf16, auto keeps the checkpoint's precision.
    monkeypatch.setattr(precision, "cpu_bf16", lambda: NOT_NATIVE)
    assert main([*base, "--steps", "2", "--out", str(out), "--resume"]) == 0
    assert "precision: bf16 autocast (the checkpoint's)" in capsys.readouterr().out
    assert read_state(out)["step"] == 2
    # ... and an explicit other precision is refused as any other changed setting is.
    assert "bf16 is True in the checkpoint, False here" in cli_error(
        capsys, [*base, "--steps", "3", "--out", str(out), "--resume", "--dtype", "float32"])
    fresh = tmp_path / "fresh"
    assert main([*base, "--steps", "1", "--out", str(fresh)]) == 0
    assert "precision: fp32 (CPU has no native bf16)" in capsys.readouterr().out
    assert read_state(fresh)["settings"]["bf16"] is False
    alias = tmp_path / "alias"
    assert main([*base, "--steps", "1", "--out", str(alias), "--dtype", "bf16"]) == 0  # bfloat16
    assert "precision: bf16 autocast (as asked)" in capsys.readouterr().out
    assert read_state(alias)["settings"]["bf16"] is True
    line = cli_error(capsys, [*base, "--steps", "1", "--out", str(tmp_path / "x"), "--dtype", "fp16"])
    assert line.startswith("latentattn: error: --dtype float16: training needs loss scaling")
    assert not (tmp_path / "x").exists()


def test_bootstrap_intervals_hold_the_median() -> None:
    xs = [1.0, 1.1, 0.9, 1.05, 0.95, 1.2, 0.8]
    lo, hi = bootstrap_median_ci(xs, 0)
    assert min(xs) <= lo <= 1.0 <= hi <= max(xs)
    assert bootstrap_median_ci([2.0, 2.0, 2.0], 0) == (2.0, 2.0)
    lo, hi = bootstrap_ratio_ci([4.0, 4.4, 3.6], [2.0, 2.2, 1.8], 0)
    assert 3.6 / 2.2 <= lo <= 2.0 <= hi <= 4.4 / 1.8


def _toy() -> tuple[Transformer, Transformer]:
    cfg = ModelConfig(vocab_size=256, dim=32, n_layers=1, intermediate_size=48, max_seq_len=64,
                      attention=GQAConfig(4, 2, 8), name="toy")
    torch.manual_seed(0)
    teacher = Transformer(cfg).eval()
    return teacher, convert(teacher, Plan(choose_pairs(2, 4, None), 8))


def test_bench_precision_times_both_at_toy_size(tmp_path: Path) -> None:
    torch.set_num_threads(1)
    teacher, student = _toy()
    before = {k: v.clone() for k, v in student.state_dict().items()}
    tokens, val = train_val_split(torch.tensor(list(TEXT.encode()), dtype=torch.long))
    settings = PrecisionBenchSettings(batch_size=2, seq_len=16, warmup=1, steps=2, rounds=2)
    report = run_precision_bench(teacher, student, tokens, val, settings, ("toy", "MLA R=8"), NATIVE)
    assert [t.precision for t in report.timings] == ["fp32", "bf16"]
    for t in report.timings:
        assert len(t.step_seconds) == 4 and min(t.step_seconds) > 0  # 2 timed steps x 2 rounds
        assert t.ci95_s[0] <= t.median_s <= t.ci95_s[1] and t.min_s == min(t.step_seconds)
        assert len(t.first_round_losses) == 3  # warm-up included
    ratio = report.timing("fp32").median_s / report.timing("bf16").median_s
    assert report.speedup_bf16 == pytest.approx(ratio)
    assert report.speedup_bf16_ci95[0] <= report.speedup_bf16 <= report.speedup_bf16_ci95[1]
    # The same batches from the same weights: the precisions differ only by bf16 rounding.
    assert 0 < report.max_loss_diff < 0.05
    assert report.auto == "precision: bf16 autocast (CPU has native bf16: avx512_bf16)"
    assert all(torch.equal(v, before[k]) for k, v in student.state_dict().items())  # copies trained
    d = json.loads(json.dumps(report.as_dict()))
    assert d["faster"] in ("fp32", "bf16") and d["cpu"]["flags"] == ["avx512_bf16"]
    assert math.isfinite(d["speedup_bf16"]) and "loadavg_1_5_15_at_end" in d["machine"]
    table = precision_table(report)
    assert "| bf16 autocast |" in table and "AMD EPYC (avx512_bf16)" in table
    # bench convert's heals train in the precision their Heal carries (--heal-precision).
    assert Heal(tokens, val, bf16=True).settings().bf16 and not Heal(tokens, val).settings().bf16


def test_bench_precision_cli_refuses_bad_input(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    argv = ["bench", "precision", "--json", str(tmp_path / "p.json"), "--plot", str(tmp_path / "p.png"),
            "--quiet"]
    assert cli_error(capsys, [*argv, "--steps", "0"]) == "latentattn: error: --steps must be >= 1, got 0"
    assert "MLA already" in cli_error(capsys, [*argv, "--model", "tiny-mla"])
    assert "--calib-tokens must be >= 256" in cli_error(capsys, [*argv, "--calib-tokens", "8"])
    assert not (tmp_path / "p.json").exists()


def test_fp32_kept_tensors_keep_their_exact_values_through_a_bf16_cast() -> None:
    """KeepFloat32 keeps the fp32 values themselves, not fp32 copies of their bf16 rounding:
    a V4 layer's RoPE frequencies (a buffer) and sinks (a parameter) are bit-identical after
    ``.to(torch.bfloat16)``."""
    from latentattn.model.transformer import Transformer
    from latentattn.presets import get_preset

    model = Transformer(get_preset("tiny-v4"))
    attn = model.blocks[1].self_attn
    with torch.no_grad():
        attn.sinks.copy_(torch.linspace(-1, 1, attn.sinks.numel()) / 3)
    before = {"inv_freq": attn.inv_freq.clone(), "sinks": attn.sinks.detach().clone()}
    assert before["inv_freq"].bfloat16().float().ne(before["inv_freq"]).any()  # bf16 would round
    model.to(torch.bfloat16)
    assert torch.equal(attn.inv_freq, before["inv_freq"])
    assert torch.equal(attn.sinks.detach(), before["sinks"])
