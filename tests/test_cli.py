"""The ``latentattn`` command line, the KV-bytes formulas and the config-only parameter counts.

Most tests call ``main([...])`` in-process (fast); two run ``python -m latentattn`` to check the
exit status and that no traceback reaches the user.
"""

from __future__ import annotations

import argparse
import dataclasses
import importlib.util
import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import latentattn
from conftest import NEAR_TIE, cli_error, min_greedy_margin
from latentattn import Transformer, get_preset, save_pretrained
from latentattn.calc.kv_bytes import cache_bytes_per_token_per_layer, kv_table
from latentattn.calc.params import count_parameters
from latentattn.cli import build_parser, main
from latentattn.config import GQAConfig, MLAConfig, ModelConfig, MoEConfig
from latentattn.presets import PRESETS

# Frozen command-line surface (torchtitan-style): renaming a subcommand or flag breaks users'
# scripts, so a change here must be deliberate. It lists the flags --help shows; the hidden ones
# (deprecated old spellings, which still parse, and the tests' --tiny) are frozen in
# tests/test_cli_vocabulary.py's DEPRECATED.
MODEL_KNOBS = {"--model", "--mla-impl", "--index-topk", "--indexer-keys"}  # latentattn.load_config
LOAD_KNOBS = MODEL_KNOBS | {"--dsa-prefill", "--dsa-masked-max-keys", "--dtype", "--device"}
SURFACE: dict[tuple[str, ...], set[str]] = {
    ("kv-cache",): MODEL_KNOBS | {"--context", "--batch-size", "--json", "--kv-lora-rank", "--rope-dim"},
    ("info",): MODEL_KNOBS,
    ("generate",): LOAD_KNOBS | {"--prompt", "--max-new-tokens", "--temperature", "--top-p",
                                 "--top-k", "--seed", "--latent-fp8", "--page-size", "--backend",
                                 "--compile"},
    ("convert",): {"--kv-lora-rank", "--rope-dim", "--calib", "--calib-tokens", "--method", "--rope-mode",
                   "--format", "--fit-steps", "--fit-lr", "--sequential", "--calib-seed", "--quiet"},
    ("export",): {"--model", "--dtype"},
    ("eval",): LOAD_KNOBS | {"--data", "--seq-len", "--max-tokens", "--batch-size", "--seed", "--json",
                             "--quiet"},
    ("train",): {"--model", "--attn", "--mla-impl", "--retrofit-dsa", "--device", "--dim",
                 "--layers",
                 "--heads", "--seq-len", "--kv-lora-rank", "--index-topk", "--data", "--steps",
                 "--batch-size", "--lr", "--warmup-steps", "--eval-every", "--dtype",
                 "--seed", "--out",
                 "--resume", "--fsdp", "--dsa-warmup-steps", "--router-bias-rate", "--moe-aux-loss",
                 "--schedule", "--decay-frac", "--teacher", "--distill-weight", "--trainable",
                 "--quiet"},
    ("compare",): {"--data", "--steps", "--seeds", "--quick", "--gpu", "--device", "--dtype", "--out",
                   "--sweep", "--batch-size",
                   "--seq-len", "--dim", "--layers", "--lr", "--lr-grid", "--pilot-fraction", "--pilot-seeds",
                   "--lr-extend", "--contexts", "--margin", "--no-control", "--ablations",
                   "--retrofit-at", "--retrofit-warmup",
                   "--no-retrofit", "--no-v4",
                   "--restart", "--quiet"},
    ("bench", "decode"): {"--json", "--plot", "--contexts", "--batch-sizes", "--repeats", "--dtype",
                          "--no-hf", "--quiet"},
    ("bench", "dsa"): {"--json", "--plot", "--decode-contexts", "--prefill-contexts", "--index-topks",
                       "--repeats", "--dtype", "--quiet"},
    ("bench", "v4"): {"--json", "--plot", "--quiet", "--contexts", "--kinds", "--prefill", "--no-prefill",
                      "--chunk", "--repeats", "--dtype", "--memory-gib", "--quick"},
    ("bench", "convert"): {"--json", "--plot", "--quiet", "--model", "--data", "--calib",
                           "--calib-tokens", "--ranks", "--rope-dim", "--method", "--seq-len",
                           "--max-tokens", "--heal-steps", "--heal-data", "--heal-lr",
                           "--heal-batch-size", "--heal-seq-len", "--heal-trainable",
                           "--heal-dtype", "--rope-mode", "--format", "--fit-steps", "--fit-lr",
                           "--sequential", "--calib-seed"},
    ("bench", "generate"): {"--json", "--plot", "--quiet", "--model", "--contexts", "--new-tokens",
                            "--dtype", "--compile", "--no-transformers", "--max-seq-len", "--profile",
                            "--repeats", "--seed"},
    ("bench", "precision"): {"--json", "--plot", "--quiet", "--model", "--data", "--kv-lora-rank",
                             "--calib-tokens", "--batch-size", "--seq-len", "--warmup", "--steps",
                             "--rounds"},
    ("kernels", "compile"): {"--arch"},
    ("kernels", "check"): {"--device", "--out", "--timeout", "--skip-bench", "--batch-sizes", "--contexts",
                           "--index-topk", "--repeats", "--tests"},
    ("bench", "kernels"): {"--json", "--plot", "--quiet", "--device", "--dtype", "--contexts",
                           "--batch-sizes", "--heads", "--index-topk", "--repeats"},
    ("bench", "fp8-cache"): {"--json", "--plot", "--quiet", "--model", "--data", "--prompt-tokens",
                             "--tokens"},
    ("bench", "indexer"): {"--json", "--plot", "--data", "--pretrain-steps", "--warmup-steps",
                           "--index-topk", "--seq-len", "--batch-size", "--seed", "--quiet"},
}


def _subparsers(parser: argparse.ArgumentParser) -> dict[str, argparse.ArgumentParser]:
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            return dict(action.choices)
    return {}


def _flags(parser: argparse.ArgumentParser) -> set[str]:
    """The long flags ``parser``'s --help shows."""
    return {s for a in parser._actions for s in a.option_strings
            if s.startswith("--") and a.help is not argparse.SUPPRESS} - {"--help"}


def test_surface_is_frozen() -> None:
    top = build_parser()
    subs = _subparsers(top)
    assert set(subs) == {"kv-cache", "info", "generate", "eval", "convert", "export", "train", "compare",
                         "bench", "kernels"}
    assert set(_subparsers(subs["bench"])) == {"decode", "dsa", "v4", "generate", "indexer", "convert",
                                                "fp8-cache", "kernels", "precision"}
    for path, flags in SURFACE.items():
        p = top
        for name in path:
            p = _subparsers(p)[name]
        assert _flags(p) == flags, path


@pytest.mark.parametrize("path", [(), ("bench",), *SURFACE])
def test_help_everywhere(path: tuple[str, ...], capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as e:
        main([*path, "--help"])
    assert e.value.code == 0
    assert "usage: latentattn" in capsys.readouterr().out


# ---------------------------------------------------------------------------- kv-cache
def test_kv_cache_deepseek_v3_table(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["kv-cache", "--model", "deepseek-v3", "--context", "131072"]) == 0
    out = capsys.readouterr().out
    lines = out.splitlines()

    def row(label: str) -> str:
        (line,) = [ln for ln in lines if label in ln]
        return line

    assert "1,152" in row("MLA absorbed (latent)") and row("MLA absorbed (latent)").startswith("*")
    assert "656" in row("FlashMLA fp8")
    assert "81,920" in row("MLA naive")
    assert "65,536" in row("MHA (128 heads")
    assert "8.58 GiB" in row("MLA absorbed (latent)")  # 1,152 B x 61 layers x 131,072 tokens (V3 at 128K)
    assert "4.88 GiB" in row("FlashMLA fp8")
    assert "formula bytes" in out


def test_kv_cache_json(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["kv-cache", "--model", "deepseek-v3", "--json", "--batch-size", "2"]) == 0
    data = json.loads(capsys.readouterr().out)
    rows = {r["key"]: r for r in data["rows"]}
    assert rows["mla-absorbed"]["bytes_per_token_per_layer"] == 1152
    assert rows["mla-absorbed-fp8"]["bytes_per_token_per_layer"] == 576
    assert rows["mla-flashmla-fp8"]["bytes_per_token_per_layer"] == 656
    assert rows["mla-naive"]["bytes_per_token_per_layer"] == 81920
    assert rows["mha"]["bytes_per_token_per_layer"] == 65536
    assert rows["gqa-8"]["bytes_per_token_per_layer"] == 4096
    assert rows["mqa"]["bytes_per_token_per_layer"] == 512
    assert rows["mla-absorbed"]["bytes_per_token"] == 1152 * 61
    assert rows["mla-absorbed"]["bytes_total"] == 1152 * 61 * 131072 * 2
    assert [k for k, r in rows.items() if r["own"]] == ["mla-absorbed"]
    assert "formula bytes" in data["note"]


def test_kv_cache_own_gqa_form() -> None:
    table = kv_table(get_preset("llama-3-8b"))
    assert [r.key for r in table.rows if r.own] == ["gqa-8"]
    assert table.row("gqa-8").bytes_per_token_per_layer == 4096
    assert table.row("mha").ratio_vs_mha == 1.0


@pytest.mark.parametrize("name,impl", [
    ("tiny-mha", None), ("tiny-gqa", None), ("tiny-mqa", None),
    ("tiny-mla", "naive"), ("tiny-mla", "absorb"), ("tiny-mla", "auto"),
])
def test_formula_equals_allocated_cache(name: str, impl: str | None) -> None:
    cfg = get_preset(name)
    if impl is not None:
        cfg = cfg.replace(mla_impl=impl)
    cache = Transformer(cfg).make_cache(batch=3, capacity=17, dtype=torch.bfloat16)
    assert cache.bytes_per_token_per_layer == cache_bytes_per_token_per_layer(cfg, 2)
    # and the table row marked as the model's own form agrees
    (own,) = [r for r in kv_table(cfg).rows if r.own]
    assert own.bytes_per_token_per_layer == cache.bytes_per_token_per_layer


# ---------------------------------------------------------------------------- parameters
def _moe_gqa() -> ModelConfig:
    return dataclasses.replace(get_preset("tiny-gqa"), moe=get_preset("tiny-mla-moe").moe,
                               tie_word_embeddings=True)


def _mla_no_qlora_moe() -> ModelConfig:
    cfg = get_preset("tiny-mla-moe")
    moe = dataclasses.replace(cfg.moe, n_shared_experts=0, first_k_dense_replace=0,
                              scoring_func="softmax", topk_method="greedy")
    assert isinstance(moe, MoEConfig)
    return dataclasses.replace(cfg, attention=dataclasses.replace(cfg.attention, q_lora_rank=None),
                               moe=moe)


@pytest.mark.parametrize("make", [
    lambda: get_preset("tiny-mla"), lambda: get_preset("tiny-mla-moe"), lambda: get_preset("tiny-dsa"),
    lambda: get_preset("tiny-gqa"), lambda: get_preset("tiny-mqa"), _moe_gqa, _mla_no_qlora_moe,
])
def test_count_parameters_matches_model(make: object) -> None:
    cfg = make()  # type: ignore[operator]
    model = Transformer(cfg)
    counted = count_parameters(cfg)
    assert counted["total"] == sum(p.numel() for p in model.parameters())
    if cfg.moe is None:
        assert counted["active"] == counted["total"]
    else:
        m = cfg.moe
        n_moe = sum(cfg.is_moe_layer(i) for i in range(cfg.n_layers))
        per_expert = sum(p.numel() for p in model.layers[cfg.n_layers - 1].mlp.experts[0].parameters())
        idle = n_moe * (m.n_routed_experts - m.num_experts_per_tok) * per_expert
        assert counted["active"] == counted["total"] - idle


def test_deepseek_v3_parameter_count() -> None:
    p = count_parameters(get_preset("deepseek-v3"))
    assert 670e9 < p["total"] < 672e9  # DeepSeek-V3: 671B without the MTP module
    assert 37e9 < p["active"] < 38e9  # "37B activated"


def test_info(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["info", "--model", "deepseek-v3"]) == 0
    out = capsys.readouterr().out
    assert "671.03B" in out and "active/token" in out and "1,152 B per token per layer" in out
    assert main(["info", "--model", "tiny-gqa"]) == 0
    assert "dense" in capsys.readouterr().out


# ---------------------------------------------------------------------------- generate
def _gen(capsys: pytest.CaptureFixture[str], *extra: str) -> str:
    # float32, not the default auto (bf16 on a CPU with native bf16): these compare forms,
    # caches and backends, whose greedy texts agree only away from bf16's near-ties.
    assert main(["generate", "--model", "tiny-mla", "--prompt", "Hello", "--max-new-tokens", "8",
                 "--dtype", "float32", *extra]) == 0
    captured = capsys.readouterr()
    assert "random-init" in captured.err
    return captured.out


def test_generate_deterministic(capsys: pytest.CaptureFixture[str]) -> None:
    a = _gen(capsys, "--seed", "3", "--temperature", "0.8", "--top-k", "50")
    b = _gen(capsys, "--seed", "3", "--temperature", "0.8", "--top-k", "50")
    assert a == b and a.strip()
    greedy_naive = _gen(capsys, "--mla-impl", "naive")
    greedy_absorb = _gen(capsys, "--mla-impl", "absorb")
    # The two forms round differently: the same text is promised only away from near-ties.
    model, tokenizer = latentattn.load("tiny-mla", seed=0, with_tokenizer=True)  # what --seed 0 builds
    assert min_greedy_margin(model, torch.tensor([tokenizer.encode("Hello")]), 8) > NEAR_TIE
    assert greedy_naive == greedy_absorb


def test_generate_over_paged_fp8_caches_and_the_triton_backend(capsys: pytest.CaptureFixture[str]
                                                                ) -> None:
    """The cache and backend flags: paged bf16 reads back exactly, so it generates what the
    contiguous cache does; the Triton backend (here in the interpreter) what the torch one does
    over the same fp8 pages."""
    plain = _gen(capsys, "--mla-impl", "absorb")
    assert _gen(capsys, "--mla-impl", "absorb", "--page-size", "4") == plain
    fp8 = _gen(capsys, "--mla-impl", "absorb", "--latent-fp8", "--page-size", "4")
    assert fp8.strip()
    if importlib.util.find_spec("triton") is not None:
        assert _gen(capsys, "--mla-impl", "absorb", "--latent-fp8", "--page-size", "4",
                    "--backend", "triton") == fp8
    assert "latent of MLA (impl auto or absorb) or DSA" in _error(
        capsys, ["generate", "--model", "tiny-gqa", "--prompt", "hi", "--max-new-tokens", "2",
                 "--latent-fp8"])
    assert "--page-size must be >= 1" in _error(capsys, ["generate", "--model", "tiny-mla", "--prompt",
                                                         "hi", "--max-new-tokens", "2", "--page-size",
                                                         "0"])


def test_generate_from_checkpoint_dir(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    pytest.importorskip("latentattn.interop.hf")
    torch.manual_seed(0)
    save_pretrained(Transformer(get_preset("tiny-mla")), str(tmp_path))
    args = ["generate", "--model", str(tmp_path), "--prompt", "Hi", "--max-new-tokens", "4"]
    assert main(args) == 0
    first = capsys.readouterr()
    assert "random-init" not in first.err
    assert main(args) == 0
    assert capsys.readouterr().out == first.out


# ---------------------------------------------------------------------------- user errors
_error = cli_error


def test_unknown_preset(capsys: pytest.CaptureFixture[str]) -> None:
    assert "unknown preset 'nope'" in _error(capsys, ["info", "--model", "nope"])
    assert "no such file" in _error(capsys, ["kv-cache", "--model", "missing/config.json"])


def test_config_json_missing_field(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    hf = pytest.importorskip("latentattn.interop.hf")
    cfg = hf.config_to_hf(get_preset("tiny-mla"))
    del cfg["kv_lora_rank"]
    path = tmp_path / "config.json"
    path.write_text(json.dumps(cfg))
    assert "kv_lora_rank" in _error(capsys, ["kv-cache", "--model", str(path)])
    assert "kv_lora_rank" in _error(capsys, ["info", "--model", str(tmp_path)])


def test_bad_deepseek_v32_config(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    hf = pytest.importorskip("latentattn.interop.hf")
    cfg = hf.config_to_hf(get_preset("tiny-dsa"))
    assert cfg["model_type"] == "deepseek_v32"
    cfg["index_topk"] = 0
    (tmp_path / "config.json").write_text(json.dumps(cfg))
    msg = _error(capsys, ["info", "--model", str(tmp_path)])
    assert "index_topk" in msg and "config.json" in msg


def test_config_json_and_dir_work(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    hf = pytest.importorskip("latentattn.interop.hf")
    (tmp_path / "config.json").write_text(json.dumps(hf.config_to_hf(get_preset("deepseek-v3"))))
    assert main(["kv-cache", "--model", str(tmp_path / "config.json"), "--json"]) == 0
    rows = {r["key"]: r for r in json.loads(capsys.readouterr().out)["rows"]}
    assert rows["mla-absorbed"]["bytes_per_token_per_layer"] == 1152
    assert main(["info", "--model", str(tmp_path)]) == 0
    assert "671.03B" in capsys.readouterr().out


def test_prompt_longer_than_context(capsys: pytest.CaptureFixture[str]) -> None:
    msg = _error(capsys, ["generate", "--model", "tiny-mla", "--prompt", "a" * 600,
                          "--max-new-tokens", "4"])
    assert "512" in msg


def test_empty_prompt(capsys: pytest.CaptureFixture[str]) -> None:
    assert "empty" in _error(capsys, ["generate", "--model", "tiny-mla", "--prompt", "",
                                      "--max-new-tokens", "4"])


def test_small_vocab_without_tokenizer(monkeypatch: pytest.MonkeyPatch,
                                       capsys: pytest.CaptureFixture[str]) -> None:
    small = dataclasses.replace(get_preset("tiny-gqa"), vocab_size=100, name="tiny-v100")
    monkeypatch.setitem(PRESETS, "tiny-v100", lambda: small)
    msg = _error(capsys, ["generate", "--model", "tiny-v100", "--prompt", "hi",
                          "--max-new-tokens", "2"])
    assert "vocab_size 100" in msg


def test_json_into_missing_dir(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    msg = _error(capsys, ["bench", "decode", "--json", str(tmp_path / "no" / "out.json"),
                          "--plot", str(tmp_path / "out.png"), "--tiny", "--quiet"])
    assert "--json" in msg and "does not exist" in msg


def test_argparse_errors_exit_2() -> None:
    with pytest.raises(SystemExit) as e:
        main(["kv-cache"])
    assert e.value.code == 2
    with pytest.raises(SystemExit) as e:
        main(["bench", "decode", "--json", "a", "--plot", "b", "--contexts", "1,x"])
    assert e.value.code == 2


def test_python_m_end_to_end() -> None:
    # The one subprocess test: exit status and stderr as a shell user sees them.
    bad = subprocess.run([sys.executable, "-m", "latentattn", "generate", "--model", "tiny-mla",
                          "--prompt", "a" * 600, "--max-new-tokens", "1"],
                         capture_output=True, text=True, timeout=60)
    assert bad.returncode == 2
    assert bad.stdout == ""
    assert bad.stderr.strip().splitlines() == [
        "latentattn: error: prompt of 600 tokens plus max_new_tokens=1 exceeds the model's "
        "context of 512 tokens"
    ]


# ---------------------------------------------------------------------------- bench decode
def test_bench_decode_tiny(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out_json, out_png = tmp_path / "bench.json", tmp_path / "bench.png"
    argv = ["bench", "decode", "--contexts", "64,128", "--batch-sizes", "1", "--repeats", "1",
            "--json", str(out_json), "--plot", str(out_png), "--tiny", "--quiet"]
    has_hf = True
    try:
        import transformers.models.deepseek_v3  # noqa: F401
    except ImportError:
        has_hf = False
        argv.append("--no-hf")
    assert main(argv) == 0
    data = json.loads(out_json.read_text())
    variants = {r["variant"] for r in data["results"]}
    expected = {"mha", "gqa-2", "mla-naive", "mla-absorb"} | ({"transformers"} if has_hf else set())
    assert variants == expected
    assert len(data["results"]) == len(expected) * 2
    for r in data["results"]:
        assert r["median_ms"] > 0 and r["repeats"] == len(r["samples_ms"]) >= 1
        assert r["cache_bytes_allocated"] > 0
    if has_hf:
        hf_rows = [r for r in data["results"] if r["variant"] == "transformers"]
        assert all(r["max_rel_diff_vs_ours"] < 1e-3 for r in hf_rows)
        assert "absorb_vs_transformers" in data["speedups"]["b1_ctx128"]
    assert "absorb_vs_naive" in data["speedups"]["b1_ctx64"]
    assert {"platform", "torch", "torch_threads"} <= set(data["machine"])
    assert out_png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # no temp files left


def test_bench_mla_cache_bytes_match_formula() -> None:
    from latentattn.bench.decode import TINY_DIMS, variant_config

    cfg = variant_config(TINY_DIMS, "mla-absorb", 9)
    assert isinstance(cfg.attention, MLAConfig)
    assert cache_bytes_per_token_per_layer(cfg, 4) == (32 + 8) * 4
    gqa = variant_config(TINY_DIMS, "gqa-2", 9)
    assert isinstance(gqa.attention, GQAConfig) and gqa.attention.n_kv_heads == 2


@pytest.mark.parametrize("key_cache", ["model", "fp8"])
def test_dsa_formula_equals_allocated_cache(key_cache: str) -> None:
    cfg = get_preset("tiny-dsa")
    assert isinstance(cfg.attention, MLAConfig) and cfg.attention.indexer is not None
    indexer = dataclasses.replace(cfg.attention.indexer, key_cache=key_cache)
    cfg = cfg.replace(attention=dataclasses.replace(cfg.attention, indexer=indexer))
    cache = Transformer(cfg).to(torch.bfloat16).make_cache(batch=2, capacity=9)
    assert cache.bytes_per_token_per_layer == cache_bytes_per_token_per_layer(cfg, 2)
    (own,) = [r for r in kv_table(cfg).rows if r.own]
    assert own.bytes_per_token_per_layer == cache.bytes_per_token_per_layer


def test_kv_cache_deepseek_v32_indexer_rows() -> None:
    """Indexer keys 256 B bf16, 132 B fp8 (128 e4m3 + an fp32 scale: DeepSeek-V3.2-Exp's
    ``inference/model.py``, Indexer.k_cache / k_scale_cache), on top of MLA's 1,152 / 656."""
    table = kv_table(get_preset("deepseek-v3.2"))
    assert table.row("dsa-index-keys").bytes_per_token_per_layer == 256
    assert table.row("dsa-index-keys-fp8").bytes_per_token_per_layer == 132
    assert table.row("dsa").bytes_per_token_per_layer == 1152 + 256
    assert table.row("dsa-fp8").bytes_per_token_per_layer == 656 + 132
    assert [r.key for r in table.rows if r.own] == ["dsa"]


def test_bench_dsa_tiny(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out, png = tmp_path / "dsa.json", tmp_path / "dsa.png"
    code = main(["bench", "dsa", "--tiny", "--quiet", "--decode-contexts", "64,128",
                 "--prefill-contexts", "32,64", "--index-topks", "8,16", "--repeats", "1",
                 "--json", str(out), "--plot", str(png)])
    assert code == 0
    data = json.loads(out.read_text())
    assert {(r["context"], r["topk"]) for r in data["decode"]} == {(64, 8), (64, 16), (128, 8), (128, 16)}
    # Not `indexer_share < 1`: the indexer and the whole step are timed in separate calls, so on a
    # loaded machine one sample of the part can outlast one of the whole (this failed under load).
    assert all(r["speedup"] > 0 and r["indexer_share"] > 0 for r in data["decode"])
    assert [r["context"] for r in data["prefill"]["rows"]] == [32, 64]
    assert {r["faster"] for r in data["prefill"]["rows"]} <= {"masked", "gather"}
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert "prefill crossover" in capsys.readouterr().out


def test_bench_indexer_tiny_run(tmp_path: Path) -> None:
    data = tmp_path / "text.txt"
    data.write_text("The quick brown fox jumps over the lazy dog. " * 200)
    out, png = tmp_path / "idx.json", tmp_path / "idx.png"
    code = main(["bench", "indexer", "--data", str(data), "--pretrain-steps", "3", "--warmup-steps", "3",
                 "--index-topk", "8", "--seq-len", "32", "--batch-size", "2", "--quiet",
                 "--json", str(out), "--plot", str(png)])
    assert code == 0
    report = json.loads(out.read_text())
    assert [m["step"] for m in report["measurements"]] == ["before warm-up", "after warm-up"]
    assert len(report["warmup_kl"]) == 3 and len(report["pretrain_loss"]) == 3
    for m in report["measurements"]:
        assert len(m["recall"]) == 2 and all(0 < r["indexer"] <= 1 for r in m["recall"])
    assert png.stat().st_size > 0


@pytest.mark.parametrize(("content", "message"), [
    (b"", "is empty"), (b"abc\x00def", "contains NUL bytes"), (b"\xff\xfe\xfa", "not UTF-8"),
])
def test_bench_indexer_rejects_unusable_data(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], content: bytes, message: str
) -> None:
    data = tmp_path / "bad.txt"
    data.write_bytes(content)
    code = main(["bench", "indexer", "--data", str(data), "--json", str(tmp_path / "o.json"),
                 "--plot", str(tmp_path / "o.png"), "--quiet"])
    err = capsys.readouterr().err
    assert code == 2 and message in err and "Traceback" not in err
    assert not (tmp_path / "o.json").exists()
