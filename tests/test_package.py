"""The package a user installs: ``python -m build`` gives an sdist and a wheel, and the wheel installed
into a fresh venv runs the ``latentattn`` console script.

Offline and without reinstalling torch: the build runs without isolation (the dev environment's
setuptools), and the fresh venv reaches the dev environment's dependencies through one ``.pth`` line.
Only site directories process ``.pth`` files, so the dev environment's editable latentattn (itself a
``.pth``) does not leak in: the test checks that ``latentattn`` imports from the fresh venv.
"""

from __future__ import annotations

import os
import shutil
import site
import subprocess
import sys
import sysconfig
import tarfile
import venv
import zipfile
from pathlib import Path

import pytest

import latentattn

ROOT = Path(__file__).resolve().parents[1]
# What the sdist is built from (MANIFEST.in names the rest); copied, so the build's build/ and
# *.egg-info land in tmp_path, not in the checkout.
FILES = ("pyproject.toml", "README.md", "LICENSE", "MANIFEST.in", "CHANGELOG.md", "Makefile",
         "constraints.txt", "mkdocs.yml")
DIRS = ("src", "tests", "docs", "docs_hooks", "examples")


def _env() -> dict[str, str]:
    """The environment without anything that would put the checkout's src on the path."""
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "PYTHONHOME")}
    env["PYTHONNOUSERSITE"] = "1"
    return env


def _run(cmd: list[str]) -> subprocess.CompletedProcess[str]:
    p = subprocess.run(cmd, capture_output=True, text=True, env=_env(), timeout=300)
    assert p.returncode == 0, f"{cmd} exited {p.returncode}\n{p.stdout}\n{p.stderr}"
    return p


@pytest.fixture(scope="module")
def dist(tmp_path_factory: pytest.TempPathFactory) -> Path:
    tmp = tmp_path_factory.mktemp("pkg")
    src = tmp / "src-tree"
    src.mkdir()
    for name in FILES:
        if (ROOT / name).is_file():
            shutil.copy2(ROOT / name, src / name)
    ignore = shutil.ignore_patterns("__pycache__", "*.pyc", "*.egg-info")
    for name in DIRS:
        if (ROOT / name).is_dir():
            shutil.copytree(ROOT / name, src / name, ignore=ignore)
    out = tmp / "dist"
    # The sdist first, then the wheel built from the unpacked sdist (build's default): a file
    # missing from the sdist fails the wheel.
    _run([sys.executable, "-m", "build", "--no-isolation", "--outdir", str(out), str(src)])
    return out


def test_sdist_and_wheel_contents(dist: Path) -> None:
    v = latentattn.__version__
    sdists = list(dist.glob("*.tar.gz"))
    wheels = list(dist.glob("*.whl"))
    assert [p.name for p in sdists] == [f"latentattn-{v}.tar.gz"]
    assert [p.name for p in wheels] == [f"latentattn-{v}-py3-none-any.whl"]

    with tarfile.open(sdists[0]) as tar:
        names = {n.split("/", 1)[1] for n in tar.getnames() if "/" in n}
    for name in ("LICENSE", "CHANGELOG.md", "README.md", "pyproject.toml", "PKG-INFO",
                 "src/latentattn/__init__.py", "src/latentattn/py.typed", "tests/test_package.py"):
        assert name in names, name

    with zipfile.ZipFile(wheels[0]) as whl:
        names = set(whl.namelist())
        meta = whl.read(f"latentattn-{v}.dist-info/METADATA").decode()
        entry_points = whl.read(f"latentattn-{v}.dist-info/entry_points.txt").decode()
    # The package and its metadata, nothing else at the top level (no tests, no stray modules).
    assert {n.split("/")[0] for n in names} == {"latentattn", f"latentattn-{v}.dist-info"}
    assert "latentattn/py.typed" in names and "latentattn/cli/__init__.py" in names
    assert f"latentattn-{v}.dist-info/licenses/LICENSE" in names
    assert not any("__pycache__" in n or n.endswith(".pyc") for n in names)
    headers = dict(line.split(": ", 1) for line in meta.split("\n\n", 1)[0].splitlines()
                   if ": " in line and not line.startswith(("Requires-Dist", "Provides-Extra")))
    assert headers["Name"] == "latentattn" and headers["Version"] == v
    assert headers["License-Expression"] == "Apache-2.0" and headers["License-File"] == "LICENSE"
    assert "latentattn = latentattn.cli:main" in entry_points


def test_wheel_installs_and_runs_in_a_fresh_venv(dist: Path, tmp_path: Path) -> None:
    v = latentattn.__version__
    (wheel,) = dist.glob("*.whl")
    env_dir = tmp_path / "venv"
    venv.EnvBuilder(with_pip=False).create(env_dir)
    py = env_dir / "bin" / "python"
    purelib = Path(_run([str(py), "-c", "import sysconfig; print(sysconfig.get_path('purelib'))"])
                   .stdout.strip())
    # The dev environment's packages (torch, numpy, ... and pip) after the fresh venv's own.
    dev_paths = dict.fromkeys([*site.getsitepackages(), sysconfig.get_path("purelib")])
    (purelib / "_dev_environment.pth").write_text("".join(f"{p}\n" for p in dev_paths))

    # pip run by the fresh venv's interpreter installs into the fresh venv, the script's #! its python;
    # --ignore-installed: it leaves the dev environment's latentattn (on its path) alone.
    _run([str(py), "-m", "pip", "install", "--no-deps", "--no-index", "--no-compile",
          "--ignore-installed", str(wheel)])
    script = env_dir / "bin" / "latentattn"
    assert script.is_file() and script.read_text().startswith(f"#!{py}")

    # Where `import latentattn` finds it (without importing torch) and the version installed.
    where = _run([str(py), "-c", "import importlib.util as u, importlib.metadata as m; "
                  "print(u.find_spec('latentattn').origin); print(m.version('latentattn'))"]).stdout.split()
    assert Path(where[0]).is_relative_to(purelib), where  # the wheel's copy, not the checkout's
    assert where[1] == v

    help_out = _run([str(script), "--help"]).stdout
    assert "usage: latentattn" in help_out and "kv-cache" in help_out
    assert _run([str(script), "--version"]).stdout.strip() == f"latentattn {v}"
    out = _run([str(script), "kv-cache", "--model", "deepseek-v3", "--context", "4096"]).stdout
    assert "KV cache of deepseek-v3" in out
    # DeepSeek-V3's latent (512 + 64) bf16 values a token and layer, 61 layers, 4,096 tokens.
    assert "1,152" in out and "274.50 MiB" in out
