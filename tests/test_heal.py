"""Healing a converted model (``latentattn.train.distill``): the KL to the teacher, distillation
that pulls a student to its teacher, attention-only training that leaves every other weight as it
was, ``train --teacher`` from the CLI and ``bench convert``'s healed columns; bad input refused."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from conftest import assert_within_rounding, cli_error
from latentattn.cli import main
from latentattn.config import GQAConfig, ModelConfig
from latentattn.convert import Plan, choose_pairs, convert
from latentattn.data import default_text, random_batch, train_val_split
from latentattn.errors import ConfigError
from latentattn.model.transformer import Transformer
from latentattn.train.distill import kl_to_teacher, set_trainable
from latentattn.train.family import FamilySize, family_config
from latentattn.train.loop import TrainSettings, train

TOKENS = torch.tensor(list(default_text()[:60_000].encode()), dtype=torch.long)


def _source(seed: int = 0) -> Transformer:
    cfg = ModelConfig(vocab_size=256, dim=48, n_layers=2, intermediate_size=64, max_seq_len=128,
                      attention=GQAConfig(6, 2, 8), name="src")
    torch.manual_seed(seed)
    return Transformer(cfg).eval()


def _settings(**changes: object) -> TrainSettings:
    base: dict[str, object] = dict(steps=30, batch_size=4, seq_len=32, lr=3e-3, warmup_steps=3,
                                   eval_every=0, eval_windows=4, distill_weight=1.0)
    return TrainSettings(**{**base, **changes})  # type: ignore[arg-type]


def test_kl_to_teacher_is_the_mean_token_kl() -> None:
    g = torch.Generator().manual_seed(0)
    s, t = torch.randn(2, 5, 11, generator=g), torch.randn(2, 5, 11, generator=g)
    def kl(s: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        return (F.softmax(t, -1) * (F.log_softmax(t, -1) - F.log_softmax(s, -1))).sum(-1).mean()

    # Within the rounding of the formula in fp32, measured against it in float64: a log-sum-exp
    # over the 11 logits, then the mean over 10 tokens (conftest.assert_within_rounding).
    assert_within_rounding(kl_to_teacher(s, t), kl(s.double(), t.double()), kl(s, t), terms=11 + 10)
    assert kl_to_teacher(t, t).item() == 0  # exactly: one log-softmax of the same logits, twice
    # A shift of every logit changes nothing: 0 up to fp32's rounding of the shifted logits and
    # their log-sum-exp, an ulp of their size each.
    size = float((t + 3.0).abs().max()) + math.log(11)
    assert_within_rounding(kl_to_teacher(t + 3.0, t), torch.zeros((), dtype=torch.float64),
                           kl_to_teacher(t, t), terms=11 + 10, magnitude=size)


def _held_out_kl(student: Transformer, teacher: Transformer) -> float:
    batch = random_batch(TOKENS, 8, 32, torch.Generator().manual_seed(99))[:, :-1]
    with torch.no_grad():
        return kl_to_teacher(student(batch), teacher(batch)).item()


@pytest.mark.parametrize("bf16", [False, True], ids=["fp32", "bf16-autocast"])
def test_distillation_pulls_a_converted_model_to_its_source(bf16: bool) -> None:
    # bf16: autocast over fp32 master weights, what --dtype auto heals in on a CPU with native bf16.
    torch.set_num_threads(1)
    teacher = _source()
    student = convert(teacher, Plan(choose_pairs(2, 4, None), 6))  # rank 6 of 20: lossy
    before = _held_out_kl(student, teacher)
    frozen = {k: v.clone() for k, v in student.state_dict().items() if ".self_attn." not in k}
    train_t, val_t = train_val_split(TOKENS)
    train(student, train_t, val_t, _settings(trainable="attention", bf16=bf16), progress=False,
          teacher=teacher)
    assert student.embed_tokens.weight.dtype == torch.float32  # master weights stay fp32
    after = _held_out_kl(student, teacher)
    assert after < 0.7 * before, (before, after)
    # attention only: the embeddings, MLPs and norms are bit-for-bit the converted ones
    for k, v in student.state_dict().items():
        if k in frozen:
            assert torch.equal(v, frozen[k]), k
    assert any(not torch.equal(v, convert(teacher, Plan(choose_pairs(2, 4, None), 6)).state_dict()[k])
               for k, v in student.state_dict().items() if ".self_attn." in k)


def test_set_trainable_counts_and_refuses() -> None:
    model = _source()
    attn = sum(p.numel() for n, p in model.named_parameters() if ".self_attn." in n)
    assert set_trainable(model, "attention") == attn
    assert set_trainable(model, "all") == sum(p.numel() for p in model.parameters())
    with pytest.raises(ConfigError, match="one of all, attention"):
        set_trainable(model, "mlp")


def test_bad_distillation_is_refused() -> None:
    train_t, val_t = train_val_split(TOKENS)
    model = _source()
    with pytest.raises(ConfigError, match=r"distill_weight 1\.0 and no teacher"):
        train(model, train_t, val_t, _settings(), progress=False)
    with pytest.raises(ConfigError, match="a teacher and distill_weight 0"):
        train(model, train_t, val_t, _settings(distill_weight=0.0), progress=False, teacher=_source(1))
    other = Transformer(_source().config.replace(vocab_size=300))
    with pytest.raises(ConfigError, match=r"vocabulary \(300 tokens\) is not the student's \(256\)"):
        train(model, train_t, val_t, _settings(), progress=False, teacher=other)
    dsa = Transformer(family_config("dsa", FamilySize()))
    with pytest.raises(ConfigError, match="DSA model trains with trainable='all'"):
        train(dsa, train_t, val_t, _settings(distill_weight=0.0, trainable="attention"), progress=False)
    for bad in (-0.1, 1.5, float("nan")):
        with pytest.raises(ConfigError, match="distill_weight must be in"):
            _settings(distill_weight=bad)


def _saved(tmp_path: Path) -> tuple[Path, Path]:
    """A GQA source and its rank-8 conversion, both on disk; a text file."""
    from latentattn.interop.native import save_native

    src = tmp_path / "src"
    save_native(_source(), src)
    data = tmp_path / "text.txt"
    data.write_text(default_text()[:40_000])
    assert main(["convert", str(src), str(tmp_path / "mla"), "--kv-lora-rank", "8",
                 "--rope-dim", "4"]) == 0
    return src, data


def test_train_teacher_cli_heals_and_refuses_bad_flags(tmp_path: Path,
                                                        capsys: pytest.CaptureFixture[str]) -> None:
    torch.set_num_threads(1)
    from latentattn.interop.native import save_native

    src, data = _saved(tmp_path)
    wide = tmp_path / "wide"
    save_native(Transformer(_source().config.replace(vocab_size=300)), wide)
    out = tmp_path / "healed"
    common = ["train", "--model", str(tmp_path / "mla"), "--data", str(data), "--steps", "4",
              "--batch-size", "2", "--seq-len", "32", "--eval-every", "0", "--quiet",
              "--dtype", "float32"]
    assert main([*common, "--teacher", str(src), "--distill-weight", "0.5", "--trainable",
                 "attention", "--out", str(out)]) == 0
    state = json.loads((out / "state.json").read_text())
    assert state["settings"]["distill_weight"] == 0.5 and state["settings"]["trainable"] == "attention"
    assert "steps, validation loss" in capsys.readouterr().out
    # A resume must distil as the run did.
    assert "distill_weight is 0.5 in the checkpoint, 1.0 here" in cli_error(
        capsys, [*common, "--teacher", str(src), "--trainable", "attention", "--out", str(out),
                 "--resume", "--steps", "4"])
    for argv, message in [
        (["--distill-weight", "0.5"], "--distill-weight goes with --teacher"),
        (["--teacher", str(src), "--distill-weight", "0"], "--distill-weight must be in (0, 1]"),
        (["--teacher", str(wide)], "vocabulary (300 tokens) is not the student's (256)"),
    ]:
        assert message in cli_error(capsys, [*common, *argv, "--out", str(tmp_path / "bad")])
        assert not (tmp_path / "bad" / "state.json").exists()


def test_bench_convert_heals_each_rank(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    torch.set_num_threads(1)
    src, data = _saved(tmp_path)
    out = tmp_path / "conv.json"
    assert main(["bench", "convert", "--model", str(src), "--data", str(data), "--ranks", "4,8",
                 "--rope-dim", "4", "--calib-tokens", "1024", "--seq-len", "64", "--max-tokens", "513",
                 "--heal-steps", "3", "--heal-seq-len", "32", "--heal-lr", "1e-3", "--heal-dtype", "float32",
                 "--json", str(out), "--plot", str(tmp_path / "conv.png"), "--quiet"]) == 0
    report = json.loads(out.read_text())
    assert report["heal"]["steps"] == 3 and report["heal"]["trainable"] == "attention"
    rows = report["rows"]
    assert rows[0]["healed_perplexity"] is None  # the source is not healed
    for r in rows[1:]:
        assert r["healed_perplexity"] > 1 and r["heal_seconds"] > 0
        assert r["healed_perplexity"] != r["perplexity"]
    assert "healed perplexity" in capsys.readouterr().out
    # The DeepSeek format's conversion: RoRoPE (a head-wide rope key) and the fitted latent norm.
    assert main(["bench", "convert", "--model", str(src), "--data", str(data), "--ranks", "8,full",
                 "--format", "deepseek", "--calib-tokens", "1024", "--seq-len", "64",
                 "--max-tokens", "513", "--heal-steps", "0", "--json", str(out),
                 "--plot", str(tmp_path / "conv.png"), "--quiet"]) == 0
    report = json.loads(out.read_text())
    assert report["rope_mode"] == "rorope" and report["latent_norm"] and report["heal"] is None
    assert [(r["kv_lora_rank"], r["rope_dim"]) for r in report["rows"][1:]] == [(8, 8), (32, 8)]
    assert "--heal-steps must be >= 0" in cli_error(
        capsys, ["bench", "convert", "--model", str(src), "--data", str(data), "--ranks", "4",
                 "--heal-steps", "-1", "--json", str(tmp_path / "c.json"),
                 "--plot", str(tmp_path / "c.png"), "--quiet"])
    assert not (tmp_path / "c.json").exists()


def test_bench_convert_fits_then_heals(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    # The fitted columns sit between the closed form and the heal; the heal starts from the fit.
    torch.set_num_threads(1)
    src, data = _saved(tmp_path)
    out = tmp_path / "conv.json"
    assert main(["bench", "convert", "--model", str(src), "--data", str(data), "--ranks", "8",
                 "--format", "deepseek", "--calib-tokens", "1024", "--seq-len", "64", "--max-tokens", "513",
                 "--fit-steps", "20", "--heal-steps", "2", "--heal-seq-len", "32", "--heal-dtype", "float32",
                 "--json", str(out), "--quiet"]) == 0
    report = json.loads(out.read_text())
    assert report["fit"] == {"steps": 20, "lr": 1e-3, "batch_windows": 2}
    source, row = report["rows"]
    assert source["fitted_perplexity"] is None
    assert row["fitted_perplexity"] > 1 and row["fit_seconds"] > 0 and row["healed_perplexity"] > 1
    assert "fitted perplexity" in capsys.readouterr().out
    assert "--fit-lr must lie in (0, 0.1]" in cli_error(
        capsys, ["bench", "convert", "--model", str(src), "--data", str(data), "--ranks", "8",
                 "--fit-steps", "5", "--fit-lr", "-1", "--json", str(tmp_path / "c.json"), "--quiet"])
    assert not (tmp_path / "c.json").exists()
