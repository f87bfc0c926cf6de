"""Every script in examples/ runs, at tiny sizes, as a user would run it (a subprocess)."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def run_example(name: str, *args: str) -> str:
    # One thread: tiny models gain nothing from more, and lose much on a busy machine.
    path = os.pathsep.join(filter(None, [str(ROOT / "src"), os.environ.get("PYTHONPATH")]))
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": path}
    proc = subprocess.run([sys.executable, str(ROOT / "examples" / name), *args], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    return proc.stdout


def test_train_and_compare(tmp_path: Path) -> None:
    out = tmp_path / "cmp.json"
    text = run_example("train_and_compare.py", "--tiny", "--steps", "10", "--out", str(out))
    for variant in ("mha", "gqa", "mla"):
        assert re.search(rf"^{variant}\s+[\d,]+\s+[\d,]+\s+\d+\.\d+ ± \d+\.\d+$", text, re.M), text
    assert re.search(r"95% t interval \[[+-]\d+\.\d+, [+-]\d+\.\d+\] over 2 seeds", text), text
    report = json.loads(out.read_text())
    assert report["steps"] == 10 and report["seeds"] == [0, 1]
    kv = {v: report["variants"][v]["kv_bytes_per_token"] for v in ("mha", "gqa", "mla")}
    assert 0 < kv["mla"] < kv["gqa"] < kv["mha"]
    diff = report["mla_minus_mha"]
    assert diff["n"] == 2 and len(diff["ci95"]) == 2 and diff["ci95"][0] <= diff["mean"] <= diff["ci95"][1]


def test_long_context_dsa(tmp_path: Path) -> None:
    out = tmp_path / "dsa.json"
    text = run_example("long_context_dsa.py", "--context", "512", "--new-tokens", "4", "--chunk", "200",
                       "--device", "cpu", "--out", str(out))
    assert re.search(r"^prefill\s+512 tokens in .* tokens/s", text, re.M), text
    assert re.search(r"^decode\s+\d+\.\d+ ms/token", text, re.M), text
    assert "top-8 of 512 keys: 1.562%" in text
    report = json.loads(out.read_text())
    dsa, latent, per_head = report["cache_bytes"].values()
    assert 0 < latent < dsa < per_head  # the latent plus indexer keys, far below per-head K/V
    assert report["read_fraction"] == 8 / 512 and len(report["decode_step_ms"]) == 4


def test_long_context_dsa_fp8_keys(tmp_path: Path) -> None:
    out = tmp_path / "dsa.json"
    text = run_example("long_context_dsa.py", "--context", "256", "--new-tokens", "2", "--index-topk", "32",
                       "--fp8-keys", "--device", "cpu", "--out", str(out))
    assert "DSA (fp8 indexer keys)" in text and "top-32 of 256 keys: 12.500%" in text
    dsa, latent, _ = json.loads(out.read_text())["cache_bytes"].values()
    # tiny-dsa per token and layer: a 160-byte fp32 latent; its 16-dim indexer key in fp8 is 16 B
    # plus a 4-byte scale (64 B in fp32)
    assert dsa - latent == 20 * 2 * (256 + 2)


def test_convert_and_export(tmp_path: Path) -> None:
    out = tmp_path / "exported"
    text = run_example("convert_and_export.py", "--model", "tiny-gqa", "--out", str(out),
                       "--heal-steps", "4", "--seq-len", "64")
    assert "0.50x the source's cache" in text
    assert re.search(r"^perplexity after 4 heal steps: \d+\.\d+$", text, re.M), text
    assert (out / "config.json").is_file() and (out / "model.safetensors").is_file()
    # transformers reads the bf16 export with our logits (both read the same bf16 weights in fp32)
    diff = float(re.search(r"max \|logit difference\| (\S+)$", text, re.M).group(1))  # type: ignore[union-attr]
    assert diff < 1e-4, text
