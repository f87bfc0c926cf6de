"""``latentattn.convert``: GQA / MHA / MQA to MLA. At full rank with every rotary dim kept the
converted model is the source (logits within 1e-4 in fp32) in both MLA forms, absorbed decode
over the latent cache included, for Llama-style and Qwen2-style (biased) layers and each RoPE
scaling; below full rank the error grows as the rank falls; bad sizes give one clear line."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from conftest import cli_error
from latentattn import Transformer, load
from latentattn.cli import main
from latentattn.config import GQAConfig, ModelConfig, RopeConfig, RopeScaling, YarnConfig
from latentattn.convert import (
    Plan,
    attention_inputs,
    choose_pairs,
    convert,
    full_rank,
    full_rope_dim,
    pair_scores,
)

ROPES = {
    "default": RopeConfig(theta=10000.0),
    "llama3": RopeConfig(theta=5000.0, scaling=RopeScaling("llama3", 8.0, 1.0, 4.0, 16)),
    "yarn": RopeConfig(theta=10000.0, yarn=YarnConfig(factor=2.0, original_max_position_embeddings=16)),
}


def _source(heads: int, kv_heads: int, bias: bool, rope: str, seed: int = 0) -> Transformer:
    cfg = ModelConfig(vocab_size=97, dim=40, n_layers=2, intermediate_size=56, max_seq_len=64,
                      attention=GQAConfig(heads, kv_heads, 12, qkv_bias=bias, o_bias=bias),
                      rope=ROPES[rope], tie_word_embeddings=bias, name="src")
    torch.manual_seed(seed)
    model = Transformer(cfg).eval()
    with torch.no_grad():
        for p in model.parameters():  # wider than the init, and non-zero biases
            p.add_(torch.randn_like(p) * (0.15 if p.dim() >= 2 else 0.3))
    return model


CASES = {"mha-llama3": (3, 3, False, "llama3"), "gqa-qwen2-yarn": (6, 2, True, "yarn"),
         "mqa-default": (3, 1, False, "default"), "gqa-bias-default": (4, 2, True, "default")}


@pytest.mark.parametrize("case", sorted(CASES))
def test_full_rank_full_rope_is_exact(case: str) -> None:
    src = _source(*CASES[case])
    a = src.config.attention
    assert isinstance(a, GQAConfig)
    rope_dim = full_rope_dim(src.config)
    plan = Plan(choose_pairs(a.head_dim // 2, a.head_dim // 2, None), full_rank(src.config, rope_dim))
    mla = convert(src, plan)
    m = mla.config.attention
    assert m.qk_rope_head_dim == a.n_kv_heads * a.head_dim and m.qk_nope_head_dim == 0  # type: ignore[union-attr]
    x = torch.randint(0, 97, (2, 37), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        want = src(x)
        for impl in ("naive", "absorb"):
            got = load(mla.config.replace(mla_impl=impl))
            got.load_state_dict(mla.state_dict())
            assert (got(x) - want).abs().max().item() < 1e-4, impl
    # Decode through the latent-only cache (absorbed form) gives the source's tokens.
    prompt = x[:, :20]
    torch.testing.assert_close(mla.generate(prompt, 10), src.generate(prompt, 10), rtol=0, atol=0)
    cache = mla.make_cache(1, 64)
    assert cache.bytes_per_token == 2 * (m.kv_lora_rank + m.qk_rope_head_dim) * 4  # type: ignore[union-attr]


@pytest.mark.parametrize("method", ["svd", "pca"])
def test_partial_rope_exact_at_full_rank_minus_rope_and_error_grows_as_rank_falls(method: str) -> None:
    src = _source(4, 2, True, "default")
    ids = torch.randint(0, 97, (4 * 32,), generator=torch.Generator().manual_seed(2))
    inputs = attention_inputs(src, ids, 32)
    scores = pair_scores(src, inputs)
    pairs = choose_pairs(3, 6, scores)  # 3 of 6 pairs per head: rope dim 2 x 2 x 3 = 12
    assert len(pairs) == 3 and list(pairs) == sorted(pairs)
    x = ids[:64].view(2, 32)
    with torch.no_grad():
        want = torch.log_softmax(src(x), -1)
        errors = []
        for rank in (full_rank(src.config, 12), 24, 12, 4):
            mla = convert(src, Plan(pairs, rank, method), inputs)  # type: ignore[arg-type]
            got = torch.log_softmax(mla(x), -1)
            errors.append(float((want.exp() * (want - got)).sum(-1).mean()))  # KL(source || mla)
    assert errors == sorted(errors) and errors[-1] > errors[0]


def test_rope_keeps_the_source_frequencies_block_by_block() -> None:
    """A shared rope key of G x d dims is G copies of the source head's RoPE, not one RoPE over
    G x d dims (whose frequencies would differ)."""
    from latentattn.rope import inv_frequencies

    src = _source(6, 2, False, "llama3")
    a = src.config.attention
    mla = convert(src, Plan(tuple(range(6)), full_rank(src.config, 24)))
    r = mla.config.rope
    assert (r.blocks, r.source_dim, r.pairs) == (2, 12, tuple(range(6)))
    assert r.scaling == src.config.rope.scaling
    torch.testing.assert_close(inv_frequencies(mla.config.rope_dim, r), inv_frequencies(12, src.config.rope))
    assert isinstance(a, GQAConfig)


def _saved_source(tmp_path: Path) -> Path:
    """A GQA Llama checkpoint on disk (transformers' save_pretrained), as users convert them."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    hf = LlamaForCausalLM(LlamaConfig(vocab_size=256, hidden_size=48, intermediate_size=64,
                                      num_hidden_layers=2, num_attention_heads=6, num_key_value_heads=2,
                                      head_dim=8, max_position_embeddings=512))
    path = tmp_path / "src"
    hf.save_pretrained(path)
    return path


def test_convert_cli_writes_a_loadable_mla(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    src = _saved_source(tmp_path)
    calib = tmp_path / "calib.txt"
    calib.write_text("Latent attention caches one small vector per token. " * 60)
    out = tmp_path / "mla"
    assert main(["convert", str(src), str(out), "--kv-lora-rank", "full", "--rope-dim", "full"]) == 0
    printed = capsys.readouterr().out
    assert "KV cache (bf16, 2 layers): 128 -> 128 bytes/token" in printed  # full rank saves nothing
    x = torch.randint(0, 256, (1, 30), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        assert (load(out)(x) - load(src)(x)).abs().max().item() < 1e-4
    small = tmp_path / "small"
    assert main(["convert", str(src), str(small), "--kv-lora-rank", "8", "--rope-dim", "4",
                 "--calib", str(calib), "--calib-tokens", "1024", "--method", "pca"]) == 0
    m = load(small).config.attention
    assert (m.kv_lora_rank, m.qk_rope_head_dim, m.qk_nope_head_dim) == (8, 4, 6)  # type: ignore[union-attr]
    assert "-> 48 bytes/token" in capsys.readouterr().out  # (8 + 4) values x 2 B x 2 layers
    for argv, message in [
        (["--kv-lora-rank", "full", "--rope-dim", "3"], "--rope-dim must be even"),
        (["--kv-lora-rank", "full", "--rope-dim", "18"], "between 4 and 2 x 8 = 16"),
        (["--kv-lora-rank", "0", "--rope-dim", "4"], "--kv-lora-rank must lie in 1..28"),
        (["--kv-lora-rank", "29", "--rope-dim", "4"], "--kv-lora-rank must lie in 1..28"),
        (["--kv-lora-rank", "x", "--rope-dim", "4"], "an integer or 'full'"),
        (["--kv-lora-rank", "8", "--rope-dim", "4", "--calib", "none"], "give --calib FILE"),
        (["--kv-lora-rank", "8", "--rope-dim", "4", "--calib", str(calib), "--calib-tokens", "100000"],
         "fewer than --calib-tokens 100,000"),
    ]:
        assert message in cli_error(capsys, ["convert", str(src), str(tmp_path / "bad"), *argv])
        assert not (tmp_path / "bad").exists()
    assert "MLA already" in cli_error(capsys, ["convert", "tiny-mla", str(tmp_path / "bad"),
                                               "--kv-lora-rank", "4", "--rope-dim", "4"])
    assert "not an empty directory" in cli_error(capsys, ["convert", str(src), str(out), "--kv-lora-rank",
                                                          "full", "--rope-dim", "full"])
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # no temp dirs left


def test_bench_convert(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    import json

    src = _saved_source(tmp_path)
    data = tmp_path / "eval.txt"
    data.write_text("Every query reads the latent once. " * 40)
    out = tmp_path / "conv.json"
    assert main(["bench", "convert", "--model", str(src), "--data", str(data), "--ranks", "4,16,full",
                 "--heal-steps", "0", "--rope-dim", "8", "--rope-mode", "blocks",
                 "--calib-tokens", "512", "--seq-len", "64", "--max-tokens", "257",
                 "--json", str(out), "--plot", str(tmp_path / "conv.png"), "--quiet"]) == 0
    rows = json.loads(out.read_text())["rows"]
    assert [r["label"] for r in rows] == ["source", "R=4", "R=16", "R=24"]  # full at rope 8: 2 x 12
    assert [r["kv_bytes_per_token"] for r in rows] == [128, 48, 96, 128]  # (R + 8) x 2 B x 2 layers
    assert all(r["eval_tokens"] == 256 for r in rows)
    assert (tmp_path / "conv.png").read_bytes()[:4] == b"\x89PNG"
    assert "| R=16 |" in capsys.readouterr().out
    # The default rope: one head's 8 dims, RoRoPE, whose full rank is 2 x 2 KV heads x 8.
    assert "must lie in 1..32 (full rank at --rope-dim 8), got 99" in cli_error(
        capsys, ["bench", "convert", "--model", str(src), "--data", str(data), "--ranks", "99",
                 "--json", str(tmp_path / "c.json"), "--plot", str(tmp_path / "c.png"), "--quiet"])
    assert not (tmp_path / "c.json").exists()
