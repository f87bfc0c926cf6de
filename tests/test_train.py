"""``latentattn.train.loop`` and ``latentattn train``: learning, exact resume, DSA stages, atomic
checkpoints, generation from a checkpoint, user errors, and torchrun (DDP / FSDP2 on gloo).

Tiny models (dim 32, 2 layers, 32-byte windows) on a few KB of CPython's help text keep the
file fast on two CPU cores.
"""

from __future__ import annotations

import dataclasses
import itertools
import json
import math
import os
import signal
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import torch

from conftest import cli_error
from latentattn.attention.dsa import SparseLatentAttention
from latentattn.cli import main
from latentattn.config import MoEConfig
from latentattn.data import byte_tokens, default_text, eval_windows, random_batch, train_val_split
from latentattn.errors import CheckpointError, ConfigError
from latentattn.loading import load
from latentattn.model.ffn import Router
from latentattn.model.transformer import Transformer
from latentattn.train import checkpoint, loop
from latentattn.train.balance import balance_loss, expert_loads, moe_routers, update_router_bias
from latentattn.train.family import ATTN_KINDS, FamilySize, family_config
from latentattn.train.loop import TrainResult, TrainSettings, read_state, train
from latentattn.train.resume import check_horizon
from latentattn.train.settings import lr_at, wsd_decay_start

SIZE = FamilySize(dim=32, n_layers=2, n_heads=2, seq_len=32, kv_lora_rank=16, q_lora_rank=16,
                  qk_rope_head_dim=8, index_n_heads=2, index_head_dim=8, index_topk=8)
TEXT = default_text()[:6000]
TRAIN, VAL = train_val_split(byte_tokens(TEXT))
# The same model through the CLI (flags it has; the rest of FamilySize keeps its defaults).
CLI_SIZE = ["--dim", "32", "--layers", "2", "--heads", "2", "--seq-len", "32", "--kv-lora-rank", "16",
            "--index-topk", "8", "--batch-size", "4", "--quiet",
            "--dtype", "float32"]  # the numerics these tests pin, whatever this CPU's bf16
# DeepSeek-V3 routing (sigmoid, noaux_tc) over 8 experts in 2 groups, 2 per token.
MOE = MoEConfig(n_routed_experts=8, n_shared_experts=1, num_experts_per_tok=2, moe_intermediate_size=32,
                first_k_dense_replace=1, scoring_func="sigmoid", topk_method="noaux_tc", n_group=2,
                topk_group=2, routed_scaling_factor=2.5, norm_topk_prob=True)


@pytest.fixture(autouse=True)
def _one_thread() -> Any:
    # Matrices of 32 x 32: a second intra-op thread costs more than it saves (and on a busy
    # 2-core machine it spins against the other process).
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def _model(kind: str, seed: int = 0) -> Transformer:
    """A family model; ``mla-moe``: MLA with the second layer an MoE routed as DeepSeek-V3."""
    torch.manual_seed(seed)
    if kind == "mla-moe":
        return Transformer(family_config("mla", SIZE).replace(moe=MOE, name=kind))
    return Transformer(family_config(kind, SIZE))


def _settings(**changes: Any) -> TrainSettings:
    base: dict[str, Any] = dict(steps=6, batch_size=4, seq_len=32, warmup_steps=2, eval_every=0,
                                eval_windows=8)
    return TrainSettings(**{**base, **changes})


# ---------------------------------------------------------------------------- learning
@pytest.mark.parametrize("kind", ATTN_KINDS)
def test_loss_decreases(kind: str) -> None:
    result = train(_model(kind), TRAIN, VAL, _settings(steps=20, eval_every=10), progress=False)
    assert len(result.train_losses) == 20
    first, last = sum(result.train_losses[:3]) / 3, sum(result.train_losses[-3:]) / 3
    assert first > 5.0  # ~ln 256 at init
    assert last < first - 0.8, result.train_losses  # ~5.5 -> ~4.3 nats in 20 steps
    assert [s for s, _ in result.val_losses] == [10, 20]
    assert result.final_val_loss == result.val_losses[-1][1] < 5.0
    assert result.tokens_per_s > 0 and result.steps_done == 20


def test_bf16_autocast() -> None:
    model = _model("dsa")
    result = train(model, TRAIN, VAL, _settings(steps=3, bf16=True, dsa_warmup_steps=1), progress=False)
    assert all(5.0 < x < 6.0 for x in result.train_losses)
    assert model.embed_tokens.weight.dtype == torch.float32  # autocast, not a bf16 model


def test_evaluation_set_is_fixed_and_whole() -> None:
    # The whole validation split in non-overlapping windows, whatever the seed: every token after
    # the first predicted once, so the loss is the mean over exactly those targets.
    tokens = torch.arange(103)
    windows = eval_windows(tokens, 10)
    assert windows.shape == (10, 11) and torch.equal(windows[1], torch.arange(10, 21))
    assert torch.equal(windows[:, 1:].flatten(), torch.arange(1, 101))  # each target once
    assert eval_windows(tokens, 10, limit=3).shape == (3, 11)
    model = _model("mla").eval()
    s = _settings(batch_size=3, eval_windows=0)
    loss = loop.evaluate(model, VAL, s)
    assert loop.evaluate(model, VAL, dataclasses.replace(s, seed=7)) == loss  # seed-independent
    assert loop.evaluate(model, VAL, dataclasses.replace(s, batch_size=5)) == pytest.approx(loss, rel=1e-6)
    w = eval_windows(VAL, s.seq_len)
    with torch.no_grad():
        manual = float(torch.nn.functional.cross_entropy(
            model(w[:, :-1]).flatten(0, 1), w[:, 1:].flatten()))
    assert loss == pytest.approx(manual, rel=1e-5)


def test_lr_schedule() -> None:
    s = _settings(steps=10, warmup_steps=3, lr=1.0, min_lr_ratio=0.1)
    lrs = [lr_at(i, s) for i in range(10)]
    # The warm-up's last step reaches lr, the cosine starts from it and ends at low on the last step.
    assert lrs[:4] == pytest.approx([1 / 3, 2 / 3, 1.0, 1.0])
    assert lrs[-1] == pytest.approx(0.1)
    assert all(a >= b for a, b in itertools.pairwise(lrs[2:]))
    assert lr_at(0, dataclasses.replace(s, warmup_steps=0)) == 1.0
    # Every step after the warm-up depends on steps: what makes a cosine run not extensible.
    longer = [lr_at(i, dataclasses.replace(s, steps=20)) for i in range(10)]
    assert longer[:3] == lrs[:3] and all(a > b for a, b in zip(longer[4:], lrs[4:], strict=True))


def test_wsd_schedule() -> None:
    s = _settings(steps=20, warmup_steps=3, lr=1.0, min_lr_ratio=0.1, schedule="wsd", decay_frac=0.25)
    lrs = [lr_at(i, s) for i in range(20)]
    assert wsd_decay_start(s) == 15
    assert lrs[:3] == pytest.approx([1 / 3, 2 / 3, 1.0])
    assert lrs[3:15] == [1.0] * 12  # stable: exactly lr
    assert lrs[15:] == pytest.approx([1 - 0.9 * k / 5 for k in range(1, 6)])  # linear, low last
    # Before the decay nothing depends on steps, bit for bit.
    assert [lr_at(i, dataclasses.replace(s, steps=40)) for i in range(15)] == lrs[:15]
    # The decay never reaches into the warm-up; decay_frac 0 keeps lr to the end.
    short = dataclasses.replace(s, steps=5, warmup_steps=4, decay_frac=0.9)
    assert wsd_decay_start(short) == 4
    assert [lr_at(i, short) for i in range(5)] == pytest.approx([0.25, 0.5, 0.75, 1.0, 0.1])
    flat = dataclasses.replace(s, decay_frac=0.0)
    assert [lr_at(i, flat) for i in range(3, 20)] == [1.0] * 17
    with pytest.raises(ConfigError, match="schedule must be one of cosine, wsd"):
        _settings(schedule="linear")
    with pytest.raises(ConfigError, match=r"decay_frac must be in \[0, 1\]"):
        _settings(schedule="wsd", decay_frac=1.5)


# ---------------------------------------------------------------------------- exact resume
class _Stop(Exception):
    """Stands for a crash or Ctrl-C right after a checkpoint."""


def _train_until_checkpoint(kind: str, settings: TrainSettings, out: Path, step: int,
                            monkeypatch: pytest.MonkeyPatch) -> None:
    """Train ``kind`` into ``out`` and stop (as a crash would) right after the step-``step``
    checkpoint is written."""
    real_save = loop.save_checkpoint

    def save_then_stop(out_dir: Path, model_t: Any, opt_t: Any, state: dict[str, Any]) -> None:
        real_save(out_dir, model_t, opt_t, state)
        if state["step"] == step:
            raise _Stop

    monkeypatch.setattr(loop, "save_checkpoint", save_then_stop)
    with pytest.raises(_Stop):
        train(_model(kind), TRAIN, VAL, settings, out_dir=str(out), progress=False)
    monkeypatch.undo()
    assert read_state(out)["step"] == step


def _assert_same_run(a: TrainResult, b: TrainResult, dir_a: Path, dir_b: Path) -> None:
    """Two runs are one: the same losses step by step, the same validation, the same weights."""
    assert torch.equal(torch.tensor(a.train_losses), torch.tensor(b.train_losses))
    assert a.val_losses == b.val_losses
    for x, y in zip(load(dir_a).state_dict().values(), load(dir_b).state_dict().values(), strict=True):
        assert torch.equal(x, y)


# mla-moe: the router biases move every step (router_bias_rate) and must come back exactly.
@pytest.mark.parametrize("kind", ["mha", "dsa", "mla-moe"])
def test_resume_after_a_stop_reproduces_losses(kind: str, tmp_path: Path,
                                               monkeypatch: pytest.MonkeyPatch) -> None:
    # DSA: the switch to top-k (after step 4) happens in the resumed part.
    s = _settings(steps=6, checkpoint_every=3, eval_every=2, dsa_warmup_steps=4)
    full = train(_model(kind), TRAIN, VAL, s, out_dir=str(tmp_path / "full"), progress=False)

    _train_until_checkpoint(kind, s, tmp_path / "cut", 3, monkeypatch)
    # Another init: the resumed run must take everything from the checkpoint.
    resumed = train(_model(kind, seed=1), TRAIN, VAL, s, out_dir=str(tmp_path / "cut"), resume=True,
                    progress=False)
    _assert_same_run(resumed, full, tmp_path / "cut", tmp_path / "full")


@pytest.mark.parametrize("kind", ["mha", "mla", "dsa"])
def test_wsd_run_extends_to_more_steps_exactly(kind: str, tmp_path: Path,
                                              monkeypatch: pytest.MonkeyPatch) -> None:
    # A 10-step wsd run decays over steps 8-9; stopped at its step-8 checkpoint (no step decayed
    # yet) and resumed to 12 steps (decay from step 10): the same as 12 steps at once.
    # DSA: dsa_warmup_steps left to default in the cut run (10 // 4 = 2): the resume keeps it.
    s10 = _settings(steps=10, schedule="wsd", checkpoint_every=4, eval_every=4)
    s12 = dataclasses.replace(s10, steps=12)
    full = train(_model(kind), TRAIN, VAL, dataclasses.replace(s12, dsa_warmup_steps=2),
                 out_dir=str(tmp_path / "full"), progress=False)
    _train_until_checkpoint(kind, s10, tmp_path / "cut", 8, monkeypatch)
    assert read_state(tmp_path / "cut")["settings"]["steps"] == 10  # the horizon it ran under
    resumed = train(_model(kind, seed=1), TRAIN, VAL, s12, out_dir=str(tmp_path / "cut"), resume=True,
                    progress=False)
    _assert_same_run(resumed, full, tmp_path / "cut", tmp_path / "full")
    # The finished 12-step run has decayed: extending it could not be exact.
    with pytest.raises(CheckpointError, match="cannot extend a wsd run from --steps 12 to 20 "
                       "exactly: the checkpoint at step 12 is already in the decay"):
        train(_model(kind), TRAIN, VAL, dataclasses.replace(s12, steps=20),
              out_dir=str(tmp_path / "cut"), resume=True, progress=False)


def test_other_steps_only_where_every_lr_taken_stays() -> None:
    check = check_horizon
    cos = _settings(steps=100, warmup_steps=20, lr=3e-3)

    def steps(s: TrainSettings, n: int) -> TrainSettings:
        return dataclasses.replace(s, steps=n)

    check(100, cos, cos)  # the same steps: always exact
    check(20, cos, steps(cos, 200))  # only warm-up steps taken
    with pytest.raises(CheckpointError, match=r"^cannot extend a cosine run from --steps 100 to 200 "
                       r"exactly: its LR depends on the total steps \(step 99 ran at LR 3\.00e-04, a "
                       r"200-step run takes it at 1\.90e-03\); resume with --steps 100, or train with "
                       r"--schedule wsd"):
        check(100, cos, steps(cos, 200))
    # A 100-step run ends at 3.0e-4; continued to 200, the next step would jump to 1.87e-3.
    assert lr_at(100, steps(cos, 200)) == pytest.approx(1.87e-3, abs=1e-5)
    with pytest.raises(CheckpointError, match=r"its LR depends on the total steps \(step 21 ran"):
        check(22, cos, steps(cos, 200))  # one step past the warm-up is enough to differ
    flat = dataclasses.replace(cos, min_lr_ratio=1.0)  # constant after the warm-up
    check(100, flat, steps(flat, 200))
    wsd = dataclasses.replace(cos, schedule="wsd")  # decays from step 80 of 100
    check(80, wsd, steps(wsd, 200))
    check(72, wsd, steps(wsd, 90))  # shorter is exact too, before both decays (90: from 72)
    with pytest.raises(CheckpointError, match="the checkpoint at step 81 is already in the decay of "
                       "the 100-step run, which began at step 80"):
        check(81, wsd, steps(wsd, 200))
    with pytest.raises(CheckpointError, match="the 90-step run decays from step 72, before the "
                       "checkpoint's step 80"):
        check(80, wsd, steps(wsd, 90))


# ---------------------------------------------------------------------------- DSA stages
def test_dsa_stages(monkeypatch: pytest.MonkeyPatch) -> None:
    model = _model("dsa")
    layers = [b.self_attn for b in model.blocks if isinstance(b.self_attn, SparseLatentAttention)]
    init = [p.detach().clone() for layer in layers for p in layer.indexer.parameters()]
    seen: list[str] = []
    at_switch: list[torch.Tensor] = []
    real = loop.set_dsa_stage

    def spy(m: Transformer, stage: loop.Stage, freeze: bool = True) -> None:
        seen.append(stage)
        if stage == "sparse" and not at_switch:
            at_switch.extend(p.detach().clone() for layer in layers for p in layer.indexer.parameters())
        real(m, stage, freeze)

    monkeypatch.setattr(loop, "set_dsa_stage", spy)
    train(model, TRAIN, VAL, _settings(steps=6, dsa_warmup_steps=3, eval_every=2), progress=False)
    # Training stages in order; evaluation dense before the switch, top-k after it.
    assert list(dict.fromkeys(seen)) == ["warmup", "dense", "sparse", "inference"]
    assert at_switch and any(not torch.equal(a, b) for a, b in zip(init, at_switch, strict=True))
    assert all(layer.mode == "sparse" and not layer.train_indexer for layer in layers)


# ---------------------------------------------------------------------------- MoE balancing
def _skewed_moe(seed: int) -> Transformer:
    """The MoE model with its router skewed: biases that send the first group's two experts
    almost every token (max/mean load ~3 at init). Router weights x5: at std 0.02 the tokens of
    a 32-wide model score almost alike, and one bias step would move them all at once."""
    model = _model("mla-moe", seed)
    router = moe_routers(model)[0]
    with torch.no_grad():
        router.weight.mul_(5.0)
        router.e_score_correction_bias.copy_(torch.tensor([0.2, 0.2, 0, 0, 0, 0, 0, 0]))
    return model


def _imbalance(model: Transformer) -> float:
    """max / mean tokens per expert over 512 validation tokens (1 when perfectly balanced)."""
    batch = random_batch(VAL, 16, 32, torch.Generator().manual_seed(123))
    model.train()  # the router records its loads in training mode
    with torch.no_grad():
        model(batch[:, :-1])
    load = moe_routers(model)[0].tokens_per_expert
    assert load is not None
    return float(load.max() / load.float().mean())


@pytest.mark.parametrize("balance", ["bias", "aux_loss"])
def test_skewed_router_ends_balanced(balance: str) -> None:
    # Measured max/mean (seeds 0-3): 2.7-3.5 at init; after 80 steps 4.0 without balancing
    # (every token on two experts), 1.2-1.5 with the V3 bias update (rate 5e-3; V3's 1e-3 needs
    # more steps than a test has), 1.2-1.9 with the V2 loss (alpha 0.1).
    on: dict[str, Any] = (dict(router_bias_rate=5e-3) if balance == "bias"
                          else dict(router_bias_rate=0.0, moe_aux_loss=0.1))
    s = _settings(steps=80, batch_size=8, eval_windows=4)
    before = _imbalance(_skewed_moe(0))
    unbalanced, balanced = _skewed_moe(0), _skewed_moe(0)
    off = train(unbalanced, TRAIN, VAL, dataclasses.replace(s, router_bias_rate=0.0), progress=False)
    result = train(balanced, TRAIN, VAL, dataclasses.replace(s, **on), progress=False)
    assert result.train_losses[0] == off.train_losses[0]  # the LM part, without the aux loss
    assert before > 2.5
    assert _imbalance(unbalanced) > 3.5
    assert _imbalance(balanced) < 2.0


def test_router_bias_update_follows_the_loads() -> None:
    # DeepSeek-V3 s2.1.2: b_i -= gamma when expert i is overloaded, += gamma when underloaded.
    router = moe_routers(_model("mla-moe"))[0]
    loads = torch.tensor([[10, 2, 4, 0, 4, 4, 4, 4]])  # mean 4
    update_router_bias([router], loads, 0.01)
    expected = 0.01 * torch.tensor([-1.0, 1, 0, 1, 0, 0, 0, 0])
    assert torch.equal(router.e_score_correction_bias, expected)


def test_balance_loss_value_and_gradient() -> None:
    # DeepSeek-V2 s2.2.3 on a routing worked out by hand: E = 4 softmax experts, K = 1; token
    # one-hot x_t and W = ln(3) I give probabilities 1/2 for the token's own expert, 1/6 for each
    # other. Three tokens choose expert 0, one expert 1: f = E / (K T) * count = (3, 1, 0, 0),
    # P_0 = (3/2 + 1/6) / 4 = 5/12, P_1 = (3/6 + 1/2) / 4 = 1/4, loss = 3 * 5/12 + 1/4 = 3/2
    # (1 when balanced).
    cfg = MoEConfig(n_routed_experts=4, n_shared_experts=0, num_experts_per_tok=1, moe_intermediate_size=4)
    router = Router(4, cfg).train()
    with torch.no_grad():
        router.weight.copy_(math.log(3) * torch.eye(4))
    router(torch.eye(4)[[0, 0, 0, 1]])
    loads = expert_loads([router])
    assert loads.tolist() == [[3, 1, 0, 0]]
    loss = balance_loss([router], loads)
    torch.testing.assert_close(loss, torch.tensor(1.5))
    loss.backward()
    grad = router.weight.grad
    assert grad is not None and grad.abs().sum() > 0
    # Descending it takes probability from the overloaded expert 0.
    assert router.mean_scores is not None
    p0 = float(router.mean_scores[0].detach())
    with torch.no_grad():
        router.weight.sub_(0.5 * grad)
    router(torch.eye(4)[[0, 0, 0, 1]])
    assert router.mean_scores is not None and float(router.mean_scores[0].detach()) < p0


# ---------------------------------------------------------------------------- checkpoints
def test_failed_save_keeps_previous_checkpoint(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    s4 = _settings(steps=4)
    full = train(_model("mla"), TRAIN, VAL, s4, progress=False)
    # A 2-step checkpoint (warm-up LR: the same first steps as the 4-step run), then a resume to
    # 6 steps whose save fails after its first file (say, the disk filled up).
    s6 = _settings(steps=6)
    train(_model("mla"), TRAIN, VAL, _settings(steps=2), out_dir=str(tmp_path / "b"), progress=False)
    before = {p.name: p.read_bytes() for p in (tmp_path / "b").iterdir()}
    real = checkpoint.atomic_write
    calls = [0]

    def flaky(path: Path, write: Any, suffix: str = "") -> None:
        calls[0] += 1
        if calls[0] > 1:
            raise OSError(28, "No space left on device")
        real(path, write, suffix)

    monkeypatch.setattr(checkpoint, "atomic_write", flaky)
    with pytest.raises(OSError, match="No space"):
        train(_model("mla"), TRAIN, VAL, s6, out_dir=str(tmp_path / "b"), resume=True, progress=False)
    monkeypatch.undo()
    after = {p.name: p.read_bytes() for p in (tmp_path / "b").iterdir()}
    assert all(after[name] == data for name, data in before.items())  # old files untouched
    assert read_state(tmp_path / "b")["step"] == 2
    load(tmp_path / "b")  # loadable, hashes match
    # ... and resumable to the same losses as never failing.
    resumed = train(_model("mla"), TRAIN, VAL, s4, out_dir=str(tmp_path / "b"), resume=True,
                    progress=False)
    assert torch.equal(torch.tensor(resumed.train_losses), torch.tensor(full.train_losses))
    names = sorted(p.name for p in (tmp_path / "b").iterdir())
    assert names == ["model-0000004.safetensors", "optimizer-0000004.safetensors", "state.json"]


def test_generate_and_info_from_checkpoint(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    data = tmp_path / "text.txt"
    data.write_text(TEXT)
    out = tmp_path / "run"
    assert main(["train", "--attn", "mla", *CLI_SIZE, "--data", str(data), "--steps", "4",
                 "--out", str(out)]) == 0
    assert "validation loss" in capsys.readouterr().out
    gen = ["generate", "--model", str(out), "--prompt", "The ", "--max-new-tokens", "8"]
    assert main(gen) == 0
    first = capsys.readouterr()
    assert "random-init" not in first.err  # trained weights (stderr says what --dtype auto chose)
    assert main(gen) == 0
    assert capsys.readouterr().out == first.out
    assert main(["info", "--model", str(out)]) == 0
    assert "kv_lora_rank 16" in capsys.readouterr().out


# ---------------------------------------------------------------------------- user errors
_error = cli_error


def _snapshot(d: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(d.iterdir())}


def test_bad_data_and_flags(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    def run(*extra: str) -> str:
        return _error(capsys, ["train", "--attn", "mha", *CLI_SIZE, "--out", str(tmp_path / "o"),
                               *extra])

    assert "does not exist" in run("--data", str(tmp_path / "missing.txt"))
    (tmp_path / "empty.txt").write_text("")
    assert "is empty" in run("--data", str(tmp_path / "empty.txt"))
    (tmp_path / "bin.txt").write_bytes(b"abc\x00def" * 100)
    assert "not text" in run("--data", str(tmp_path / "bin.txt"))
    (tmp_path / "short.txt").write_text("x" * 200)
    assert "too short" in run("--data", str(tmp_path / "short.txt"))
    (tmp_path / "ok.txt").write_text(TEXT)
    assert "--steps must be >= 1" in run("--data", str(tmp_path / "ok.txt"), "--steps", "0")
    assert "--moe-aux-loss must be a number >= 0" in run("--data", str(tmp_path / "ok.txt"),
                                                        "--moe-aux-loss", "-1")
    assert "unknown --attn 'mxa'" in _error(capsys, ["train", "--attn", "mxa", "--out", str(tmp_path)])
    assert "GiB of weights" in _error(capsys, ["train", "--model", "deepseek-v3", "--out", str(tmp_path)])
    blocker = tmp_path / "file"
    blocker.write_text("not a directory")
    assert "cannot write to output directory" in _error(
        capsys, ["train", "--attn", "mha", *CLI_SIZE, "--data", str(tmp_path / "ok.txt"),
                 "--steps", "1", "--out", str(blocker / "run")])
    assert not (tmp_path / "o").exists()


def test_bad_checkpoints_lose_nothing(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    data = tmp_path / "text.txt"
    data.write_text(TEXT)
    out = tmp_path / "run"
    base = ["train", *CLI_SIZE, "--data", str(data), "--out", str(out)]
    assert main([*base, "--attn", "mla", "--steps", "2"]) == 0
    capsys.readouterr()
    good = _snapshot(out)

    assert "already holds a checkpoint" in _error(capsys, [*base, "--attn", "mla", "--steps", "4"])
    assert "mismatched checkpoint" in _error(capsys, [*base, "--attn", "mha", "--steps", "4",
                                                      "--resume"])
    assert "lr is 0.003 in the checkpoint" in _error(
        capsys, [*base, "--attn", "mla", "--steps", "4", "--lr", "0.01", "--resume"])
    assert _snapshot(out) == good
    # Balancing settings bind only models with experts: a dense run resumes whatever they say.
    assert main([*base, "--attn", "mla", "--steps", "2", "--router-bias-rate", "0.01", "--resume"]) == 0
    capsys.readouterr()
    moe_out = tmp_path / "moe"
    moe = ["train", "--model", "tiny-mla-moe", "--seq-len", "32", "--batch-size", "2", "--quiet",
           "--data", str(data), "--out", str(moe_out), "--steps", "2", "--dtype", "float32"]
    assert main(moe) == 0
    capsys.readouterr()
    moe_good = _snapshot(moe_out)
    assert "router_bias_rate is 0.001 in the checkpoint, 0.01 here" in _error(
        capsys, [*moe, "--router-bias-rate", "0.01", "--resume"])
    assert _snapshot(moe_out) == moe_good

    state = read_state(out)
    weights = out / state["files"]["model"]
    weights.write_bytes(good[weights.name][:100])  # truncated
    assert "corrupt checkpoint" in _error(capsys, [*base, "--attn", "mla", "--steps", "4", "--resume"])
    weights.write_bytes(good[weights.name])
    (out / "state.json").write_text("{not json")
    # --resume alone takes the model from the checkpoint (no size flags then).
    bare = ["train", "--seq-len", "32", "--batch-size", "4", "--quiet", "--data", str(data),
            "--out", str(out)]
    assert "corrupt checkpoint" in _error(capsys, [*bare, "--steps", "4", "--resume"])
    (out / "state.json").write_bytes(good["state.json"])
    assert _snapshot(out) == good
    # The intact checkpoint still resumes, model flags taken from it.
    assert main([*bare, "--steps", "3", "--resume"]) == 0
    assert read_state(out)["step"] == 3


def test_cosine_run_is_not_extended(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    data = tmp_path / "text.txt"
    data.write_text(TEXT)
    out = tmp_path / "run"
    base = ["train", "--attn", "mha", *CLI_SIZE, "--data", str(data), "--out", str(out),
            "--warmup-steps", "2"]
    assert main([*base, "--steps", "4"]) == 0
    capsys.readouterr()
    good = _snapshot(out)
    line = _error(capsys, [*base, "--steps", "6", "--resume"])
    assert line.startswith("latentattn: error: cannot extend a cosine run from --steps 4 to 6 "
                           "exactly: its LR depends on the total steps"), line
    assert _snapshot(out) == good
    assert "schedule is 'cosine' in the checkpoint, 'wsd' here" in _error(
        capsys, [*base, "--steps", "4", "--resume", "--schedule", "wsd"])
    assert "--decay-frac must be in [0, 1]" in _error(capsys, [*base, "--steps", "4", "--decay-frac", "2"])
    assert _snapshot(out) == good
    # A checkpoint from before --schedule existed ran cosine: it resumes with the default flags.
    state = json.loads(good["state.json"])
    for key in ("schedule", "decay_frac"):
        del state["settings"][key]
    (out / "state.json").write_text(json.dumps(state))
    assert main([*base, "--steps", "4", "--resume"]) == 0


# ---------------------------------------------------------------------------- torchrun
def _gloo() -> bool:
    return torch.distributed.is_available() and torch.distributed.is_gloo_available()


def _torchrun(cmd: list[str], timeout: float = 180) -> subprocess.CompletedProcess[str]:
    """Run ``cmd`` in its own process group; past ``timeout`` (a collective that hangs) kill the
    launcher and its ranks and fail, rather than block the suite."""
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env,
                            start_new_session=True)
    try:
        out, err = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        out, err = proc.communicate()
        pytest.fail(f"torchrun did not finish in {timeout} s (hung?):\n{err[-3000:]}")
    return subprocess.CompletedProcess(cmd, proc.returncode, out, err)


# MoE: each rank's tokens choose other experts; the router biases (all-reduced loads) and the V2
# balance loss (global f_i) must give the ranks one process's update.
TORCHRUN_MODELS = {
    "dsa": ["--attn", "dsa", *CLI_SIZE, "--dsa-warmup-steps", "2"],
    "moe": ["--model", "tiny-mla-moe", "--seq-len", "32", "--batch-size", "4", "--quiet",
            "--moe-aux-loss", "0.01", "--dtype", "float32"],
}


@pytest.mark.skipif(not _gloo(), reason="torch.distributed with the gloo backend is unavailable")
@pytest.mark.parametrize("model", list(TORCHRUN_MODELS))
@pytest.mark.parametrize("fsdp", [False, True], ids=["ddp", "fsdp"])
def test_torchrun_two_ranks_match_one_process(fsdp: bool, model: str, tmp_path: Path,
                                              capsys: pytest.CaptureFixture[str]) -> None:
    data = tmp_path / "text.txt"
    data.write_text(TEXT)
    args = ["train", *TORCHRUN_MODELS[model], "--data", str(data), "--steps", "4", "--eval-every", "2"]
    assert main([*args, "--out", str(tmp_path / "one")]) == 0
    capsys.readouterr()
    proc = _torchrun([sys.executable, "-m", "torch.distributed.run", "--standalone",
                      "--nproc_per_node", "2", "-m", "latentattn", *args, "--out", str(tmp_path / "two"),
                      *(["--fsdp"] if fsdp else [])])
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout.count("validation loss") == 1  # rank 0 reports
    one, two = read_state(tmp_path / "one"), read_state(tmp_path / "two")
    assert two["world_size"] == 2
    # DDP/FSDP average the ranks' gradients: the mean over the global batch, as one process. The
    # two differ only in summation order (each rank's mean, then all-reduce): a loss, a mean of
    # the batch's 4 x 32 token losses, within a few sqrt(terms) ulps of its size (seen: 1 ulp).
    losses_one, losses_two = torch.tensor(one["train_losses"]), torch.tensor(two["train_losses"])
    ulps = (4 * 32) ** 0.5 * torch.finfo(torch.float32).eps * float(losses_one.abs().max())
    assert float((losses_two - losses_one).abs().max()) <= 4 * ulps, (losses_one, losses_two)
    # Weights: Adam moves each by at most about lr a step whatever the gradient's size, so
    # gradients that differ by rounding can part two runs by up to 2 lr a step where a gradient
    # is near 0 (its sign then rounds either way); a wrong reduction moves every weight.
    a = load(tmp_path / "one").state_dict()
    b = load(tmp_path / "two").state_dict()
    bound = 2 * 3e-3 * 4  # 2 lr (train's default, 3e-3) x 4 steps
    for k in a:
        assert float((b[k].float() - a[k].float()).abs().max()) <= bound, k
    assert json.loads((tmp_path / "two" / "state.json").read_text())["step"] == 4


# ---------------------------------------------------------------------------- DSA retrofit
def test_retrofit_keeps_the_dense_weights_and_freezes_them_in_the_warmup() -> None:
    from latentattn.config import IndexerConfig
    from latentattn.train.dsa import retrofit_dsa, set_dsa_stage

    mla = _model("mla").eval()
    dsa = retrofit_dsa(mla, IndexerConfig(2, 24, 8), seed=3).eval()
    dense, new = dsa.state_dict(), mla.state_dict()
    assert all(torch.equal(dense[k], v) for k, v in new.items())
    fresh = [k for k in dense if k not in new]
    assert fresh and all(".indexer." in k for k in fresh)
    again = retrofit_dsa(mla, IndexerConfig(2, 24, 8), seed=4).state_dict()
    assert not all(torch.equal(dense[k], again[k]) for k in fresh)  # fresh: drawn from the seed
    set_dsa_stage(dsa, "dense")
    ids = TRAIN[:32][None]
    with torch.no_grad():
        assert torch.equal(dsa(ids), mla(ids))  # the indexer does not touch dense attention
    set_dsa_stage(dsa, "warmup")  # V3.2 stage 1: only the indexers learn
    trainable = {n for n, p in dsa.named_parameters() if p.requires_grad}
    assert trainable and trainable == {n for n in trainable if ".indexer." in n}
    assert trainable == {n for n, _ in dsa.named_parameters() if ".indexer." in n}
    for bad in (_model("mha"), dsa):
        with pytest.raises(ConfigError, match="retrofit_dsa takes a dense MLA"):
            retrofit_dsa(bad, IndexerConfig(2, 24, 8))


def test_train_retrofit_dsa_from_a_dense_run(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    data = tmp_path / "text.txt"
    data.write_text(TEXT)
    base = ["--data", str(data), "--seq-len", "32", "--batch-size", "2", "--quiet", "--eval-every", "0",
            "--dtype", "float32"]
    assert main(["train", "--attn", "mla", *CLI_SIZE, "--data", str(data), "--steps", "2",
                 "--eval-every", "0", "--out", str(tmp_path / "dense")]) == 0
    # Two steps, both in the frozen warm-up: the dense weights must come out unchanged.
    assert main(["train", "--model", str(tmp_path / "dense"), "--retrofit-dsa", "--index-topk", "4",
                 "--steps", "2", "--dsa-warmup-steps", "2", *base, "--out", str(tmp_path / "dsa")]) == 0
    dense, dsa = load(tmp_path / "dense"), load(tmp_path / "dsa")
    a = dsa.config.attention
    assert a.indexer is not None and a.indexer.index_topk == 4  # type: ignore[union-attr]
    kept = dsa.state_dict()
    assert all(torch.equal(kept[k], v) for k, v in dense.state_dict().items())
    assert read_state(tmp_path / "dsa")["settings"]["dsa_freeze_warmup"] is True
    capsys.readouterr()
    assert "--retrofit-dsa adds indexers" in cli_error(
        capsys, ["train", "--retrofit-dsa", "--attn", "mla", *base, "--out", str(tmp_path / "x")])
    assert "needs a dense MLA model" in cli_error(
        capsys, ["train", "--model", "tiny-gqa", "--retrofit-dsa", *base, "--out", str(tmp_path / "y")])


def test_a_run_stopped_with_until_resumes_as_one_run(tmp_path: Path) -> None:
    s = _settings(steps=6, eval_every=2)
    full = train(_model("mla"), TRAIN, VAL, s, out_dir=str(tmp_path / "full"), progress=False)
    cut = train(_model("mla"), TRAIN, VAL, s, out_dir=str(tmp_path / "cut"), progress=False, until=3)
    assert cut.steps_done == 3 and len(cut.train_losses) == 3 and read_state(tmp_path / "cut")["step"] == 3
    resumed = train(_model("mla", seed=1), TRAIN, VAL, s, out_dir=str(tmp_path / "cut"), resume=True,
                    progress=False)
    _assert_same_run(resumed, full, tmp_path / "cut", tmp_path / "full")
    with pytest.raises(ConfigError, match=r"until must lie in 1\.\.steps"):
        train(_model("mla"), TRAIN, VAL, s, progress=False, until=7)


def test_a_dense_run_forks_into_dsa_at_its_step(tmp_path: Path) -> None:
    """V3.2's retrofit inside one schedule: MLA trains densely to step 4 of 8, then the DSA fork
    warms its fresh indexers up to step 6 with the dense weights frozen, then trains sparse; the
    data stream and the LR schedule go on from the fork."""
    import shutil

    from latentattn.config import IndexerConfig
    from latentattn.train.dsa import retrofit_dsa

    dense_s = _settings(steps=8, eval_every=2)
    full = train(_model("mla"), TRAIN, VAL, dense_s, out_dir=str(tmp_path / "dense"), progress=False)
    train(_model("mla"), TRAIN, VAL, dense_s, out_dir=str(tmp_path / "fork"), progress=False, until=4)
    shutil.copytree(tmp_path / "fork", tmp_path / "warm")
    shutil.copytree(tmp_path / "fork", tmp_path / "bad")
    at_fork = load(tmp_path / "fork")
    s = dataclasses.replace(dense_s, dsa_warmup_steps=6, dsa_freeze_warmup=True)

    def fork(out: Path, until: int | None = None) -> tuple[Transformer, TrainResult]:
        dsa = retrofit_dsa(at_fork, IndexerConfig(2, 8, 4), seed=5)
        return dsa, train(dsa, TRAIN, VAL, s, out_dir=str(out), resume=True, retrofit=True,
                          progress=False, until=until)

    warm, warm_result = fork(tmp_path / "warm", until=6)
    before, after = at_fork.state_dict(), warm.state_dict()
    assert all(torch.equal(after[k], v) for k, v in before.items())  # frozen in the warm-up
    fresh = retrofit_dsa(at_fork, IndexerConfig(2, 8, 4), seed=5).state_dict()
    assert any(not torch.equal(after[k], fresh[k]) for k in fresh if ".indexer." in k)
    # The fork's first 4 steps are the dense run's; its warm-up steps draw the dense run's batches.
    assert warm_result.train_losses[:4] == full.train_losses[:4]
    assert warm_result.train_losses[4:6] == pytest.approx(full.train_losses[4:6], rel=0.05)
    dsa, result = fork(tmp_path / "fork")
    assert result.steps_done == 8 and len(result.train_losses) == 8
    trained = dsa.state_dict()
    assert any(not torch.equal(trained[k], v) for k, v in before.items())  # sparse: all train
    state = read_state(tmp_path / "fork")
    assert state["model"]["attention"]["indexer"]["index_topk"] == 4
    assert state["settings"]["dsa_warmup_steps"] == 6
    assert load(tmp_path / "fork").config == dsa.config
    # Bad forks: the warm-up must end past the fork; the checkpoint must be this model's MLA.
    with pytest.raises(ConfigError, match="needs dsa_warmup_steps past it"):
        train(retrofit_dsa(at_fork, IndexerConfig(2, 8, 4)), TRAIN, VAL,
              dataclasses.replace(s, dsa_warmup_steps=3), out_dir=str(tmp_path / "bad"),
              resume=True, retrofit=True, progress=False)
    with pytest.raises(CheckpointError, match="not this model's dense MLA"):
        train(_model("dsa"), TRAIN, VAL, s, out_dir=str(tmp_path / "bad"), resume=True,
              retrofit=True, progress=False)
