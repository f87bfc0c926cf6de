"""``latentattn.load``: every kind of spec, the dtype rule, the overrides, the tokenizer beside the
model, and ``train --init``."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

import latentattn
from conftest import NEAR_TIE, cli_error, min_greedy_margin
from latentattn.attention.dsa import SparseLatentAttention
from latentattn.cli import main
from latentattn.config import MLAConfig
from latentattn.errors import CheckpointError, ConfigError
from latentattn.interop.hf import config_to_hf
from latentattn.tokenizer import ByteTokenizer, HFTokenizer

WORDS = ["<eos>", "the", "latent", "cache", "is", "small", "and", "fast", "[UNK]"]


def _same_weights(a: torch.nn.Module, b: torch.nn.Module) -> bool:
    sa, sb = a.state_dict(), b.state_dict()
    return sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)


def write_word_tokenizer(path: Path) -> None:
    """A word-level tokenizer.json over WORDS (ids 0..8), built with the tokenizers library."""
    from tokenizers import Tokenizer, models, pre_tokenizers

    tok = Tokenizer(models.WordLevel({w: i for i, w in enumerate(WORDS)}, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tok.save(str(path))


@pytest.fixture(scope="module")
def hf_dir(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, latentattn.Transformer]:
    path = tmp_path_factory.mktemp("hf")
    model = latentattn.load("tiny-mla", seed=3)
    latentattn.save_pretrained(model, path)
    return path, model


# ------------------------------------------------------------------ the kinds of spec
def test_preset_is_seeded_random_init() -> None:
    a, b = latentattn.load("tiny-gqa", seed=1), latentattn.load("tiny-gqa", seed=1)
    assert _same_weights(a, b) and not _same_weights(a, latentattn.load("tiny-gqa", seed=2))
    assert not a.training and a.dtype == torch.float32


def test_model_config_spec_equals_preset() -> None:
    cfg = latentattn.get_preset("tiny-mqa")
    assert _same_weights(latentattn.load(cfg, seed=5), latentattn.load("tiny-mqa", seed=5))


def test_hf_directory_and_its_config_json(hf_dir: tuple[Path, latentattn.Transformer]) -> None:
    path, model = hf_dir
    assert _same_weights(latentattn.load(path), model)
    assert _same_weights(latentattn.load(str(path)), model)
    from_json = latentattn.load(path / "config.json", seed=0)  # the shape only: random init
    assert from_json.config.replace(name="") == model.config.replace(name="")
    assert not _same_weights(from_json, model)
    assert latentattn.load_config(path).replace(name="") == model.config.replace(name="")


def test_train_run_directory(tmp_path: Path) -> None:
    assert main(["train", "--model", "tiny-dsa", "--steps", "2", "--batch-size", "2", "--seq-len",
                 "32", "--eval-every", "0", "--out", str(tmp_path / "run"), "--quiet",
                 "--dtype", "float32"]) == 0
    model = latentattn.load(tmp_path / "run")
    from safetensors.torch import load_file

    saved = load_file(str(next((tmp_path / "run").glob("model-*.safetensors"))))
    assert all(torch.equal(model.state_dict()[k], v) for k, v in saved.items())
    layers = [b.self_attn for b in model.blocks if isinstance(b.self_attn, SparseLatentAttention)]
    assert layers and all(layer.mode == "sparse" and not layer.train_indexer for layer in layers)


def test_dtype_none_keeps_the_checkpoints_dtype(tmp_path: Path) -> None:
    bf16 = latentattn.load("tiny-mla", seed=0, dtype="bfloat16")
    latentattn.save_pretrained(bf16, tmp_path)
    assert latentattn.load(tmp_path).dtype == torch.bfloat16
    assert latentattn.load(tmp_path, dtype=torch.float32).dtype == torch.float32
    assert latentattn.load("tiny-mla").dtype == torch.float32
    with pytest.raises(ConfigError, match="dtype"):
        latentattn.load("tiny-mla", dtype="int8")


def test_bad_specs_name_what_is_wrong(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=r"unknown preset .tiny-nope.*tiny-mla"):
        latentattn.load("tiny-nope")
    with pytest.raises(CheckpointError, match="no such file"):
        latentattn.load(tmp_path / "missing" / "dir")
    with pytest.raises(CheckpointError, match=r"neither state\.json.*nor config\.json"):
        latentattn.load(tmp_path)
    (tmp_path / "bad.json").write_text("{not json")
    with pytest.raises(ConfigError, match="not valid JSON"):
        latentattn.load(tmp_path / "bad.json")


# ------------------------------------------------------------------ overrides
def test_overrides_reach_the_model() -> None:
    m = latentattn.load("tiny-dsa", seed=0, mla_impl="absorb", index_topk=3,
                        indexer_key_cache="fp8", dsa_prefill="masked", dsa_masked_max_keys=77)
    a = m.config.attention
    assert isinstance(a, MLAConfig) and a.indexer is not None
    assert (a.impl, a.indexer.index_topk, a.indexer.key_cache) == ("absorb", 3, "fp8")
    layer = m.blocks[0].self_attn
    assert isinstance(layer, SparseLatentAttention)
    assert (layer.topk, layer.prefill_form, layer.masked_prefill_max_keys) == (3, "masked", 77)
    cache = m.make_cache(1, 8)
    assert cache[0].fp8  # type: ignore[attr-defined]


def test_overrides_that_do_not_apply_are_refused() -> None:
    with pytest.raises(ConfigError, match="mla_impl applies only to MLA"):
        latentattn.load("tiny-gqa", mla_impl="absorb")
    with pytest.raises(ConfigError, match="index_topk applies only to DSA"):
        latentattn.load("tiny-mla", index_topk=4)
    with pytest.raises(ConfigError, match="dsa_prefill applies only to DSA"):
        latentattn.load("tiny-mla", dsa_prefill="masked")
    with pytest.raises(ConfigError, match="dsa_prefill must be one of"):
        latentattn.load("tiny-dsa", dsa_prefill="sometimes")
    with pytest.raises(ConfigError, match=r"unknown override.*n_expert"):
        latentattn.load("tiny-mla", n_expert=3)


def test_real_size_preset_is_refused_before_allocating() -> None:
    with pytest.raises(ConfigError, match=r"deepseek-v3 needs .* GiB of weights"):
        latentattn.load("deepseek-v3")


# ------------------------------------------------------------------ tokenizers
def test_tokenizer_beside_the_model(tmp_path: Path, hf_dir: tuple[Path, latentattn.Transformer]) -> None:
    path, _ = hf_dir
    _, tok = latentattn.load(path, with_tokenizer=True)
    assert isinstance(tok, ByteTokenizer) and tok.decode(tok.encode("héllo")) == "héllo"
    cfg = latentattn.load_config("tiny-mla").replace(vocab_size=len(WORDS))
    d = config_to_hf(cfg)
    d["eos_token_id"] = [0, 1]
    (tmp_path / "config.json").write_text(json.dumps(d))
    with pytest.raises(ConfigError, match="vocab_size >= 256"):
        latentattn.load_tokenizer(tmp_path)
    write_word_tokenizer(tmp_path / "tokenizer.json")
    tok = latentattn.load_tokenizer(tmp_path)
    assert isinstance(tok, HFTokenizer) and tok.eos_token_id == 0  # the first of a list
    assert tok.encode("the latent cache") == [1, 2, 3]


# ------------------------------------------------------------------ the CLI over load
def test_generate_takes_the_load_knobs(capsys: pytest.CaptureFixture[str],
                                       hf_dir: tuple[Path, latentattn.Transformer]) -> None:
    path, _ = hf_dir
    args = ["generate", "--model", str(path), "--prompt", "abc", "--max-new-tokens", "4"]
    outs = []
    for extra in ([], ["--mla-impl", "absorb"], ["--mla-impl", "naive", "--dtype", "float32",
                                                 "--device", "cpu"]):
        assert main([*args, *extra]) == 0
        outs.append(capsys.readouterr().out)
    # Three forms of the same model, the same greedy text (they round differently: no near-tie).
    assert min_greedy_margin(hf_dir[1], torch.tensor([list(b"abc")]), 4) > NEAR_TIE
    assert outs[0] == outs[1] == outs[2]
    assert "applies only to DSA" in cli_error(capsys, [*args, "--dsa-prefill", "masked"])
    assert "not a device" in cli_error(capsys, [*args, "--device", "gpu7"])
    if not torch.cuda.is_available():
        assert "sees no CUDA GPU" in cli_error(capsys, [*args, "--device", "cuda"])
    assert "--index-topk must be >= 1" in cli_error(
        capsys, ["info", "--model", "tiny-dsa", "--index-topk", "0"])


def test_info_reads_overrides(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["info", "--model", "tiny-dsa", "--index-topk", "5", "--indexer-keys", "fp8"]) == 0
    out = capsys.readouterr().out
    assert "top-k 5, fp8 keys" in out


def test_train_init_starts_from_the_given_weights(tmp_path: Path,
                                                  hf_dir: tuple[Path, latentattn.Transformer]) -> None:
    path, model = hf_dir
    # A learning rate so small that one step leaves the weights where they started.
    assert main(["train", "--model", str(path), "--steps", "1", "--lr", "1e-12", "--warmup-steps",
                 "0", "--batch-size", "2", "--seq-len", "32", "--out", str(tmp_path / "run"),
                 "--quiet", "--dtype", "float32"]) == 0
    trained = latentattn.load(tmp_path / "run")
    assert trained.config.replace(name="") == model.config.replace(name="")
    for k, v in model.state_dict().items():
        torch.testing.assert_close(trained.state_dict()[k], v, atol=1e-9, rtol=0)


def test_train_init_keeps_the_tokenizer(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    src = tmp_path / "src"
    src.mkdir()
    cfg = latentattn.load_config("tiny-mla").replace(vocab_size=len(WORDS))
    latentattn.save_pretrained(latentattn.load(cfg, seed=0), src)
    write_word_tokenizer(src / "tokenizer.json")
    data = tmp_path / "words.txt"
    data.write_text(" ".join(WORDS[1:-1] * 400))
    run = tmp_path / "run"
    assert main(["train", "--model", str(src), "--data", str(data), "--steps", "3", "--batch-size", "2",
                 "--seq-len", "16", "--eval-every", "0", "--out", str(run), "--quiet",
                 "--dtype", "float32"]) == 0
    assert "nats/token" in capsys.readouterr().out
    assert (run / "tokenizer.json").read_bytes() == (src / "tokenizer.json").read_bytes()
    assert isinstance(latentattn.load_tokenizer(run), HFTokenizer)
    assert main(["generate", "--model", str(run), "--prompt", "the latent", "--max-new-tokens", "3"]) == 0
    words = capsys.readouterr().out.split()
    assert len(words) == 3 and set(words) <= set(WORDS)
