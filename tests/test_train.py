"""``latentattn.train.loop`` and ``latentattn train``: learning, exact resume, DSA stages, atomic
checkpoints, generation from a checkpoint, user errors, and torchrun (DDP / FSDP2 on gloo).

Tiny models (dim 32, 2 layers, 32-byte windows) on a few KB of CPython's help text keep the
file fast on two CPU cores.
"""

from __future__ import annotations

import itertools
import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import torch

from conftest import cli_error
from latentattn.attention.dsa import SparseLatentAttention
from latentattn.cli import main
from latentattn.data import byte_tokens, default_text, train_val_split
from latentattn.model.transformer import Transformer
from latentattn.train import checkpoint, loop
from latentattn.train.family import ATTN_KINDS, FamilySize, family_config
from latentattn.train.loop import TrainSettings, model_from_checkpoint, read_state, train

SIZE = FamilySize(dim=32, n_layers=2, n_heads=2, seq_len=32, kv_lora_rank=16, q_lora_rank=16,
                  qk_rope_head_dim=8, index_n_heads=2, index_head_dim=8, index_topk=8)
TEXT = default_text()[:6000]
TRAIN, VAL = train_val_split(byte_tokens(TEXT))
# The same model through the CLI (flags it has; the rest of FamilySize keeps its defaults).
CLI_SIZE = ["--dim", "32", "--layers", "2", "--heads", "2", "--seq-len", "32", "--kv-lora-rank", "16",
            "--index-topk", "8", "--batch-size", "4", "--quiet"]


@pytest.fixture(autouse=True)
def _one_thread() -> Any:
    # Matrices of 32 x 32: a second intra-op thread costs more than it saves (and on a busy
    # 2-core machine it spins against the other process).
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def _model(kind: str, seed: int = 0) -> Transformer:
    torch.manual_seed(seed)
    return Transformer(family_config(kind, SIZE))


def _settings(**changes: Any) -> TrainSettings:
    base: dict[str, Any] = dict(steps=6, batch_size=4, seq_len=32, warmup_steps=2, eval_every=0,
                                eval_batches=2)
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


def test_lr_schedule() -> None:
    s = _settings(steps=10, warmup_steps=3, lr=1.0, min_lr_ratio=0.1)
    lrs = [loop.lr_at(i, s) for i in range(10)]
    assert lrs[:4] == pytest.approx([1 / 3, 2 / 3, 1.0, 1.0])
    assert lrs[-1] == pytest.approx(0.1)
    assert all(a >= b for a, b in itertools.pairwise(lrs[2:]))


# ---------------------------------------------------------------------------- exact resume
class _Stop(Exception):
    """Stands for a crash or Ctrl-C right after a checkpoint."""


@pytest.mark.parametrize("kind", ["mha", "dsa"])
def test_resume_after_a_stop_reproduces_losses(kind: str, tmp_path: Path,
                                               monkeypatch: pytest.MonkeyPatch) -> None:
    # DSA: the switch to top-k (after step 4) happens in the resumed part.
    s = _settings(steps=6, checkpoint_every=3, eval_every=2, dsa_warmup_steps=4)
    full = train(_model(kind), TRAIN, VAL, s, out_dir=str(tmp_path / "full"), progress=False)

    real_save = loop.save_checkpoint

    def save_then_stop(out_dir: Path, model_t: Any, opt_t: Any, state: dict[str, Any]) -> None:
        real_save(out_dir, model_t, opt_t, state)
        if state["step"] == 3:
            raise _Stop

    monkeypatch.setattr(loop, "save_checkpoint", save_then_stop)
    with pytest.raises(_Stop):
        train(_model(kind), TRAIN, VAL, s, out_dir=str(tmp_path / "cut"), progress=False)
    monkeypatch.undo()
    assert read_state(tmp_path / "cut")["step"] == 3
    # Another init: the resumed run must take everything from the checkpoint.
    resumed = train(_model(kind, seed=1), TRAIN, VAL, s, out_dir=str(tmp_path / "cut"), resume=True,
                    progress=False)
    assert torch.equal(torch.tensor(resumed.train_losses), torch.tensor(full.train_losses))
    assert resumed.val_losses == full.val_losses
    for a, b in zip(model_from_checkpoint(tmp_path / "cut").state_dict().values(),
                    model_from_checkpoint(tmp_path / "full").state_dict().values(), strict=True):
        assert torch.equal(a, b)


@pytest.mark.parametrize("kind", ["mha", "mla", "dsa"])
def test_resume_to_more_steps(kind: str, tmp_path: Path) -> None:
    # A constant LR after warm-up (min_lr_ratio 1): the schedule does not depend on --steps, so
    # 3 steps then 3 more equal 6 at once.
    s6 = _settings(steps=6, min_lr_ratio=1.0, dsa_warmup_steps=2)
    full = train(_model(kind), TRAIN, VAL, s6, progress=False)
    train(_model(kind), TRAIN, VAL, _settings(steps=3, min_lr_ratio=1.0, dsa_warmup_steps=2),
          out_dir=str(tmp_path), progress=False)
    resumed = train(_model(kind, seed=1), TRAIN, VAL, s6, out_dir=str(tmp_path), resume=True,
                    progress=False)
    assert torch.equal(torch.tensor(resumed.train_losses), torch.tensor(full.train_losses))
    assert read_state(tmp_path)["step"] == 6


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
    model_from_checkpoint(tmp_path / "b")  # loadable, hashes match
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
    assert first.err == ""  # no random-init warning: these are trained weights
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
    assert "unknown --attn 'mxa'" in _error(capsys, ["train", "--attn", "mxa", "--out", str(tmp_path)])
    assert "vocab_size" in _error(capsys, ["train", "--preset", "deepseek-v3", "--out", str(tmp_path)])
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


# ---------------------------------------------------------------------------- torchrun
def _gloo() -> bool:
    return torch.distributed.is_available() and torch.distributed.is_gloo_available()


@pytest.mark.skipif(not _gloo(), reason="torch.distributed with the gloo backend is unavailable")
@pytest.mark.parametrize("fsdp", [False, True], ids=["ddp", "fsdp"])
def test_torchrun_two_ranks_match_one_process(fsdp: bool, tmp_path: Path,
                                              capsys: pytest.CaptureFixture[str]) -> None:
    data = tmp_path / "text.txt"
    data.write_text(TEXT)
    args = ["train", "--attn", "dsa", *CLI_SIZE, "--data", str(data), "--steps", "4",
            "--dsa-warmup-steps", "2", "--eval-every", "2"]
    assert main([*args, "--out", str(tmp_path / "one")]) == 0
    capsys.readouterr()
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
           "-m", "latentattn", *args, "--out", str(tmp_path / "two"), *(["--fsdp"] if fsdp else [])]
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout.count("validation loss") == 1  # rank 0 reports
    one, two = read_state(tmp_path / "one"), read_state(tmp_path / "two")
    assert two["world_size"] == 2
    # DDP/FSDP average the ranks' gradients: the mean over the global batch, as one process.
    torch.testing.assert_close(torch.tensor(two["train_losses"]), torch.tensor(one["train_losses"]),
                               atol=1e-5, rtol=0)
    a = model_from_checkpoint(tmp_path / "one").state_dict()
    b = model_from_checkpoint(tmp_path / "two").state_dict()
    for k in a:
        torch.testing.assert_close(b[k], a[k], atol=1e-4, rtol=1e-4)
    assert json.loads((tmp_path / "two" / "state.json").read_text())["step"] == 4
