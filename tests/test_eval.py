"""``latentattn eval`` and :func:`latentattn.perplexity.evaluate_text`: the loss is the mean
next-token cross-entropy over every predicted token, computed by hand here; nats per byte
follow the tokenizer; bad input gives one line and exit 2."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from conftest import cli_error
from latentattn import load
from latentattn.cli import main
from latentattn.perplexity import evaluate_text
from latentattn.tokenizer import ByteTokenizer

TEXT = "The quick brown fox jumps over the lazy dog. " * 20 + "Done."


def test_loss_is_the_mean_over_every_predicted_token() -> None:
    model = load("tiny-gqa", seed=0)
    r = evaluate_text(model, ByteTokenizer(), TEXT, seq_len=64, batch_size=3)
    ids = torch.tensor(list(TEXT.encode()))
    n = (len(ids) - 1) // 64
    nats = 0.0
    with torch.no_grad():
        for i in range(n):  # window i: tokens [64 i, 64 (i + 1)], one at a time
            w = ids[64 * i : 64 * (i + 1) + 1][None]
            nats += float(F.cross_entropy(model(w[:, :-1])[0], w[0, 1:], reduction="sum"))
    assert (r.windows, r.tokens, r.bytes) == (n, 64 * n, 64 * n)
    assert math.isclose(r.nats, nats, rel_tol=1e-5)
    assert math.isclose(r.perplexity, math.exp(nats / (64 * n)), rel_tol=1e-5)
    assert r.nats_per_byte == r.loss_per_token  # bytes are tokens
    assert math.isclose(r.bits_per_byte, r.nats_per_byte / math.log(2))
    assert evaluate_text(model, ByteTokenizer(), TEXT, seq_len=64, max_tokens=129).windows == 2


def test_eval_cli(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    data = tmp_path / "text.txt"
    data.write_text(TEXT)
    assert main(["eval", "--model", "tiny-gqa", "--data", str(data), "--seq-len", "64", "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["tokens"] == 64 * ((len(TEXT) - 1) // 64) and 0 < out["nats_per_byte"] < 10
    assert main(["eval", "--model", "tiny-gqa", "--data", str(data), "--seq-len", "64", "--quiet"]) == 0
    assert "perplexity" in capsys.readouterr().out
    for argv, message in [
        (["--seq-len", "0"], "--seq-len must be >= 1"),
        (["--seq-len", "4096"], "exceeds the model's max_seq_len 512"),
        (["--seq-len", "64", "--max-tokens", "50"], "fewer than one window of 64 + 1"),
        (["--max-tokens", "1"], "--max-tokens must be >= 2"),
    ]:
        assert message in cli_error(capsys, ["eval", "--model", "tiny-gqa", "--data", str(data), *argv])
    assert "does not exist" in cli_error(capsys, ["eval", "--model", "tiny-gqa", "--data",
                                                  str(tmp_path / "none.txt")])
