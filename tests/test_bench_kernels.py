"""``bench kernels`` on a CPU: the PyTorch path runs, the report says the kernels need a GPU,
bytes are counted with the latent once (FlashMLA's rule), and --device cuda without CUDA is a
clear error; its dense PyTorch path is the model's own decode, and a point that fails is reported
missing with its reason."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from conftest import cli_error
from latentattn.bench.kernel_report import KINDS
from latentattn.cli import main


@pytest.mark.skipif(torch.cuda.is_available(), reason="the CPU report; a GPU runs the kernels too")
def test_bench_kernels_on_cpu(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "k.json"
    assert main(["bench", "kernels", "--contexts", "100,300", "--batch-sizes", "2", "--heads", "3",
                 "--index-topk", "64", "--repeats", "2", "--json", str(out), "--plot",
                 str(tmp_path / "k.png"), "--quiet"]) == 0
    r = json.loads(out.read_text())
    assert not r["kernels_ran"] and "the Triton kernels need a GPU" in r["note"]
    assert {(p["kind"], p["impl"]) for p in r["points"]} == {(k, "torch") for k in KINDS}
    step = next(p for p in r["points"] if p["kind"] == "dsa decode step" and p["context"] == 300)
    assert step["bytes_moved"] == 2 * 300 * 132 + (2 * 64 * 576 + 2 * 3 * (576 + 512)) * 4  # fp8 keys
    dense = next(p for p in r["points"] if p["kind"] == "dense decode" and p["context"] == 300)
    assert dense["bytes_moved"] == (2 * 300 * 576 + 2 * 3 * (576 + 512)) * 4  # latent once, fp32
    fp8 = next(p for p in r["points"] if p["kind"] == "dense decode fp8" and p["context"] == 300)
    assert fp8["bytes_moved"] == 2 * 300 * 656 + 2 * 3 * (576 + 512) * 4  # FlashMLA's records
    sparse8 = next(p for p in r["points"] if p["kind"] == "sparse decode fp8" and p["context"] == 100)
    assert sparse8["bytes_moved"] == 2 * 64 * 656 + 2 * 3 * (576 + 512) * 4  # k records
    sparse = next(p for p in r["points"] if p["kind"] == "sparse decode" and p["context"] == 100)
    assert sparse["topk"] == 64 and sparse["flops"] == 2 * 2 * 3 * 64 * (576 + 512)
    assert r["copy_gb_s"] > 0 and all(p["median_ms"] > 0 for p in r["points"])
    assert (tmp_path / "k.png").read_bytes()[:4] == b"\x89PNG"
    text = capsys.readouterr().out
    assert "only the PyTorch path ran" in text
    ratio = next(line for line in text.splitlines()
                 if "| 2 | 300 | sparse decode vs dense decode (torch) |" in line)
    dense_ms, sparse_ms = (next(p["median_ms"] for p in r["points"]
                                if p["kind"] == kind and p["context"] == 300)
                           for kind in ("dense decode", "sparse decode"))
    assert ratio.endswith(f"| {dense_ms / sparse_ms:.2f} |")
    assert "CUDA is not available" in cli_error(
        capsys, ["bench", "kernels", "--device", "cuda", "--json", str(tmp_path / "x.json"),
                 "--plot", str(tmp_path / "x.png")])
    assert not (tmp_path / "x.json").exists()


def test_every_kernel_path_of_the_bench_runs_in_the_interpreter() -> None:
    """The GPU branch (contiguous, paged and fp8 dense decode, sparse decode, the speed-up
    table), run here in Triton's interpreter at tiny dims: it runs, counts and labels; its times
    mean nothing and the note says so."""
    pytest.importorskip("triton")
    from latentattn.bench.kernel_report import kernel_table, speedups
    from latentattn.bench.kernels import run_kernel_bench

    report = run_kernel_bench(torch.device("cpu"), torch.float32, [128], [2], 40, repeats=1,
                              dims={"heads": 3, "rank": 32, "rope": 16}, interpreted=True)
    assert report.kernels_ran and "interpreter" in report.note
    got = {(p.kind, p.impl) for p in report.points}
    assert got == {(k, i) for k in KINDS for i in ("torch", "triton")} | {("dense decode", "triton paged")}
    assert {what for _, _, what, _ in speedups(report)} == {
        *(f"{k}: triton vs torch" for k in KINDS),
        *(f"{k} vs dense decode ({i})" for k in ("sparse decode", "dsa decode step")
          for i in ("torch", "triton")),
        *(f"sparse decode fp8 vs dense decode fp8 ({i})" for i in ("torch", "triton"))}
    assert "| dense decode | triton paged | 2 | 128 |" in kernel_table(report)
    for p in report.points:  # every kernel agrees with the PyTorch path on the same input (fp32)
        assert (p.max_abs_diff_vs_torch is None) == (p.impl == "torch")
        assert p.impl == "torch" or p.max_abs_diff_vs_torch < 1e-4


def _spy_attention(monkeypatch: pytest.MonkeyPatch) -> list[tuple[object, ...]]:
    """Record how the absorbed form calls dense attention: shapes, mask and causal flag."""
    import latentattn.attention.mla as mla

    calls: list[tuple[object, ...]] = []
    real = mla.attention

    def spy(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float,
            mask: torch.Tensor | None = None, causal: bool = False) -> torch.Tensor:
        calls.append((q.shape, k.shape, v.shape, scale,
                      None if mask is None else (mask.shape, mask.tolist()), causal))
        return real(q, k, v, scale, mask=mask, causal=causal)

    monkeypatch.setattr(mla, "attention", spy)
    return calls


@pytest.mark.parametrize("fp8", [False, True])
def test_dense_baseline_is_the_models_own_decode(fp8: bool, monkeypatch: pytest.MonkeyPatch) -> None:
    """The bench's PyTorch dense decode, given the model's absorbed query, its cache (rows, or
    FlashMLA's records) and the bench's decode Step, gives what the model's decode step gives
    (CPU: no kernel, so the model runs its absorbed PyTorch form), through the same attention
    call (the same mask, hence SDPA's folded-heads path, not its GQA path). Both are held to a
    float64 reference, the bench within a multiple of the model's own fp32 error."""
    import copy

    from latentattn.attention import MultiHeadLatentAttention
    from latentattn.bench.kernel_paths import decode_step, torch_paths
    from latentattn.cache.fp8 import pack_record, unpack_record
    from latentattn.cache.kv import FP8LatentKV, KVCache, LatentKV
    from latentattn.config import MLAConfig, ModelConfig, RopeConfig
    from latentattn.rope import RotaryEmbedding

    b, s, h, r, dr, dv = 2, 40, 4, 32, 16, 16
    attn = MLAConfig(n_heads=h, kv_lora_rank=r, qk_nope_head_dim=16, qk_rope_head_dim=dr,
                     v_head_dim=dv)
    cfg = ModelConfig(vocab_size=64, dim=48, n_layers=1, intermediate_size=64, attention=attn,
                      rope=RopeConfig(interleaved=True), max_seq_len=64)
    torch.manual_seed(0)
    layer = MultiHeadLatentAttention(cfg).eval()
    rotary = RotaryEmbedding(cfg.rope_dim, cfg.rope, cfg.max_seq_len)
    x = torch.randn(b, s, 48)
    latent, records = LatentKV(b, s, r, dr, torch.float32), FP8LatentKV(b, s, r, dr)
    calls = _spy_attention(monkeypatch)
    with torch.no_grad():
        outs, model_calls = {}, {}
        for cache in (latent, records):  # the model fills each: s - 1 tokens, then decodes one
            plan = KVCache([cache], b, s)
            step = plan.step(s - 1)
            layer(x[:, :-1], rotary(step.positions), step, cache)
            plan.advance(s - 1)
            step = plan.step(1)
            calls.clear()
            outs[cache is records] = layer(x[:, -1:], rotary(step.positions), step, cache)
            model_calls[cache is records] = list(calls)
        model_out = outs[fp8]
        # The bench's inputs as the model holds them: its records are its rows packed as
        # FP8LatentKV.write packs them, and its Step is the model's decode step.
        assert torch.equal(pack_record(latent.kv, r), records.records)
        bench_step = decode_step(b, s, torch.device("cpu"))
        assert bench_step.kv_len == step.kv_len and bench_step.valid is None
        assert torch.equal(bench_step.positions, step.positions)
        assert bench_step.mask is not None and step.mask is not None
        assert torch.equal(bench_step.mask, step.mask)

        q_abs = layer.absorb_query(layer.rotated_query(x[:, -1:], rotary(step.positions))[0])
        idx = torch.zeros(b, 1, 1, dtype=torch.long)  # unused by the dense paths
        paths = torch_paths(q_abs, latent, records, bench_step, idx, layer.scale)
        calls.clear()
        o_lat = paths["dense decode fp8" if fp8 else "dense decode"]()  # (B, H, 1, R)
        # The model's absorbed PyTorch form (no kernel on a CPU) made one attention call; the
        # bench makes the same one: shapes, scale, mask and causal flag.
        assert len(model_calls[fp8]) == 1 and calls == model_calls[fp8]
        bench_out = layer.o_proj(layer.unabsorb(o_lat))

        # float64: the cache's rows as stored (records dequantised exactly: e4m3 times a power
        # of two, bf16 rope), a plain softmax, and the model's projections.
        rows = (unpack_record(records.records, r, torch.float64) if fp8 else latent.kv.double())
        layer64 = copy.deepcopy(layer).double()
        scores = torch.einsum("bhtd,bsd->bhts", q_abs.double(), rows) * layer.scale
        o_lat64 = torch.einsum("bhts,bsc->bhtc", scores.softmax(-1), rows[..., :r])
        want64 = layer64.o_proj(layer64.unabsorb(o_lat64))
    assert calls[0][4] is not None  # with the decode step's mask: SDPA folds the heads
    # The bench is no further from the exact result than 4x the model's own fp32 rounding
    # (flash-attention's tests bound a kernel by 2x the PyTorch path's error against a
    # higher-precision reference, hopper/test_flash_attn.py), plus a floor of sqrt(terms) ulps
    # for the chain of sums behind one output (the dot products, the softmax, both projections)
    # in case the model's path happens to round almost exactly. A wrong mask, scale or value
    # is orders of magnitude above either.
    err_model = float((model_out.double() - want64).abs().max())
    err_bench = float((bench_out.double() - want64).abs().max())
    floor = (r + dr + s + r + h * dv) ** 0.5 * torch.finfo(torch.float32).eps * float(want64.abs().max())
    assert err_bench <= 4 * err_model + floor, (err_bench, err_model, floor)


def test_a_failed_point_is_reported_missing(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A point whose run runs out of memory stays in the report, the JSON, the table and the
    plot's notes as missing with its reason; no speed-up is computed from it."""
    import latentattn.bench.kernel_paths as kernel_paths
    import latentattn.bench.kernels as kernels
    from latentattn.bench.kernel_report import kernel_table, plot_kernel_report, speedups

    def oom(*args: object, **kwargs: object) -> torch.Tensor:
        raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB. GPU 0 has "
                                     "a total capacity of 79.11 GiB of which 1.00 GiB is free.")

    monkeypatch.setattr(kernel_paths, "latent_attention", oom)  # the dense PyTorch paths
    report = kernels.run_kernel_bench(torch.device("cpu"), torch.float32, [64], [2], 16, repeats=1,
                                      dims={"heads": 3, "rank": 32, "rope": 16})
    assert [(p.kind, p.impl) for p in report.points] == [(k, "torch") for k in KINDS]
    for p in report.points:
        dense = p.kind.startswith("dense")
        assert (p.median_ms is None) == dense and (p.gb_s is None) == dense
        assert p.error == ("out of memory (tried to allocate 2.00 GiB)" if dense else None)
    assert json.loads(json.dumps(report.as_dict()))["points"][0]["error"] == report.points[0].error
    assert {what: x for _, _, what, x in speedups(report)} == {
        "sparse decode vs dense decode (torch)": None, "dsa decode step vs dense decode (torch)": None,
        "sparse decode fp8 vs dense decode fp8 (torch)": None}
    text = kernel_table(report)
    assert "2 of 5 points missing" in text
    assert ("| dense decode | torch | 2 | 64 | - | missing: out of memory (tried to allocate "
            "2.00 GiB) | - | - | - | - |") in text
    assert "| 2 | 64 | sparse decode vs dense decode (torch) | - (a side is missing) |" in text
    plot_kernel_report(report, str(tmp_path / "k.png"))  # missing points named, not drawn
    assert (tmp_path / "k.png").read_bytes()[:4] == b"\x89PNG"
