"""``latentattn kernels check`` (``make gpu-check``) without a GPU: the GPU tests' helpers
(tests/test_triton_gpu.py) run here on CPU tensors in Triton's interpreter at tiny fp32 shapes,
so their logic is tested before a GPU ever runs them; the command's one line where there is no
CUDA; and the JSON it writes, from a fake JUnit XML and a fake bench report."""

from __future__ import annotations

import importlib
import importlib.util
import json
import os
import textwrap
from pathlib import Path
from typing import Any

import pytest
import torch

from conftest import INTERPRETER, cli_error
from latentattn.bench import gpu_check
from latentattn.bench.gpu_check import CaseResult, CheckOptions, PytestRun
from latentattn.cli import build_parser, main
from latentattn.errors import LatentAttnError
from test_triton_gpu import (
    check_dense_decode,
    check_generation,
    check_indexer,
    check_sparse,
    within,
)

if importlib.util.find_spec("triton") is not None and os.environ.get("TRITON_INTERPRET") == "1":
    # Kernels defined as interpreted, whoever imported them first; triton_fp8 first, whose
    # helpers the others bind when they are (re)loaded, and triton_mla before triton_sparse.
    for _name in ("triton_fp8", "triton_mla", "triton_sparse", "triton_indexer"):
        importlib.reload(importlib.import_module(f"latentattn.kernels.{_name}"))

# The helpers on CPU tensors run in Triton's interpreter (INTERPRETER) and need Triton; the rest
# of this file needs neither Triton nor a GPU, so it is not skipped as a whole.
NEEDS_TRITON = pytest.mark.skipif(importlib.util.find_spec("triton") is None,
                                  reason="needs Triton: pip install 'latentattn[gpu]'")
TINY = {"heads": 16, "rank": 64, "rope": 16}  # 16 heads: one full head block, as at 128


# ---------------------------------------------------------------------------- the helpers, tiny
@INTERPRETER
@NEEDS_TRITON
@pytest.mark.parametrize(("page", "fp8"), [(None, False), (16, False), (None, True), (16, True)])
def test_dense_decode_check(page: int | None, fp8: bool) -> None:
    figures = check_dense_decode("cpu", torch.float32, [1, 37, 100], page=page, fp8=fp8, **TINY)
    assert set(figures) == {f"{w} {k}" for w in ("o", "lse") for k in ("err", "torch err", "bound")}
    assert figures["o err"] <= figures["o bound"]


@INTERPRETER
@NEEDS_TRITON
@pytest.mark.parametrize("kw", [
    pytest.param({"batch": 2, "tokens": 5, "keys": 60, "topk": 24, "backward": True}, id="fwd-bwd"),
    pytest.param({"batch": 2, "tokens": 1, "keys": 300, "topk": 256, "num_splits": 3}, id="decode-split"),
    pytest.param({"batch": 2, "tokens": 1, "keys": 300, "topk": 256, "fp8": True}, id="fp8-decode"),
    pytest.param({"batch": 1, "tokens": 9, "keys": 40, "topk": 16, "rows": [0, 7, 8]}, id="rows"),
])
def test_sparse_check(kw: dict[str, Any]) -> None:
    figures = check_sparse("cpu", torch.float32, **TINY, **kw)
    assert ("dkv err" in figures) == bool(kw.get("backward"))


@INTERPRETER
@NEEDS_TRITON
@pytest.mark.parametrize("kw", [{}, {"fp8": True}, {"rows": [0, 5, 6]}])
def test_indexer_check(kw: dict[str, Any]) -> None:
    check_indexer("cpu", torch.float32, tokens=7, keys=50, heads=8, dim=32, **kw)


@INTERPRETER
@NEEDS_TRITON
@pytest.mark.parametrize("name", ["tiny-mla", "tiny-dsa"])
def test_generation_check(name: str) -> None:
    # 12 prompt tokens: past tiny-dsa's index_topk of 8, so its selection is sparse for real.
    figures = check_generation(name, "cpu", batch=1, prompt_len=12, new_tokens=3)
    assert figures["kernel calls"] > 0


def test_the_rule_fails_what_rounding_does_not_explain() -> None:
    exact = torch.randn(64, 512, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    base = exact.bfloat16()
    within(base, exact, base, terms=576, what="o")  # as close as the baseline: passes
    with pytest.raises(AssertionError, match="o: max"):
        within((exact * (1 + 2e-2)).bfloat16(), exact, base, terms=576, what="o")  # 2% off
    masked = exact.clone()
    masked[0, 0] = float("-inf")
    with pytest.raises(AssertionError, match="non-finite"):
        within(base, masked, base, terms=576, what="lse")


# ---------------------------------------------------------------------------- the command
def test_without_cuda_it_says_so_in_one_line(monkeypatch: pytest.MonkeyPatch, tmp_path: Path,
                                             capsys: pytest.CaptureFixture[str]) -> None:
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.chdir(tmp_path)
    assert main(["kernels", "check", "--device", "cuda"]) == 0
    out, err = capsys.readouterr()
    assert out.splitlines() == [gpu_check.NO_CUDA] and not err
    assert not list(tmp_path.iterdir())  # no report: nothing was checked


def test_options(monkeypatch: pytest.MonkeyPatch, tmp_path: Path,
                 capsys: pytest.CaptureFixture[str]) -> None:
    args = build_parser().parse_args(["kernels", "check"])
    assert (args.device, args.out, args.timeout, args.skip_bench, args.batch_sizes, args.contexts,
            args.index_topk) == ("auto", "gpu-check.json", 360.0, False, [1, 32], [4096, 32768], 2048)
    # With a GPU, the user's mistakes are one line each, before any work.
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    assert "TRITON_INTERPRET=1" in cli_error(capsys, ["kernels", "check"])
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    assert "--timeout must be positive" in cli_error(capsys, ["kernels", "check", "--timeout", "0"])
    missing = tmp_path / "nowhere" / "r.json"
    assert "does not exist" in cli_error(capsys, ["kernels", "check", "--out", str(missing)])
    assert "no GPU test file" in cli_error(capsys, ["kernels", "check", "--out",
                                                    str(tmp_path / "r.json"), "--tests",
                                                    str(tmp_path / "none.py")])


def test_find_tests() -> None:
    assert gpu_check.find_tests() == (Path(__file__).parent / "test_triton_gpu.py").resolve()
    with pytest.raises(LatentAttnError, match="--tests PATH"):
        gpu_check.find_tests("no/such/file.py")


# ---------------------------------------------------------------------------- the JSON
FAKE_JUNIT = """<?xml version="1.0" encoding="utf-8"?>
<testsuites><testsuite name="pytest" errors="1" failures="1" skipped="1" tests="4" time="12.5">
<testcase classname="tests.test_triton_gpu" name="test_dense_decode[bf16-paged-B32-8k]" time="3.25">
<properties><property name="o err" value="0.00390625"/><property name="o bound" value="0.0625"/>
</properties></testcase>
<testcase classname="tests.test_triton_gpu" name="test_sparse[prefill-T32k-past-int32]" time="7.5">
<failure message="AssertionError: o: max |kernel - float64| = 3.1 exceeds 2 x ...">Traceback...
E   AssertionError: o: max |kernel - float64| = 3.1 exceeds 2 x ...</failure></testcase>
<testcase classname="tests.test_triton_gpu" name="test_indexer[fp8-keys]" time="0.5">
<error message="failed on setup with &quot;RuntimeError: CUDA error&quot;">RuntimeError</error>
</testcase>
<testcase classname="tests.test_triton_gpu" name="test_tiny_model_generates_on_cuda[tiny-mla]"
 time="0.0"><skipped type="pytest.skip" message="needs a CUDA GPU">skipped</skipped></testcase>
</testsuite></testsuites>
"""

FAKE_BENCH: dict[str, Any] = {
    "device": "cuda", "dtype": "bfloat16", "dims": {"heads": 128, "rank": 512, "rope": 64},
    "copy_gb_s": 2900.0, "kernels_ran": True, "note": "timed on the same device",
    "points": [{"kind": "dense decode", "impl": "triton", "batch": 1, "context": 4096,
                "median_ms": 0.05, "error": None},
               {"kind": "dense decode", "impl": "torch", "batch": 32, "context": 32768,
                "median_ms": None, "error": "out of memory"}],
}


def _cases(tmp_path: Path) -> list[CaseResult]:
    xml = tmp_path / "junit.xml"
    xml.write_text(FAKE_JUNIT)
    return gpu_check.parse_junit(xml)


def test_parse_junit(tmp_path: Path) -> None:
    cases = _cases(tmp_path)
    assert [c.outcome for c in cases] == ["passed", "failed", "error", "skipped"]
    assert cases[0].figures == {"o err": 0.00390625, "o bound": 0.0625} and cases[0].message is None
    assert cases[0].duration_s == 3.25 and cases[0].classname == "tests.test_triton_gpu"
    assert cases[1].message is not None and cases[1].message.startswith("AssertionError: o: max")
    assert "CUDA error" in (cases[2].message or "") and cases[3].message == "needs a CUDA GPU"


def _run(cases: list[CaseResult], code: int = 1) -> PytestRun:
    return PytestRun(command=["python", "-m", "pytest"], exit_code=code, timed_out=False,
                   duration_s=12.5, cases=cases)


def test_report_has_every_figure(tmp_path: Path) -> None:
    from datetime import datetime, timezone

    from latentattn.io import write_json

    opts = CheckOptions(out=tmp_path / "gpu-check.json", tests=Path("tests/test_triton_gpu.py"))
    bench = gpu_check.bench_section({"batches": [1, 32]}, 61.0, FAKE_BENCH,
                                    [(1, 4096, "dense decode: triton vs torch", 3.5)])
    report = gpu_check.build_report(
        started=datetime(2025, 1, 1, tzinfo=timezone.utc), total_s=80.0,
        device={"name": "NVIDIA H100 80GB HBM3", "capability": "sm_90"},
        software={"torch": "2.x", "triton": "3.x"}, tests=_run(_cases(tmp_path)), bench=bench,
        options=opts)
    write_json(opts.out, report)
    back = json.loads(opts.out.read_text())
    assert back["ok"] is False and back["finished"] is True  # a test failed
    assert back["tests"]["counts"] == {"passed": 1, "failed": 1, "error": 1, "skipped": 1}
    assert back["tests"]["cases"][0]["figures"]["o err"] == 0.00390625
    assert back["tests"]["cases"][0]["duration_s"] == 3.25
    assert back["bench"]["points"] == 2 and back["bench"]["points_without_time"] == 1
    assert back["bench"]["report"]["points"][1]["error"] == "out of memory"
    assert back["bench"]["speedups"][0]["ratio"] == 3.5
    assert back["device"]["name"].startswith("NVIDIA") and back["total_s"] == 80.0
    assert back["versions"] == {"torch": "2.x", "triton": "3.x"}
    lines = gpu_check.summary(back, opts.out)
    assert lines[0].startswith("GPU tests: 1 passed, 1 failed, 1 errors, 1 skipped")
    assert any("FAILED: test_sparse[prefill-T32k-past-int32]" in ln for ln in lines)
    assert "FAILED" in lines[-1] and str(opts.out) in lines[-1]
    passed = [c for c in _cases(tmp_path) if c.outcome == "passed"]
    good = gpu_check.build_report(started=datetime.now(timezone.utc), total_s=1.0, device={},
                                  software={}, tests=_run(passed, 0), bench=bench, options=opts)
    assert good["ok"] is True
    crashed = {**bench, "error": "RuntimeError: boom"}
    assert gpu_check.build_report(started=datetime.now(timezone.utc), total_s=1.0, device={},
                                  software={}, tests=_run(passed, 0), bench=crashed,
                                  options=opts)["ok"] is False
    assert not gpu_check.build_report(started=datetime.now(timezone.utc), total_s=1.0, device={},
                                      software={}, tests=_run([], 0), bench=bench,
                                      options=opts)["ok"]  # nothing ran: not a check


def test_the_json_is_written_after_the_tests_and_again_after_the_bench(
        monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    opts = CheckOptions(out=tmp_path / "gpu-check.json", tests=Path("t.py"))
    seen: dict[str, Any] = {}

    def fake_bench(o: CheckOptions, log: Any) -> tuple[dict[str, Any], None]:
        seen["between"] = json.loads(opts.out.read_text())
        return gpu_check.bench_section({}, 2.0, FAKE_BENCH, []), None

    monkeypatch.setattr(gpu_check, "device_info", lambda: {"name": "fake GPU", "capability": "sm_90"})
    monkeypatch.setattr(gpu_check, "versions", lambda: {"torch": "t", "triton": "x"})
    passed = [c for c in _cases(tmp_path) if c.outcome == "passed"]
    monkeypatch.setattr(gpu_check, "run_pytest", lambda f, t, log: _run(passed, 0))
    monkeypatch.setattr(gpu_check, "run_bench", fake_bench)
    report, _ = gpu_check.run_gpu_check(opts, lambda line: None)
    assert seen["between"]["finished"] is False and seen["between"]["ok"] is False
    assert seen["between"]["bench"] == {"pending": "runs after the tests"}
    assert report["ok"] is True and json.loads(opts.out.read_text()) == report
    report, _ = gpu_check.run_gpu_check(CheckOptions(out=opts.out, tests=Path("t.py"), bench=False),
                                        lambda line: None)
    assert report["ok"] is True and report["bench"] == {"skipped": "--skip-bench"}


def test_run_pytest_carries_outcomes_and_figures(tmp_path: Path) -> None:
    """A real pytest subprocess on a fake test file: the figures make it through JUnit XML, the
    environment sets TRITON_INTERPRET=0, and the time limit stops it."""
    tests = tmp_path / "repo" / "tests"
    tests.mkdir(parents=True)
    fake = tests / "test_fake.py"
    fake.write_text(textwrap.dedent("""
        import os, time
        import pytest

        def test_ok(record_property):
            record_property("o err", 0.25)
            assert os.environ["TRITON_INTERPRET"] == "0"

        def test_bad():
            assert 1 == 2, "kernel off"

        @pytest.mark.skip(reason="not here")
        def test_skipped():
            pass

        def test_slow():
            if os.environ.get("FAKE_SLOW"):
                time.sleep(60)
        """))
    run = gpu_check.run_pytest(fake, 120, lambda line: None)
    assert run.exit_code == 1 and not run.timed_out and not run.ok
    by_name = {c.name: c for c in run.cases}
    assert by_name["test_ok"].outcome == "passed" and by_name["test_ok"].figures == {"o err": 0.25}
    assert by_name["test_bad"].outcome == "failed" and "kernel off" in (by_name["test_bad"].message or "")
    assert by_name["test_skipped"].outcome == "skipped"
    assert not any("--junitxml" in c for c in run.command)
    os.environ["FAKE_SLOW"] = "1"
    try:
        slow = gpu_check.run_pytest(fake, 3, lambda line: None)
    finally:
        del os.environ["FAKE_SLOW"]
    assert slow.timed_out and slow.exit_code is None and not slow.ok
