"""DeepSeek-V4 models through the command line and ``latentattn.load``: generate runs tiny-v4,
the V4 knobs apply, cache forms V4 does not have are refused in one line (exit 2), and a saved
V4 model loads back to the same greedy tokens."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from conftest import cli_error
from latentattn.cli import main
from latentattn.config import V4AttentionConfig
from latentattn.model.transformer import Transformer
from latentattn.presets import get_preset


def test_generate_runs_tiny_v4(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["generate", "--model", "tiny-v4", "--prompt", "Latent", "--max-new-tokens", "6",
                 "--seed", "0", "--index-topk", "2"]) == 0
    assert capsys.readouterr().out.strip()


@pytest.mark.parametrize("flag", [["--latent-fp8"], ["--page-size", "16"], ["--indexer-keys", "fp8"],
                                  ["--mla-impl", "naive"]])
def test_cache_forms_v4_lacks_are_refused(capsys: pytest.CaptureFixture[str], flag: list[str]) -> None:
    line = cli_error(capsys, ["generate", "--model", "tiny-v4", "--prompt", "x",
                              "--max-new-tokens", "2", *flag])
    assert "tiny-v4" in line


def test_index_topk_reaches_the_csa_layers() -> None:
    cfg = get_preset("tiny-v4").replace(index_topk=3)
    assert isinstance(cfg.attention, V4AttentionConfig) and cfg.attention.index_topk == 3


def test_greedy_decode_through_the_cache_equals_the_full_forward() -> None:
    """The whole model (mHC, hash and top-k MoE, all three layer types) decodes token by token
    to the logits of one forward over the sequence, past several compression windows."""
    torch.manual_seed(0)
    model = Transformer(get_preset("tiny-v4")).eval()
    ids = torch.randint(0, model.config.vocab_size, (2, 40))
    with torch.no_grad():
        full = model(ids)
        cache = model.make_cache(2, 64)
        steps = [model(ids[:, :9], cache)] + [model(ids[:, t:t + 1], cache) for t in range(9, 40)]
    got = torch.cat(steps, dim=1)
    # Same arithmetic in another order (GEMMs of 1 row vs 40): a few fp32 ulps of the logits'
    # size per layer's reduction; 64 sqrt(dim) ulps leaves room for 5 layers' worth.
    bound = 64 * torch.finfo(torch.float32).eps * model.config.dim**0.5 * full.abs().max().item()
    assert (got - full).abs().max().item() <= bound


def test_a_saved_v4_model_loads_back(tmp_path: Path) -> None:
    from latentattn import load
    from latentattn.interop.hf import save_pretrained

    torch.manual_seed(1)
    model = Transformer(get_preset("tiny-v4")).eval()
    save_pretrained(model, tmp_path / "v4")
    back = load(str(tmp_path / "v4"))
    ids = torch.randint(0, model.config.vocab_size, (1, 23))
    with torch.no_grad():
        torch.testing.assert_close(back(ids), model(ids), rtol=0, atol=0)
