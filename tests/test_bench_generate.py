"""``latentattn bench generate``: a run on two tiny presets (GQA on transformers' Llama, MLA on its
DeepSeek-V3) writes the JSON and plot and prints the table; the bytes a decode step reads, counted
here by hand from the configs, and the roofline and ratios follow from them; bad input is one
line and exit 2. No timing is asserted (a 2-core machine shared with other work)."""

from __future__ import annotations

import contextlib
import io
import json
from pathlib import Path
from typing import Any

import pytest
import torch

from latentattn.bench.generate import _llama_config, weight_bytes_per_token
from latentattn.cli import main
from latentattn.config import GQAConfig, MLAConfig, ModelConfig
from latentattn.model.transformer import Transformer
from latentattn.presets import get_preset

CONTEXTS = (16, 48)
NEW = 3
F32 = 4  # bytes


def _gqa_weights(c: ModelConfig) -> int:
    """A GQA model's weights a decode step reads, by hand: the layers, the final norm, the untied
    lm_head and the embedding's one row."""
    a = c.attention
    assert isinstance(a, GQAConfig) and not c.tie_word_embeddings
    attn = c.dim * a.n_heads * a.head_dim * 2 + c.dim * a.n_kv_heads * a.head_dim * 2
    layer = attn + 3 * c.dim * c.intermediate_size + 2 * c.dim
    return F32 * (c.n_layers * layer + c.dim + c.vocab_size * c.dim + c.dim)


def _gqa_kv(c: ModelConfig) -> int:
    a = c.attention
    assert isinstance(a, GQAConfig)
    return F32 * c.n_layers * 2 * a.n_kv_heads * a.head_dim  # K and V per layer


def _mla_weights(c: ModelConfig) -> int:
    """An MLA model's (q_lora, latent norm, no MoE) weights a decode step reads, by hand."""
    a = c.attention
    assert isinstance(a, MLAConfig) and a.q_lora_rank is not None and c.moe is None
    qk = a.qk_nope_head_dim + a.qk_rope_head_dim
    attn = (c.dim * a.q_lora_rank + a.q_lora_rank + a.q_lora_rank * a.n_heads * qk
            + c.dim * (a.kv_lora_rank + a.qk_rope_head_dim) + a.kv_lora_rank
            + a.kv_lora_rank * a.n_heads * (a.qk_nope_head_dim + a.v_head_dim)
            + a.n_heads * a.v_head_dim * c.dim)
    layer = attn + 3 * c.dim * c.intermediate_size + 2 * c.dim
    return F32 * (c.n_layers * layer + c.dim + c.vocab_size * c.dim + c.dim)


def _mla_kv(c: ModelConfig) -> int:
    a = c.attention
    assert isinstance(a, MLAConfig)
    return F32 * c.n_layers * (a.kv_lora_rank + a.qk_rope_head_dim)  # latent + rope key per layer


@pytest.fixture(scope="module")
def run(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    pytest.importorskip("transformers")
    out = tmp_path_factory.mktemp("bench_generate")
    buf = io.StringIO()  # capsys is function-scoped: this runs once for the module
    with contextlib.redirect_stdout(buf):
        rc = main(["bench", "generate", "--model", "tiny-gqa", "--model", "tiny-mla",
                   "--contexts", ",".join(map(str, CONTEXTS)), "--new-tokens", str(NEW),
                   "--repeats", "1", "--quiet", "--json", str(out / "g.json"),
                   "--plot", str(out / "g.png"), "--profile", str(out / "p.txt")])
    return {"rc": rc, "stdout": buf.getvalue(), "json": json.loads((out / "g.json").read_text()),
            "png": out / "g.png", "profile": (out / "p.txt").read_text()}


def test_the_profile_shows_each_models_decode_operators(run: dict[str, Any]) -> None:
    text = run["profile"]
    for spec in ("tiny-gqa", "tiny-mla"):
        assert f"## {spec}, torch.float32, eager" in text
    assert text.count("decode steps after 48 tokens") == 2
    assert "aten::mm" in text and "Input Shapes" in text  # the GEMVs, grouped by shape


def test_the_run_writes_its_files_and_table(run: dict[str, Any]) -> None:
    assert run["rc"] == 0
    assert run["png"].read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    d = run["json"]
    assert d["machine"]["torch"] == torch.__version__ and d["machine"]["cpu_model"]
    assert d["dtype"] == "float32" and d["compiled"] is False
    assert d["new_tokens"] == NEW and d["contexts"] == list(CONTEXTS)
    assert d["bandwidth"]["tensor_bytes"] >= 1 << 30 and d["bandwidth"]["bytes_per_s"] > 0
    assert [m["spec"] for m in d["models"]] == ["tiny-gqa", "tiny-mla"]
    assert [m["transformers"].split()[0] for m in d["models"]] == [
        "LlamaForCausalLM", "DeepseekV3ForCausalLM"]
    assert [(p["model"], p["context"]) for p in d["points"]] == [
        (m, c) for m in ("tiny-gqa", "tiny-mla") for c in CONTEXTS]
    for p in d["points"]:
        for impl in ("latentattn", "transformers"):
            t = p[impl]
            assert t["impl"] == impl and t["compile_s"] is None
            assert len(t["t1_s"]) == len(t["tn_s"]) == 1 and min(t["t1_s"] + t["tn_s"]) > 0
            assert t["prefill_tok_s"] == pytest.approx(p["context"] / t["prefill_s"])
            assert t["prefill_tok_s"] > 0 and len(t["tokens"]) == NEW
            if t["decode_tok_s"] is not None:  # None only when noise made t_N <= t_1 (noted)
                assert t["decode_tok_s"] > 0
                assert t["decode_s_per_token"] == pytest.approx(
                    (t["tn_s"][0] - t["t1_s"][0]) / (NEW - 1))
            else:
                assert t["note"]
        # the same weights on both sides: greedy from the same prompt agrees (fp32)
        assert p["tokens_agree"] == NEW
    out = run["stdout"]
    assert f"torch {torch.__version__}" in out and d["machine"]["cpu_model"] in out
    assert "read bandwidth" in out and "| tiny-mla | 48 |" in out


@pytest.mark.parametrize(("spec", "weights", "kv"), [("tiny-gqa", _gqa_weights, _gqa_kv),
                                                     ("tiny-mla", _mla_weights, _mla_kv)])
def test_roofline_arithmetic(run: dict[str, Any], spec: str, weights: Any, kv: Any) -> None:
    d = run["json"]
    cfg = get_preset(spec)
    bw = d["bandwidth"]["bytes_per_s"]
    (entry,) = [m for m in d["models"] if m["spec"] == spec]
    assert entry["weight_bytes_per_token"] == weights(cfg)
    for p in (p for p in d["points"] if p["model"] == spec):
        total = weights(cfg) + kv(cfg) * p["context"]
        assert p["kv_bytes_per_token"] == kv(cfg)
        assert p["bytes_per_token"] == pytest.approx(total)
        assert p["roofline_tok_s"] == pytest.approx(bw / total)
        ours, theirs = p["latentattn"], p["transformers"]
        for t in (ours, theirs):
            if t["decode_tok_s"] is not None:
                assert t["roofline_fraction"] == pytest.approx(t["decode_tok_s"] * total / bw)
        if ours["decode_tok_s"] and theirs["decode_tok_s"]:
            assert p["decode_ratio_vs_transformers"] == pytest.approx(
                ours["decode_tok_s"] / theirs["decode_tok_s"])


def test_tied_embeddings_count_once() -> None:
    cfg = get_preset("tiny-gqa").replace(tie_word_embeddings=True)
    model = Transformer(cfg)
    untied = _gqa_weights(get_preset("tiny-gqa"))
    # tied: the lm_head matrix is read once, and no separate embedding row
    assert weight_bytes_per_token(model) == untied - F32 * cfg.dim


def test_llama_refuses_what_it_cannot_hold() -> None:
    cfg = get_preset("tiny-gqa")
    assert isinstance(_llama_config(cfg), dict)
    why = _llama_config(cfg.replace(rope=cfg.rope.__class__(interleaved=True)))
    assert isinstance(why, str) and "interleaved" in why


def _fail(args: list[str], capsys: pytest.CaptureFixture[str]) -> str:
    assert main(["bench", "generate", "--quiet", *args]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("latentattn: error: ")
    return err[0]


def test_bad_input_is_one_line_and_exit_2(capsys: pytest.CaptureFixture[str],
                                           monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    assert "unknown preset 'no-such-model'" in _fail(["--model", "no-such-model"], capsys)
    line = _fail(["--model", "tiny-gqa", "--contexts", "64,500"], capsys)
    assert "500" in line and "max_seq_len 512" in line
    assert "--new-tokens" in _fail(["--model", "tiny-gqa", "--new-tokens", "1"], capsys)
    assert "--json" in _fail(["--model", "tiny-gqa", "--json", str(tmp_path / "no" / "x.json")], capsys)
    monkeypatch.setattr("latentattn.model.compiled.compiler_error",
                        lambda: "torch.compile needs a C++ compiler for CPU kernels and found none")
    line = _fail(["--model", "tiny-gqa", "--contexts", "64", "--compile"], capsys)
    assert line.startswith("latentattn: error: --compile: ") and "C++ compiler" in line
