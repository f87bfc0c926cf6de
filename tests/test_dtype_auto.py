"""bf16 weights where bf16 is native: ``auto_dtype`` / ``choose_dtype`` over a
mocked cpuinfo and a mocked CUDA capability (both answers each), ``load(..., dtype="auto")``, the
fp32 islands a bf16 model keeps, the cache following the model's dtype, and the CLI's ``--dtype``
(the line saying what auto chose, the emulation warning, bad names). No timings are asserted."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

import latentattn
from conftest import cli_error
from latentattn import precision
from latentattn.cli import main
from latentattn.cli.common import choose_device
from latentattn.data import default_text
from latentattn.errors import ConfigError
from latentattn.precision import (
    CpuBf16,
    DtypeChoice,
    Float32Linear,
    auto_dtype,
    choose_dtype,
    choose_precision,
    fp32_compute,
)

EPYC = "model name\t: AMD EPYC\nflags\t\t: fpu sse2 avx2 avx512f avx512_bf16 avx512_vnni\n"
SKYLAKE = "model name\t: Intel(R) Xeon(R) Gold 6148\nflags\t\t: avx2 avx512f avx512bw avx512_vnni\n"
NATIVE = CpuBf16(native=True, flags=("avx512_bf16",), model="AMD EPYC", source="/proc/cpuinfo")
NOT_NATIVE = CpuBf16(native=False, flags=(), model="Xeon", source="/proc/cpuinfo")
NATIVE_LINE = "latentattn: dtype: bfloat16 (auto: CPU has native bf16: avx512_bf16)"
NOT_NATIVE_LINE = "latentattn: dtype: float32 (auto: CPU has no native bf16)"
WARNING = ("latentattn: warning: bfloat16 on this CPU is emulated and slow (no avx512_bf16 or "
           "amx_bf16): float32, what --dtype auto takes here, runs faster")


@pytest.fixture
def cpuinfo(tmp_path: Path, monkeypatch: pytest.MonkeyPatch):  # type: ignore[no-untyped-def]
    """``cpuinfo(text)``: this machine's /proc/cpuinfo reads as ``text`` from now on."""
    real = precision.cpu_bf16

    def use(text: str) -> None:
        path = tmp_path / "cpuinfo"
        path.write_text(text)
        monkeypatch.setattr(precision, "cpu_bf16", lambda: real(path))

    return use


@pytest.fixture
def cuda(monkeypatch: pytest.MonkeyPatch):  # type: ignore[no-untyped-def]
    """``cuda(bf16)``: a CUDA GPU that has native bf16 or not (nothing is allocated on it)."""
    def use(bf16: bool) -> None:
        monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
        monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
        monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda including_emulation=True: bf16)

    return use


def test_auto_reads_the_cpuinfo_flags(cpuinfo) -> None:  # type: ignore[no-untyped-def]
    cpuinfo(EPYC)
    choice = auto_dtype()
    assert choice == DtypeChoice(torch.bfloat16, "CPU has native bf16: avx512_bf16", auto=True)
    assert choice.line() == "dtype: bfloat16 (auto: CPU has native bf16: avx512_bf16)"
    assert choice.warning() is None
    assert auto_dtype("cpu") == choose_dtype("auto", torch.device("cpu")) == choice
    cpuinfo(SKYLAKE)  # AVX-512 without its BF16 extension: bf16 would be emulated
    choice = auto_dtype()
    assert choice == DtypeChoice(torch.float32, "CPU has no native bf16", auto=True)
    assert choice.line() == "dtype: float32 (auto: CPU has no native bf16)"
    cpuinfo("model name : Intel(R) Xeon(R) Platinum 8480+\nflags : avx512f amx_bf16 amx_tile\n")
    assert auto_dtype().dtype == torch.bfloat16  # AMX alone counts too


def test_unreadable_cpuinfo_is_float32(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    real = precision.cpu_bf16
    monkeypatch.setattr(precision, "cpu_bf16", lambda: real(tmp_path / "missing"))
    assert auto_dtype().line() == "dtype: float32 (auto: CPU bf16 support unknown)"


def test_auto_on_a_gpu_follows_its_bf16(cuda) -> None:  # type: ignore[no-untyped-def]
    cuda(True)
    assert auto_dtype("cuda") == DtypeChoice(torch.bfloat16, "GPU supports bf16", auto=True)
    cuda(False)
    assert auto_dtype("cuda") == DtypeChoice(torch.float32, "GPU has no bf16 support", auto=True)
    # Asked for on such a GPU, bf16 is no CPU emulation: no warning (torch decides there).
    assert choose_dtype("bfloat16", "cuda").warning() is None
    assert auto_dtype("meta").dtype == torch.float32  # other devices: not measured


def test_explicit_dtypes_win_and_emulated_bf16_warns() -> None:
    assert choose_dtype("float32", cpu=NATIVE) == DtypeChoice(torch.float32, "as asked")
    assert choose_dtype(torch.float16, cpu=NOT_NATIVE) == DtypeChoice(torch.float16, "as asked")
    assert choose_dtype("bfloat16", cpu=NATIVE).warning() is None
    emulated = choose_dtype("torch.bfloat16", "cpu", NOT_NATIVE)
    assert emulated == DtypeChoice(torch.bfloat16, "as asked", emulated=True)
    assert f"latentattn: {emulated.warning()}" == WARNING
    for bad in ("int8", "fp32", None):
        with pytest.raises(ConfigError, match=r"dtype must be a floating torch\.dtype"):
            choose_dtype(bad, cpu=NATIVE)
    with pytest.raises(ConfigError, match="not a device"):
        choose_dtype("auto", "gpu7", NATIVE)
    with pytest.raises(ConfigError, match="dtype must be"):  # "auto" needs a device: choose_dtype
        precision.resolve_dtype("auto")


def test_train_precision_and_dtype_give_one_reason() -> None:
    """train --dtype auto and generate --dtype auto rest on one answer and say it in the same words."""
    for cpu in (NATIVE, NOT_NATIVE):
        p, d = choose_precision("auto", "cpu", cpu), auto_dtype("cpu", cpu)
        assert p.bf16 == (d.dtype == torch.bfloat16) and p.why == d.why
    assert choose_precision("bf16", "cpu", NOT_NATIVE).warning() == (
        "warning: bf16 autocast on this CPU is emulated and slow (no avx512_bf16 or amx_bf16): fp32, "
        "what --dtype auto takes here, runs faster")
    assert choose_precision("bf16", "cpu", NATIVE).warning() is None
    assert choose_precision("auto", "cpu", NOT_NATIVE).warning() is None


# ---------------------------------------------------------------------------- load
def test_load_auto_picks_by_the_cpu(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(precision, "cpu_bf16", lambda: NATIVE)
    bf16 = latentattn.load("tiny-mla", dtype="auto", seed=0)
    assert bf16.dtype == torch.bfloat16
    assert latentattn.load("tiny-mla", seed=0).dtype == torch.float32  # None: as before
    monkeypatch.setattr(precision, "cpu_bf16", lambda: NOT_NATIVE)
    fp32 = latentattn.load("tiny-mla", dtype="auto", seed=0)
    assert fp32.dtype == torch.float32
    # The cache follows the model (make_cache's default dtype): half the bytes in bf16.
    assert 2 * bf16.make_cache(1, 16).nbytes == fp32.make_cache(1, 16).nbytes
    with torch.no_grad():
        ids = torch.tensor([[1, 2, 3, 4]])
        torch.testing.assert_close(bf16(ids).float(), fp32(ids).float(), atol=0.1, rtol=0.05)


def test_load_auto_over_a_checkpoint(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A checkpoint saved in fp32 loads in bf16 under auto on a native CPU; dtype=None keeps fp32."""
    pytest.importorskip("latentattn.interop.hf")
    latentattn.save_pretrained(latentattn.load("tiny-mla", seed=0), tmp_path)
    monkeypatch.setattr(precision, "cpu_bf16", lambda: NATIVE)
    assert latentattn.load(tmp_path, dtype="auto").dtype == torch.bfloat16
    assert latentattn.load(tmp_path).dtype == torch.float32
    monkeypatch.setattr(precision, "cpu_bf16", lambda: NOT_NATIVE)
    assert latentattn.load(tmp_path, dtype="auto").dtype == torch.float32


@pytest.mark.parametrize("preset", ["tiny-mla-moe", "tiny-v4"])
def test_fp32_islands_stay_fp32_under_auto_bf16(preset: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """What needs fp32 stays fp32 in an auto-bf16 model: the MoE router's weight and bias, V4's
    mHC (its Sinkhorn runs on them) and its fp32 norms; and the router computes in fp32."""
    from latentattn.model.ffn import Router
    from latentattn.precision import KeepFloat32

    monkeypatch.setattr(precision, "cpu_bf16", lambda: NATIVE)
    model = latentattn.load(preset, dtype="auto", seed=0)
    assert model.dtype == torch.bfloat16
    islands = [m for m in model.modules() if isinstance(m, KeepFloat32)]
    assert islands and all(p.dtype == torch.float32 for m in islands
                           for p in m.parameters(recurse=False))
    routers = [m for m in model.modules() if isinstance(m, Router)]
    if preset == "tiny-mla-moe":
        assert routers
        weights, _ = routers[0](torch.randn(5, model.config.dim, dtype=torch.bfloat16))
        assert weights.dtype == torch.float32
    with torch.no_grad():
        assert torch.isfinite(model(torch.tensor([[1, 2, 3, 4, 5, 6, 7, 8]])).float()).all()


# ---------------------------------------------------------------------------- CLI
GEN = ["generate", "--model", "tiny-mla", "--prompt", "Hi", "--max-new-tokens", "2"]
DEVICE_LINE = f"latentattn: {choose_device('auto').line()}"  # --device auto's line, first


def _stderr(capsys: pytest.CaptureFixture[str], argv: list[str]) -> list[str]:
    """stderr's lines after --device auto's (which every run here says first)."""
    assert main(argv) == 0
    lines = capsys.readouterr().err.strip().splitlines()
    assert lines[0] == DEVICE_LINE
    return lines[1:]


def test_generate_says_what_auto_chose(monkeypatch: pytest.MonkeyPatch,
                                       capsys: pytest.CaptureFixture[str]) -> None:
    monkeypatch.setattr(precision, "cpu_bf16", lambda: NATIVE)
    err = _stderr(capsys, GEN)  # auto is the default
    assert err[0] == NATIVE_LINE and "random-init" in err[1] and len(err) == 2
    assert _stderr(capsys, [*GEN, "--dtype", "auto"])[0] == NATIVE_LINE
    # Asked for by name: nothing to say where it is native.
    err = _stderr(capsys, [*GEN, "--dtype", "bfloat16"])
    assert len(err) == 1 and err[0].startswith("latentattn: tiny-mla is a random-init")
    monkeypatch.setattr(precision, "cpu_bf16", lambda: NOT_NATIVE)
    assert _stderr(capsys, GEN)[0] == NOT_NATIVE_LINE
    err = _stderr(capsys, [*GEN, "--dtype", "bfloat16"])  # allowed, with one warning line
    assert err[0] == WARNING and len(err) == 2
    assert len(_stderr(capsys, [*GEN, "--dtype", "float32"])) == 1  # the random-init note only


def test_eval_says_what_auto_chose(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                   capsys: pytest.CaptureFixture[str]) -> None:
    data = tmp_path / "text.txt"
    data.write_text("The latent attention cache holds one compressed vector per token. " * 8)
    argv = ["eval", "--model", "tiny-gqa", "--data", str(data), "--seq-len", "32", "--quiet"]
    monkeypatch.setattr(precision, "cpu_bf16", lambda: NATIVE)
    assert _stderr(capsys, argv)[0] == NATIVE_LINE
    monkeypatch.setattr(precision, "cpu_bf16", lambda: NOT_NATIVE)
    assert _stderr(capsys, argv)[0] == NOT_NATIVE_LINE
    assert _stderr(capsys, [*argv, "--dtype", "bfloat16"])[0] == WARNING


@pytest.mark.parametrize("bad", ["int8", "fp64", "float64", "Auto", "torch.float32"])
def test_bad_dtype_names_exit_2_with_one_line(bad: str, capsys: pytest.CaptureFixture[str]) -> None:
    line = cli_error(capsys, [*GEN, "--dtype", bad])
    assert line == (f"latentattn: error: --dtype must be one of auto, float32, bfloat16, float16, "
                    f"got {bad!r}")


def test_errors_stay_the_only_line(monkeypatch: pytest.MonkeyPatch,
                                   capsys: pytest.CaptureFixture[str]) -> None:
    """The dtype line is said after the work, so an error is still the only line on stderr."""
    monkeypatch.setattr(precision, "cpu_bf16", lambda: NOT_NATIVE)
    line = cli_error(capsys, ["generate", "--model", "tiny-mla", "--prompt", "a" * 600,
                              "--max-new-tokens", "1", "--dtype", "bfloat16"])
    assert "exceeds the model's context" in line


def test_train_warns_on_emulated_bf16(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                      capsys: pytest.CaptureFixture[str]) -> None:
    data = tmp_path / "text.txt"
    data.write_text(default_text()[:2_000])
    argv = ["train", "--attn", "mla", "--dim", "32", "--layers", "1", "--heads", "2", "--seq-len",
            "16", "--kv-lora-rank", "8", "--batch-size", "2", "--eval-every", "0", "--quiet",
            "--steps", "1", "--data", str(data)]
    monkeypatch.setattr(precision, "cpu_bf16", lambda: NOT_NATIVE)
    assert main([*argv, "--out", str(tmp_path / "a"), "--dtype", "bfloat16"]) == 0
    captured = capsys.readouterr()
    assert "precision: bf16 autocast (as asked)" in captured.out
    assert captured.err.strip().splitlines() == [
        "latentattn: warning: bf16 autocast on this CPU is emulated and slow (no avx512_bf16 or "
        "amx_bf16): fp32, what --dtype auto takes here, runs faster", DEVICE_LINE]
    monkeypatch.setattr(precision, "cpu_bf16", lambda: NATIVE)
    assert main([*argv, "--out", str(tmp_path / "b")]) == 0
    captured = capsys.readouterr()
    assert "precision: bf16 autocast (CPU has native bf16: avx512_bf16)" in captured.out
    assert captured.err.strip().splitlines() == [DEVICE_LINE]  # --device auto says what it chose


def test_float32_linear_stays_fp32_under_autocast() -> None:
    """bf16 autocast (train --precision bf16) casts F.linear's inputs to bf16 whatever they are;
    Float32Linear (DSA's indexer weights) turns it off around itself, and only there."""
    lin = Float32Linear(8, 4)
    x = torch.randn(3, 8, dtype=torch.bfloat16)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y = lin(x)
        assert torch.nn.functional.linear(x.float(), lin.weight).dtype == torch.bfloat16
        with fp32_compute(x):
            assert torch.nn.functional.linear(x.float(), lin.weight).dtype == torch.float32
        assert torch.is_autocast_enabled("cpu")
    assert y.dtype == torch.float32
    torch.testing.assert_close(y, torch.nn.functional.linear(x.float(), lin.weight, lin.bias))
