"""``latentattn kernels check`` (``make gpu-check``): the one command to run on a CUDA GPU.

It runs, in order:

1. the GPU tests, ``tests/test_triton_gpu.py``, in a pytest subprocess with ``TRITON_INTERPRET=0``
   (the kernels compiled, at the launches latentattn makes: 128 heads over the 512 + 64 latent
   row, bf16 / fp16 / fp8-record decode contiguous and paged at batches 1 to 32 and contexts to
   32k, sparse attention forward and backward and split decode, prefills whose offsets pass 2^31
   elements, the indexer over bf16 and fp8 keys, tiny MLA and DSA models generating on CUDA).
   A subprocess, because Triton reads TRITON_INTERPRET once, when it is imported, and because a
   crashed kernel (an illegal address poisons the CUDA context) must not take the report down;
2. a short ``bench kernels`` sweep (:func:`latentattn.bench.kernels.run_kernel_bench`, bf16 at
   DeepSeek-V3 dims), in this process once the tests' process has exited and freed the GPU;

and writes ONE JSON (atomically, :func:`latentattn.io.write_json`; once after the tests, so a
bench that dies still leaves their results, and again at the end): each test's outcome, time,
failure message and figures (each kernel's error against float64, the PyTorch path's and the
bound, which the tests record with ``record_property`` and pytest's JUnit XML carries), the
bench's points and speed-ups, the device, the versions and the total time.
"""

from __future__ import annotations

import importlib.metadata
import os
import platform
import subprocess
import sys
import tempfile
import time
import traceback
import xml.etree.ElementTree as ET
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from latentattn.errors import LatentAttnError
from latentattn.io import write_json

if TYPE_CHECKING:  # the bench's modules load only when it runs (a check without CUDA needs none)
    from latentattn.bench.kernels import KernelReport

NO_CUDA = ("latentattn kernels check: no CUDA device here; nothing to check (the GPU checks need "
           "an NVIDIA GPU)")
TESTS = Path("tests") / "test_triton_gpu.py"
OUTCOMES = ("passed", "failed", "error", "skipped")
MESSAGE_CHARS = 4000  # of a failure's traceback kept in the JSON: its end, where the assert is

Log = Callable[[str], None]


@dataclass
class CheckOptions:
    out: Path
    tests: Path
    timeout_s: float = 360.0  # the tests' limit: with the bench, sized for 8 minutes on an H100
    bench: bool = True
    batches: Sequence[int] = (1, 32)
    contexts: Sequence[int] = (4096, 32768)
    topk: int = 2048
    repeats: int = 10


@dataclass
class CaseResult:
    """One test as pytest's JUnit XML reports it."""

    name: str  # "test_dense_decode[bf16-paged-B32-8k]"
    classname: str  # "tests.test_triton_gpu"
    outcome: str  # one of OUTCOMES
    duration_s: float
    message: str | None = None  # why it failed, errored or was skipped
    figures: dict[str, float | str] = field(default_factory=dict)  # its record_property values


@dataclass
class PytestRun:
    command: list[str]
    exit_code: int | None  # None: killed at the time limit
    timed_out: bool
    duration_s: float
    cases: list[CaseResult]

    def counts(self) -> dict[str, int]:
        return {o: sum(c.outcome == o for c in self.cases) for o in OUTCOMES}

    @property
    def ok(self) -> bool:
        """Every test ran and none failed (pytest exits 0 when all were skipped, too: that is
        not a check)."""
        n = self.counts()
        return (not self.timed_out and self.exit_code == 0 and n["passed"] > 0
                and n["failed"] == n["error"] == 0)

    def as_dict(self) -> dict[str, Any]:
        return {"command": self.command, "exit_code": self.exit_code, "timed_out": self.timed_out,
                "duration_s": round(self.duration_s, 3), "ok": self.ok, "counts": self.counts(),
                "cases": [asdict(c) for c in self.cases]}


# ---------------------------------------------------------------------------- the tests
def find_tests(path: str | Path | None = None) -> Path:
    """The GPU test file: ``path``, else tests/test_triton_gpu.py of the source checkout this
    package runs from (src/latentattn/bench/ -> the repository root), else of the current
    directory. They live in the repository, not in the installed package."""
    if path is not None:
        candidates = [Path(path)]
    else:
        candidates = [Path(__file__).resolve().parents[3] / TESTS, Path.cwd() / TESTS]
    for p in candidates:
        if p.is_file():
            return p.resolve()
    raise LatentAttnError(f"kernels check: no GPU test file at {candidates[0]}; run it from a clone "
                          f"of the repository (make gpu-check) or pass --tests PATH")


def _number(text: str) -> float | str:
    try:
        return float(text)
    except ValueError:
        return text


def parse_junit(path: str | Path) -> list[CaseResult]:
    """The test cases of a pytest ``--junitxml`` file: outcome, time, the end of any failure's
    traceback, and the ``record_property`` values (numbers where they parse)."""
    cases = []
    for tc in ET.parse(path).getroot().iter("testcase"):
        failure, error, skipped = tc.find("failure"), tc.find("error"), tc.find("skipped")
        # A test that failed and then errored in teardown has both: the failure says more.
        why = next((e for e in (failure, error, skipped) if e is not None), None)
        outcome = ("failed" if failure is not None else "error" if error is not None
                   else "skipped" if skipped is not None else "passed")
        message = None
        if why is not None:
            head = why.get("message") or ""
            body = (why.text or "").strip()
            # A skip's text is only where it was skipped; a failure's is its traceback.
            keep = body and body != head and why is not skipped
            message = f"{head}\n{body[-MESSAGE_CHARS:]}".strip() if keep else head
        figures = {p.get("name", ""): _number(p.get("value", ""))
                   for p in tc.iter("property")}
        cases.append(CaseResult(name=tc.get("name", ""), classname=tc.get("classname", ""),
                                outcome=outcome, duration_s=float(tc.get("time") or 0.0),
                                message=message, figures=figures))
    return cases


def run_pytest(test_file: Path, timeout_s: float, log: Log) -> PytestRun:
    """pytest on ``test_file`` in a subprocess with the kernels compiled (TRITON_INTERPRET=0), from
    the file's repository root (its conftest and pytest settings), its output shown as it runs;
    killed after ``timeout_s``. JUnit XML family xunit1: the one that carries record_property."""
    root = test_file.parent.parent
    env = {**os.environ, "TRITON_INTERPRET": "0", "PYTHONUNBUFFERED": "1"}
    with tempfile.TemporaryDirectory(prefix="latentattn-gpu-check-") as tmp:
        junit = Path(tmp) / "junit.xml"
        cmd = [sys.executable, "-m", "pytest", str(test_file), "-p", "no:cacheprovider", "-rfEs",
               f"--junitxml={junit}", "-o", "junit_family=xunit1"]
        log(f"kernels check: {' '.join(cmd[2:4])} (TRITON_INTERPRET=0, at most {timeout_s:g} s)")
        t0 = time.perf_counter()
        try:
            code: int | None = subprocess.run(cmd, cwd=root, env=env, timeout=timeout_s).returncode
            timed_out = False
        except subprocess.TimeoutExpired:
            code, timed_out = None, True
            log(f"kernels check: the GPU tests passed their {timeout_s:g} s limit and were stopped")
        took = time.perf_counter() - t0
        cases = parse_junit(junit) if junit.is_file() else []
    shown = [c for c in cmd if not c.startswith("--junitxml=")]  # a temp file, gone by now
    return PytestRun(command=shown, exit_code=code, timed_out=timed_out, duration_s=took, cases=cases)


# ---------------------------------------------------------------------------- the bench
def run_bench(opts: CheckOptions, log: Log) -> tuple[dict[str, Any], KernelReport | None]:
    """The ``bench kernels`` sweep on cuda in bf16 at DeepSeek-V3 dims: (its JSON part, the
    KernelReport or None). A crash is recorded with its traceback, not raised: the tests'
    results are already in hand and the report must still be written."""
    from latentattn.bench.kernel_report import speedups
    from latentattn.bench.kernels import V3_DIMS, run_kernel_bench

    log(f"kernels check: bench kernels, batches {','.join(map(str, opts.batches))}, contexts "
        f"{','.join(map(str, opts.contexts))}, top-k {opts.topk}")
    t0 = time.perf_counter()
    settings = {"batches": list(opts.batches), "contexts": list(opts.contexts), "topk": opts.topk,
                "repeats": opts.repeats, "dtype": "bfloat16"}
    try:
        report = run_kernel_bench(torch.device("cuda"), torch.bfloat16, opts.contexts, opts.batches,
                                  opts.topk, opts.repeats, dict(V3_DIMS),
                                  lambda what: log(f"kernels check: bench {what}"))
    except Exception as e:  # any failure is a finding to report, not a reason to lose the tests'
        return ({"settings": settings, "duration_s": round(time.perf_counter() - t0, 3),
                 "error": f"{type(e).__name__}: {e}", "traceback": traceback.format_exc(),
                 "report": None}, None)
    return (bench_section(settings, time.perf_counter() - t0, report.as_dict(), speedups(report)),
            report)


def bench_section(settings: dict[str, Any], duration_s: float, report: dict[str, Any],
                  ratios: Sequence[tuple[int, int, str, float | None]]) -> dict[str, Any]:
    """The JSON's bench part: the sweep's settings, its report (every point, a failed one with
    its reason), how many points have no time, and the speed-ups of one run."""
    missing = [p for p in report.get("points", []) if p.get("median_ms") is None]
    return {"settings": settings, "duration_s": round(duration_s, 3), "error": None,
            "points": len(report.get("points", [])), "points_without_time": len(missing),
            "speedups": [{"batch": b, "context": s, "what": what, "ratio": r}
                         for b, s, what, r in ratios],
            "report": report}


# ---------------------------------------------------------------------------- the report
def device_info() -> dict[str, Any]:
    props = torch.cuda.get_device_properties(0)
    return {"name": props.name, "capability": f"sm_{props.major}{props.minor}",
            "memory_gib": round(props.total_memory / 2**30, 2),
            "multiprocessors": props.multi_processor_count, "count": torch.cuda.device_count(),
            "cuda_visible_devices": os.environ.get("CUDA_VISIBLE_DEVICES")}


def versions() -> dict[str, str | None]:
    def version(name: str) -> str | None:
        try:
            return importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            return None

    return {"latentattn": version("latentattn"), "python": platform.python_version(),
            "torch": torch.__version__, "torch_cuda": torch.version.cuda,
            "triton": version("triton"), "driver": _driver()}


def _driver() -> str | None:
    try:
        out = subprocess.run(["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"],
                             capture_output=True, text=True, timeout=30)
    except (OSError, subprocess.TimeoutExpired):
        return None
    return out.stdout.strip().splitlines()[0] if out.returncode == 0 and out.stdout.strip() else None


def build_report(*, started: datetime, total_s: float, device: dict[str, Any],
                 software: dict[str, Any], tests: PytestRun, bench: dict[str, Any] | None,
                 options: CheckOptions, finished: bool = True) -> dict[str, Any]:
    """The JSON. ``ok``: every test passed and the bench (unless skipped) ran; a bench point
    without a time (out of memory, most often the PyTorch path) is a figure, not a failure.
    ``finished`` False: the copy written after the tests, the bench still to run."""
    bench_ok = bench is None or bench.get("error") is None
    return {
        "check": "latentattn kernels check",
        "finished": finished,
        "ok": finished and tests.ok and bench_ok,
        "started_at": started.isoformat(timespec="seconds"),
        "total_s": round(total_s, 3),
        "device": device,
        "versions": software,
        "options": {"tests": str(options.tests), "timeout_s": options.timeout_s,
                    "bench": options.bench},
        "tests": tests.as_dict(),
        "bench": bench if bench is not None else (
            {"skipped": "--skip-bench"} if not options.bench else {"pending": "runs after the tests"}),
    }


def run_gpu_check(opts: CheckOptions, log: Log) -> tuple[dict[str, Any], KernelReport | None]:
    """Run the tests, then the bench, writing the JSON after each (module docstring); returns
    the final report and the bench's KernelReport (None when skipped or crashed). Needs CUDA
    (the caller says so in one line where there is none)."""
    started, t0 = datetime.now(timezone.utc), time.perf_counter()
    device, software = device_info(), versions()
    log(f"kernels check: {device['name']} ({device['capability']}), torch {software['torch']}, "
        f"triton {software['triton']}")
    tests = run_pytest(opts.tests, opts.timeout_s, log)
    report = build_report(started=started, total_s=time.perf_counter() - t0, device=device,
                          software=software, tests=tests, bench=None, options=opts,
                          finished=not opts.bench)
    write_json(opts.out, report)
    if not opts.bench:
        return report, None
    bench, kernel_report = run_bench(opts, log)
    report = build_report(started=started, total_s=time.perf_counter() - t0, device=device,
                          software=software, tests=tests, bench=bench, options=opts)
    write_json(opts.out, report)
    return report, kernel_report


def summary(report: dict[str, Any], out: Path) -> list[str]:
    """What the command prints at the end: the tests' counts and failures, the bench's points,
    where the JSON is and whether the check passed."""
    t = report["tests"]
    n = t["counts"]
    lines = [f"GPU tests: {n['passed']} passed, {n['failed']} failed, {n['error']} errors, "
             f"{n['skipped']} skipped in {t['duration_s']:.0f} s"
             + (" (stopped at the time limit)" if t["timed_out"] else "")]
    lines += [f"  {c['outcome'].upper()}: {c['name']}: {(c['message'] or '').splitlines()[0][:160]}"
              for c in t["cases"] if c["outcome"] in ("failed", "error")]
    b = report["bench"]
    if "skipped" in b:
        lines.append("bench kernels: skipped (--skip-bench)")
    elif b.get("error"):
        lines.append(f"bench kernels: FAILED: {b['error'][:200]}")
    elif "points" in b:
        lines.append(f"bench kernels: {b['points']} points, {b['points_without_time']} without a "
                     f"time, in {b['duration_s']:.0f} s")
    verdict = "OK" if report["ok"] else "FAILED"
    lines.append(f"kernels check {verdict} on {report['device']['name']} in "
                 f"{report['total_s']:.0f} s; wrote {out}")
    return lines


__all__ = ["NO_CUDA", "CaseResult", "CheckOptions", "PytestRun", "bench_section", "build_report",
           "device_info", "find_tests", "parse_junit", "run_bench", "run_gpu_check", "run_pytest",
           "summary", "versions"]
