"""RoRoPE (one plain head-wide RoPE key mixed from every KV head) and the DeepSeek-V3 export of a
converted model: RoRoPE is exact where the KV heads' rotary parts agree up to scale (MQA always),
the latent RMSNorm's fitted gains are the least-squares ones, and ``convert --format deepseek``
writes a checkpoint that transformers' DeepseekV3ForCausalLM loads with latentattn's own logits."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from conftest import assert_within_rounding, cli_error
from latentattn import Transformer, load
from latentattn.cli import main
from latentattn.config import GQAConfig, ModelConfig, RopeConfig, RopeScaling
from latentattn.convert import Plan, attention_inputs, choose_pairs, convert, full_rank
from latentattn.convert.gqa_to_mla import latent_norm_gains

ROPE = RopeConfig(theta=5000.0, scaling=RopeScaling("llama3", 8.0, 1.0, 4.0, 16))


def _source(heads: int, kv_heads: int, same_keys: bool = False, seed: int = 0) -> Transformer:
    cfg = ModelConfig(vocab_size=97, dim=40, n_layers=2, intermediate_size=56, max_seq_len=64,
                      attention=GQAConfig(heads, kv_heads, 12), rope=ROPE, name="src")
    torch.manual_seed(seed)
    model = Transformer(cfg).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * (0.15 if p.dim() >= 2 else 0.3))
        if same_keys:  # every KV head's key a multiple of head 0's: one rotary direction per pair
            for blk in model.blocks:
                w = blk.self_attn.k_proj.weight.view(kv_heads, 12, 40)
                w.copy_(w[0] * torch.tensor([1.0, -0.5, 2.0][:kv_heads]).view(-1, 1, 1))
    return model


def _plan(src: Transformer, rank: int | None = None, latent_norm: bool = False) -> Plan:
    return Plan(choose_pairs(6, 6, None), rank or full_rank(src.config, 12, "rorope"), "svd",
                "rorope", latent_norm)


X = torch.randint(0, 97, (2, 33), generator=torch.Generator().manual_seed(1))


@pytest.mark.parametrize(("heads", "kv_heads", "same_keys"), [(3, 1, False), (6, 3, True), (4, 2, True)])
def test_rorope_is_exact_when_the_kv_heads_rotary_parts_agree(heads: int, kv_heads: int,
                                                               same_keys: bool) -> None:
    src = _source(heads, kv_heads, same_keys)
    ids = torch.randint(0, 97, (4 * 32,), generator=torch.Generator().manual_seed(2))
    for inputs in (None, attention_inputs(src, ids, 32)):  # mixing from the weights, or calibration
        mla = convert(src, _plan(src), inputs)
        a = mla.config.attention
        assert (a.qk_rope_head_dim, a.qk_nope_head_dim) == (12, 12)  # type: ignore[union-attr]
        assert mla.config.rope == src.config.rope  # a plain RoPE, the source's
        with torch.no_grad():
            assert (mla(X) - src(X)).abs().max().item() < 1e-4
            absorbed = load(mla.config.replace(mla_impl="absorb"))
            absorbed.load_state_dict(mla.state_dict())
            assert (absorbed(X) - src(X)).abs().max().item() < 1e-4


def test_rorope_on_independent_kv_heads_is_close_but_not_exact() -> None:
    src = _source(6, 3)
    ids = torch.randint(0, 97, (4 * 32,), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        want = torch.log_softmax(src(X), -1)
        got = torch.log_softmax(convert(src, _plan(src), attention_inputs(src, ids, 32))(X), -1)
        kl = float((want.exp() * (want - got)).sum(-1).mean())
    assert 1e-6 < kl < 0.5


def test_latent_norm_gains_are_least_squares() -> None:
    g = torch.Generator().manual_seed(0)
    x = torch.randn(500, 10, generator=g, dtype=torch.float64) * torch.linspace(0.5, 2, 10,
                                                                               dtype=torch.float64)
    w = torch.randn(6, 10, generator=g, dtype=torch.float64)
    b = torch.randn(6, generator=g, dtype=torch.float64)
    gains = latent_norm_gains(x, w, b, 1e-6)
    c = x @ w.T + b
    unit = c * torch.rsqrt(c.pow(2).mean(-1, keepdim=True) + 1e-6)

    def err(gamma: torch.Tensor) -> float:
        return float((unit * gamma - c).pow(2).sum())

    best = err(gains)
    for k in range(6):
        for step in (0.9, 1.1):
            other = gains.clone()
            other[k] *= step
            assert err(other) > best


def test_deepseek_export_loads_in_transformers(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from transformers import AutoModelForCausalLM, LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    hf = LlamaForCausalLM(LlamaConfig(vocab_size=256, hidden_size=48, intermediate_size=64,
                                      num_hidden_layers=2, num_attention_heads=6, num_key_value_heads=3,
                                      head_dim=10, max_position_embeddings=512,
                                      tie_word_embeddings=True))
    src = tmp_path / "src"
    hf.save_pretrained(src)
    calib = tmp_path / "calib.txt"
    calib.write_text("A latent per token and one rope key, read once by every head. " * 40)
    out = tmp_path / "ds"
    assert main(["convert", str(src), str(out), "--kv-lora-rank", "24", "--rope-dim", "full",
                 "--format", "deepseek", "--calib", str(calib), "--calib-tokens", "1024",
                 "--method", "pca"]) == 0
    assert "DeepSeek-V3 format" in capsys.readouterr().out
    config = json.loads((out / "config.json").read_text())
    assert config["model_type"] == "deepseek_v3" and config["rope_interleave"] is False
    assert (config["kv_lora_rank"], config["qk_rope_head_dim"], config["qk_nope_head_dim"]) == (24, 10, 10)
    ours = load(out)
    theirs = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32).eval()
    assert type(theirs).__name__ == "DeepseekV3ForCausalLM"
    exact = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float64).eval()
    x = torch.randint(0, 256, (2, 40), generator=torch.Generator().manual_seed(5))
    with torch.no_grad():
        # Ours within rounding of transformers' logits in float64, as judged by their fp32 ones'
        # error; a logit's longest chain: per layer a 64-wide MLP dot product and attention
        # over 40 positions, then the 48-wide head (conftest.assert_within_rounding).
        assert_within_rounding(ours(x), exact(x).logits, theirs(x).logits, terms=2 * (64 + 40) + 48)
        norm = ours.blocks[0].self_attn.kv_a_layernorm
        assert norm is not None and not torch.allclose(norm.weight, torch.ones_like(norm.weight))
        # The norm is what the export costs: close to the linear-latent (native) conversion.
        native = tmp_path / "native"
        assert main(["convert", str(src), str(native), "--kv-lora-rank", "24", "--rope-mode", "rorope",
                     "--rope-dim", "full", "--calib", str(calib), "--calib-tokens", "1024",
                     "--method", "pca"]) == 0
        want = torch.log_softmax(hf(x).logits, -1)
        for model in (load(native), ours):
            got = torch.log_softmax(model(x), -1)
            assert float((want.exp() * (want - got)).sum(-1).mean()) < 0.1
    capsys.readouterr()
    for argv, message in [
        (["--rope-mode", "blocks"], "--format deepseek needs --rope-mode rorope"),
        (["--rope-dim", "20"], "--rope-dim must be 10 (the head dim) or full"),
    ]:
        argv = ["convert", str(src), str(tmp_path / "bad"), "--kv-lora-rank", "8", "--format", "deepseek",
                "--calib", str(calib), "--calib-tokens", "1024", *argv]
        assert message in cli_error(capsys, argv)
        assert not (tmp_path / "bad").exists()
    assert "give --calib FILE (or builtin)" in cli_error(
        capsys, ["convert", str(src), str(tmp_path / "bad"), "--kv-lora-rank", "8", "--format", "deepseek",
                 "--calib", "none"])
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # no temp dirs left
