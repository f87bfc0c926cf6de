"""``latentattn compare``: tiny in-process runs write well-formed results for every variant; the
variants' parameter counts match; sweeps add their points and the Pareto plot; bad inputs give
one line and exit 2 with nothing written."""

from __future__ import annotations

import dataclasses
import itertools
import json
import math
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch

from conftest import cli_error
from latentattn import Transformer
from latentattn.calc.kv_bytes import cache_bytes_per_token_per_layer
from latentattn.cli import main
from latentattn.cli.compare import MAX_PASSES
from latentattn.compare.lr import LRError, check_labels, on_edge, parse_grid, parse_lrs, pick
from latentattn.compare.measure import kv_bytes_per_token
from latentattn.compare.report import CompareReport, SeedRun, VariantResult
from latentattn.compare.stats import Paired, Summary, paired, pareto_front
from latentattn.compare.sweep import SweepError, parse_sweeps, sweep_points
from latentattn.compare.table import verdict_lines
from latentattn.compare.variants import ABLATIONS, build_variants, family_size, scale_latent_norms
from latentattn.errors import ConfigError
from latentattn.train.family import FamilySize

KINDS = ["mha", "mqa", "gqa", "mla", "dsa"]
# One LR for all: no pilots unless a test asks for a grid.
TINY = ["--steps", "8", "--dim", "32", "--layers", "2", "--seq-len", "32", "--batch-size", "2",
        "--lr", "3e-3", "--contexts", "16,32", "--quiet"]
PNG = b"\x89PNG\r\n\x1a\n"


@pytest.fixture(autouse=True)
def _one_thread() -> Iterator[None]:
    # Tiny matrices: a second thread only adds synchronisation, and on a loaded 2-core machine
    # oversubscribed threads make these runs several times slower.
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture
def text_file(tmp_path: Path) -> Path:
    path = tmp_path / "text.txt"
    path.write_text("The quick brown fox jumps over the lazy dog. Pack my box with five dozen "
                    "liquor jugs. " * 100)
    return path


def _run(tmp_path: Path, text_file: Path, *extra: str) -> tuple[dict, Path]:
    out = tmp_path / "out"
    assert main(["compare", "--data", str(text_file), "--out", str(out), *TINY, *extra]) == 0
    return json.loads((out / "results.json").read_text()), out


def test_tiny_run_writes_every_variant(tmp_path: Path, text_file: Path,
                                       capsys: pytest.CaptureFixture[str]) -> None:
    data, out = _run(tmp_path, text_file, "--seeds", "2")
    variants = {v["label"]: v for v in data["variants"]}
    assert list(variants) == [*KINDS, "dsa-retrofit", "v4", "control"]
    mha = variants["mha"]
    # tiny family: 4 heads of 8, d_c 16, d_r 4, indexer key 8, 2 layers, fp32 (4 B/value); the
    # control's latent is an eighth of a head, d_c 1. V4 (layers CSA, HCA; D 16, d_I 8, W 4, m 4,
    # m' 8) allocates at the 32-token window: CSA 4 * 16 window + 8 * 16 entries + 2 rings of
    # 8 x 32 (pending kv, gate) + the indexer's 8 * 8 + 2 * 8 * 16 = 1,024 values; HCA 4 * 16 +
    # 4 * 16 + 2 * 8 * 16 = 384: (1,024 + 384) / 32 tokens / 2 layers = 22 values a layer.
    expected_kv_bytes = {"mha": 2 * 4 * 8, "mqa": 2 * 8, "gqa": 2 * 2 * 8, "mla": 16 + 4,
                         "dsa": 16 + 4 + 8, "dsa-retrofit": 16 + 4 + 8, "control": 1 + 4, "v4": 22}
    mla_kv = 32 * (16 + 4) + 16 + 16 * 4 * (8 + 8)  # kv_a_proj_with_mqa, kv_a_layernorm, kv_b_proj
    expected_kv_params = {"mha": 2 * 32 * 32, "mqa": 2 * 32 * 8, "gqa": 2 * 32 * 16,
                          "mla": mla_kv, "dsa": mla_kv + 32 * 8 + 2 * 8,  # + indexer wk, k_norm
                          "dsa-retrofit": mla_kv + 32 * 8 + 2 * 8,
                          "control": 32 * (1 + 4) + 1 + 1 * 4 * (8 + 8),
                          # the mean of its CSA and HCA layers (tests/test_compare_v4.py)
                          "v4": (3816 + 1696) // 2}
    assert variants["control"]["control"] and variants["control"]["latent"] == {"kv_lora_rank": 1}
    assert data["control"] == "control" and isinstance(data["control_resolved"], bool)
    if not data["control_resolved"]:
        assert "equivalent" not in {t["verdict"] for t in data["vs_mha"].values()}
    for label, v in variants.items():
        assert v["kv_bytes_per_token"] == expected_kv_bytes[label] * 4 * 2, label
        assert v["kv_bytes_per_token_bf16"] == expected_kv_bytes[label] * 2 * 2, label
        assert v["kv_params_per_layer"] == expected_kv_params[label], label
        assert abs(v["params_vs_mha"]) <= 0.03 or label in ("control", "dsa-retrofit")
        assert v["kv_bytes_ratio_vs_mha"] == v["kv_bytes_per_token"] / mha["kv_bytes_per_token"]
        assert [r["seed"] for r in v["runs"]] == [0, 1]
        assert all(len(r["train_losses"]) == 8 and r["train_tokens_per_s"] > 0 for r in v["runs"])
        loss = v["val_loss"]
        assert loss["n"] == 2 and loss["std"] is not None and 0 < loss["mean"] < 10
        assert math.isclose(v["bits_per_byte"]["mean"], loss["mean"] / math.log(2))
        assert set(v["decode_tokens_per_s"]) == {"16", "32"}
        assert all(x > 0 for x in v["decode_tokens_per_s"].values())
        assert v["val_curve_mean"] and v["val_curve_mean"][-1][0] == 8
        if label in ("dsa", "dsa-retrofit", "v4"):
            assert len(v["dsa_recall"]) == (1 if label == "v4" else 2)  # per (V4: CSA) layer
            for layer in v["dsa_recall"]:
                assert set(layer) == {"indexer", "recent", "uniform"}
                assert all(0 < x <= 1 + 1e-6 for x in layer.values())
            assert label == "v4" or v["dsa_val_loss_dense"]["n"] == 2
        else:
            assert v["dsa_recall"] is None
    assert data["margin"] == 0.02 and "paired by seed" in data["rule"]
    assert data["tokens_per_run"] == 8 * 2 * 32 and data["epochs"] == 8 * 2 * 32 / data["train_tokens"]
    assert all(v["train_flops_per_token"] > 0 and v["train_val_gap"]["n"] == 2 for v in data["variants"])
    assert set(data["horizon"]) == set(KINDS) - {"mha"} | {"control", "v4"}  # a retrofit's half is MLA's
    assert set(data["vs_mha"]) == set(KINDS) - {"mha"} | {"control", "dsa-retrofit", "v4"}
    retro, mla = variants["dsa-retrofit"], variants["mla"]
    assert retro["retrofit_of"] == "mla" and retro["lr"] == mla["lr"]
    assert retro["dsa_density"]["topk"] == 2 and 0 < retro["dsa_density"]["per_query"] < 0.25
    vs_dense = data["vs_dense"]["dsa-retrofit"]
    assert vs_dense["dense"] == "mla" and vs_dense["differences"] == [
        a["val_loss"] - b["val_loss"] for a, b in zip(retro["runs"], mla["runs"], strict=True)]
    for a, b in zip(retro["runs"], mla["runs"], strict=True):  # forked at step 6 of 8
        assert a["train_losses"][:6] == b["train_losses"][:6] and a["val_curve"][:2] == b["val_curve"][:2]
    by_label = {v["label"]: v for v in data["variants"]}
    for label, test in data["vs_mha"].items():
        assert test["seeds"] == [0, 1] and test["verdict"] in ("better", "worse", "equivalent",
                                                                "inconclusive")
        own, ref = by_label[label]["runs"], by_label["mha"]["runs"]
        assert test["differences"] == [a["val_loss"] - b["val_loss"] for a, b in zip(own, ref, strict=True)]
    assert data["command"].startswith("latentattn compare ") and "--steps 8 " in data["command"]
    assert "--retrofit-at 0.75 --retrofit-warmup 0.05" in data["command"]
    md = (out / "results.md").read_text()
    for name in ("MHA", "MQA", "GQA-2", "MLA", "MLA+DSA", "| V4 |", "KV params / layer", "bits/byte",
                 "decode tok/s @16", "decode tok/s @32", "vs MHA: Δ [95% CI]", "verdict",
                 "per seed", "| seed 0 | seed 1 |", "Scale:", "MFLOP/token"):
        assert name in md
    assert "±" in md
    for png in ("loss_curves.png", "quality_vs_kv.png", "vs_mha.png", "decode_speed.png"):
        assert (out / png).read_bytes()[:8] == PNG
    assert not (out / "sweep_pareto.png").exists()
    assert not [p for p in out.iterdir() if p.name.startswith(".")]  # no temp files left
    printed = capsys.readouterr().out
    assert "| mechanism |" in printed and "MLA+DSA" in printed


def _outcome(data: dict) -> dict:
    """What a run's results are, without how fast it ran."""
    keep = ("label", "params", "kv_params_per_layer", "kv_bytes_per_token", "val_loss")
    return {v["label"]: {**{k: v[k] for k in keep},
                         "runs": [(r["seed"], r["val_loss"], r["train_losses"], r["val_curve"])
                                  for r in v["runs"]]}
            for v in data["variants"]} | {"vs_mha": data["vs_mha"]}


def test_stopped_compare_continues_where_it_stopped(tmp_path: Path, text_file: Path,
                                                     monkeypatch: pytest.MonkeyPatch,
                                                     capsys: pytest.CaptureFixture[str]) -> None:
    from latentattn.compare import run as run_mod

    whole, _ = _run(tmp_path / "whole", text_file, "--seeds", "2")
    real, done = run_mod._train_one, []

    def stop_after_three(*args: object, **kwargs: object) -> object:
        if len(done) == 3:
            raise KeyboardInterrupt  # Ctrl-C during the fourth run
        done.append(args[0])
        return real(*args, **kwargs)  # type: ignore[arg-type]

    monkeypatch.setattr(run_mod, "_train_one", stop_after_three)
    out = tmp_path / "cut" / "out"
    argv = ["compare", "--data", str(text_file), "--out", str(out), *TINY, "--seeds", "2"]
    assert main(argv) == 130 and len(list((out / "runs").iterdir())) == 3
    assert not (out / "results.json").exists()
    monkeypatch.undo()
    capsys.readouterr()
    trained = []
    monkeypatch.setattr(run_mod, "_train_one", lambda *a, **k: trained.append(a[0]) or real(*a, **k))
    assert main(argv) == 0
    assert "3 of 16 runs already finished" in capsys.readouterr().err
    assert len(trained) == 16 - 3  # only the missing runs were trained
    resumed = json.loads((out / "results.json").read_text())
    assert _outcome(resumed) == _outcome(whole)

    # A protocol file from before a setting existed still matches (the field at its old value).
    proto = json.loads((out / "protocol.json").read_text())
    del proto["settings"]["train"]["dsa_freeze_warmup"]
    (out / "protocol.json").write_text(json.dumps(proto))
    trained.clear()
    assert main(argv) == 0 and trained == []
    capsys.readouterr()
    # Another protocol in the same --out: refused, and the finished runs are kept.
    kept = {p.name: p.read_bytes() for p in (out / "runs").iterdir()}
    msg = cli_error(capsys, [*argv, "--steps", "9"])
    assert "holds results of another protocol" in msg and "steps" in msg
    assert {p.name: p.read_bytes() for p in (out / "runs").iterdir()} == kept
    trained.clear()
    assert main([*argv, "--restart", "--seeds", "1", "--no-control"]) == 0
    assert len(trained) == 7


def test_lr_pilot_picks_the_lowest_pilot_loss(tmp_path: Path, text_file: Path) -> None:
    data, out = _run(tmp_path, text_file, "--seeds", "1", "--lr-grid", "3e-2,1e-3",
                     "--lr", "mha=3e-3", "--no-control", "--no-v4", "--lr-extend", "0")
    by_label = {v["label"]: v for v in data["variants"]}
    assert by_label["mha"]["lr"] == 3e-3 and by_label["mha"]["lr_source"] == "pinned"
    assert by_label["mha"]["pilot_losses"] == {}
    for label in ("mqa", "gqa", "mla", "dsa"):
        v = by_label[label]
        losses = {float(k): x for k, x in v["pilot_losses"].items()}
        assert set(losses) == {1e-3, 3e-2} and v["lr_source"] == "pilot"
        assert v["lr"] == min(losses, key=lambda k: losses[k])
    assert data["settings"]["lr_grid"] == [1e-3, 3e-2] and data["settings"]["lrs"] == {"mha": 3e-3}
    # kept (a rerun does not redo them): 4 variants x 2 LRs x 2 pilot seeds
    assert len(list((out / "runs").glob("*pilot-lr=*"))) == 4 * 2 * 2
    md = (out / "results.md").read_text()
    assert "LR pilot" in md and "(pinned)" in md and "(pilot)" in md


def test_lr_parsing_and_pick() -> None:
    assert parse_grid("4e-3, 1e-3,2e-3,1e-3") == (1e-3, 2e-3, 4e-3)
    assert parse_lrs("2e-3") == (2e-3, {})
    assert parse_lrs("mha=3e-3, mla=1e-3") == (None, {"mha": 3e-3, "mla": 1e-3})
    assert pick({1e-3: 1.5, 2e-3: 1.4, 4e-3: 1.4}) == 2e-3  # a tie goes to the smaller LR
    assert on_edge((1e-3, 2e-3, 4e-3), 4e-3) and not on_edge((1e-3, 2e-3, 4e-3), 2e-3)
    for bad, msg in [("0,1e-3", "must be positive"), ("x", "not a number"), (",", "no values")]:
        with pytest.raises(LRError, match=msg):
            parse_grid(bad)
    for bad, msg in [("mha=", "not a number"), ("=1e-3", "LABEL=VALUE"), ("mha=1,mha=2", "twice"),
                     ("-1", "must be positive")]:
        with pytest.raises(LRError, match=msg):
            parse_lrs(bad)
    with pytest.raises(LRError, match="nope, which is not a variant"):
        check_labels({"nope": 1e-3}, ["mha", "mla"])


def test_kv_bytes_equal_formula() -> None:
    """The allocated bytes the report uses agree with the kv-cache formula (fp32 here)."""
    for v in build_variants(family_size(32, 2, 32), v4=False):  # V4's: tests/test_compare_v4.py
        model = Transformer(v.config)
        assert kv_bytes_per_token(model) == 2 * cache_bytes_per_token_per_layer(v.config, 4)


def test_sweep_adds_points_and_pareto(tmp_path: Path, text_file: Path,
                                      capsys: pytest.CaptureFixture[str]) -> None:
    data, out = _run(tmp_path, text_file, "--seeds", "1", "--sweep", "kv_lora_rank=8,16",
                     "--sweep", "index_topk=2,8", "--no-control", "--no-retrofit", "--no-v4")
    labels = [v["label"] for v in data["variants"]]
    # the tiny family's own values are kv_lora_rank 16 and index_topk 2: those points are the
    # base MLA / DSA variants and are not trained twice
    assert labels == [*KINDS, "mla[kv_lora_rank=8]", "dsa[kv_lora_rank=8,index_topk=2]",
                      "dsa[kv_lora_rank=8,index_topk=8]", "dsa[kv_lora_rank=16,index_topk=8]"]
    by_label = {v["label"]: v for v in data["variants"]}
    assert by_label["mla[kv_lora_rank=8]"]["latent"] == {"kv_lora_rank": 8}
    assert by_label["mla[kv_lora_rank=8]"]["kv_bytes_per_token"] == (8 + 4) * 4 * 2
    assert by_label["dsa"]["latent"] == {"kv_lora_rank": 16, "index_topk": 2}
    assert all(abs(v["params_vs_mha"]) <= 0.03 for v in data["variants"])
    front = data["pareto_front"]
    assert front and set(front) <= set(labels)
    points = [(by_label[f]["kv_bytes_per_token"], by_label[f]["val_loss"]["mean"]) for f in front]
    assert points == sorted(points)  # fewer bytes first, and each step down in loss
    assert all(b[1] < a[1] for a, b in itertools.pairwise(points))
    assert (out / "sweep_pareto.png").read_bytes()[:8] == PNG
    assert {t["verdict"] for t in data["vs_mha"].values()} == {"inconclusive"}  # one seed
    assert all(t["ci95"] is None for t in data["vs_mha"].values())
    md = (out / "results.md").read_text()
    assert "One seed gives no interval" in md
    assert data["control"] is None and "No positive control was run" in md
    assert "Pareto front" in capsys.readouterr().out


@pytest.mark.parametrize("size", [FamilySize(), family_size(), family_size(32, 2, 32),
                                  family_size(128, 4, 128)])
def test_parameter_counts_matched(size: FamilySize) -> None:
    sweeps = parse_sweeps(["kv_lora_rank=8,16,32,64", "index_topk=16,32"])
    variants = build_variants(size, sweeps, control=False, retrofit=False)
    counts = {v.label: Transformer(v.config).num_parameters() for v in variants}
    mha = counts["mha"]
    assert {v.kind for v in variants} == {*KINDS, "v4"}
    for label, n in counts.items():
        assert abs(n - mha) / mha <= 0.03, (label, n, mha)
    widths = {v.label: v.config.intermediate_size for v in variants}
    assert widths["mqa"] > widths["mha"]  # MQA's small K/V leave room for a wider FFN


def test_control_is_mla_with_a_starved_latent() -> None:
    # Nothing but the latent differs from the MLA variant: strictly less capacity, fewer params.
    mla, control = (v for v in build_variants(family_size()) if v.label in ("mla", "control"))
    assert control.control and control.config.attention.kv_lora_rank == 4  # type: ignore[union-attr]
    same = dataclasses.replace(control.config.attention, kv_lora_rank=64)
    assert control.config.replace(attention=same, name="mla") == mla.config
    assert Transformer(control.config).num_parameters() < Transformer(mla.config).num_parameters()


def test_retrofit_is_the_mla_variant_with_indexers() -> None:
    """The retrofit forks the MLA runs, so its model must be MLA's (FFN width included) plus the
    family's indexer: every MLA weight maps onto it and only indexer weights are new."""
    size = family_size()
    variants = {v.label: v for v in build_variants(size)}
    mla, retro = variants["mla"], variants["dsa-retrofit"]
    assert retro.retrofit_of == "mla" and retro.kind == "dsa" and "retrofit" in retro.mechanism
    a = retro.config.attention
    assert a.indexer is not None and a.indexer.index_topk == size.index_topk == 16  # type: ignore[union-attr]
    plain = dataclasses.replace(a, indexer=None)
    assert retro.config.replace(attention=plain, name="mla") == mla.config
    dense, sparse = Transformer(mla.config).state_dict(), Transformer(retro.config).state_dict()
    assert set(dense) < set(sparse) and all(".indexer." in k for k in set(sparse) - set(dense))
    assert list(variants).index("dsa-retrofit") > list(variants).index("mla")


def test_ablations_run(tmp_path: Path, text_file: Path) -> None:
    data, out = _run(tmp_path, text_file, "--seeds", "1", "--ablations", "--no-control", "--no-retrofit",
                     "--no-v4")
    labels = [v["label"] for v in data["variants"]]
    assert labels == [*KINDS, *ABLATIONS] and "--ablations" in data["command"]
    assert "MLA (no query compression)" in (out / "results.md").read_text()


def test_ablations() -> None:
    variants = {v.label: v for v in build_variants(family_size(), ablations=True)}
    noq, same = variants["mla-noq"].config, variants["mla-mqa-bytes"].config
    assert noq.attention.q_lora_rank is None  # type: ignore[union-attr]
    assert cache_bytes_per_token_per_layer(same) == cache_bytes_per_token_per_layer(variants["mqa"].config)
    mha = Transformer(variants["mha"].config).num_parameters()
    for cfg in (noq, same):
        assert abs(Transformer(cfg).num_parameters() - mha) / mha <= 0.03
    assert "no query compression" in variants["mla-noq"].mechanism
    scaled = variants["mla-scaled"]
    assert scaled.init == "latent-gain" and scaled.config.replace(name="mla") == variants["mla"].config
    torch.manual_seed(0)
    plain = Transformer(scaled.config)
    gained = Transformer(scaled.config)
    gained.load_state_dict(plain.state_dict())
    scale_latent_norms(gained)
    x = torch.randn(1, 5, 128)  # dim 128, d_c = d_q = 64: sqrt(2) after each latent norm
    for a, b in zip(plain.blocks, gained.blocks, strict=True):
        assert torch.equal(b.self_attn.kv_a_layernorm.weight, torch.full((64,), math.sqrt(2)))
        assert torch.equal(b.self_attn.q_a_layernorm.weight, torch.full((64,), math.sqrt(2)))
        _, c_plain = a.self_attn.project_query(x)
        _, c_gained = b.self_attn.project_query(x)
        torch.testing.assert_close(c_gained, math.sqrt(2) * c_plain)


def test_family_size_default_is_family_default() -> None:
    assert family_size() == FamilySize()
    assert family_size(32, 2, 32).index_topk == 2  # a sixteenth of the window: 23% per query


def test_parse_sweeps() -> None:
    assert parse_sweeps(["kv_lora_rank=32,8,8"]) == {"kv_lora_rank": (8, 32)}
    joined = parse_sweeps(["kv_lora_rank=8,16,index_topk=16,32"])
    assert joined == parse_sweeps(["kv_lora_rank=8,16", "index_topk=16,32"])
    points = sweep_points(joined)
    assert [p.label for p in points if p.kind == "mla"] == ["mla[kv_lora_rank=8]", "mla[kv_lora_rank=16]"]
    assert len([p for p in points if p.kind == "dsa"]) == 4  # the grid
    assert [p.kind for p in sweep_points(parse_sweeps(["index_topk=4"]))] == ["dsa"]
    for bad, msg in [(["q_lora_rank=8"], "unknown name"), (["kv_lora_rank=8,x"], "not an integer"),
                     (["kv_lora_rank=0"], "positive"), (["8,16"], "name=v1"),
                     (["kv_lora_rank="], "no values"), (["index_topk=8", "index_topk=16"], "twice")]:
        with pytest.raises(SweepError, match=msg):
            parse_sweeps(bad)


def test_paired_statistics_on_known_values() -> None:
    # d = (0.01, 0.03, 0.02, 0.04, 0.00): mean 0.02, s_d = sqrt(0.001 / 4) = 0.015811, se 0.0070711;
    # t(0.975, 4) = 2.7764, t(0.95, 4) = 2.1318 (tables). 95% CI 0.02 +/- 0.019632: above 0.
    worse = paired({s: 1.0 + d for s, d in enumerate((0.01, 0.03, 0.02, 0.04, 0.00))},
                   dict.fromkeys(range(5), 1.0), margin=0.02)
    assert worse.n == 5 and worse.mean == pytest.approx(0.02)
    assert worse.std == pytest.approx(0.0158114, abs=1e-6)
    assert worse.interval(0.95) == pytest.approx((0.000368, 0.039632), abs=2e-6)
    assert worse.interval(0.90) == pytest.approx((0.004925, 0.035075), abs=2e-6)
    assert worse.p_value == pytest.approx(0.0474, abs=5e-4)  # t = 2.828, df 4
    assert worse.tost_p == pytest.approx(0.5)  # the mean sits on the margin
    assert worse.verdict == "worse"
    better = Paired(worse.seeds, tuple(-d for d in worse.differences), 0.02)
    assert better.verdict == "better" and better.interval() == pytest.approx((-0.039632, -0.000368), abs=2e-6)
    # mean 0, s_d 0.0015811: the 90% interval +/- 0.0015075 lies well inside +/- 0.02.
    same = Paired((0, 1, 2, 3, 4), (0.001, -0.002, 0.0, 0.002, -0.001), 0.02)
    assert same.interval(0.90) == pytest.approx((-0.0015075, 0.0015075), abs=2e-7)
    assert same.verdict == "equivalent" and same.tost_p < 1e-5
    # Significantly above 0 but far inside the margin: equivalent by the margin's definition.
    tiny = Paired((0, 1, 2, 3, 4), (0.005, 0.006, 0.005, 0.006, 0.005), 0.02)
    assert tiny.interval(0.95)[0] > 0 and tiny.verdict == "equivalent"  # type: ignore[index]
    wide = Paired((0, 1, 2), (0.05, -0.04, 0.01), 0.02)
    assert wide.verdict == "inconclusive"
    one = paired({0: 1.2, 1: 1.3}, {1: 1.1, 2: 1.0}, 0.02)  # only seed 1 is shared
    assert one.seeds == (1,) and one.interval() is None and one.verdict == "inconclusive"
    assert "no interval" in one.fmt()
    with pytest.raises(ConfigError, match="margin"):
        Paired((0,), (0.0,), 0.0)


def _result(label: str, losses: list[float], control: bool = False) -> VariantResult:
    runs = [SeedRun(seed=i, val_loss=x, train_tokens_per_s=1.0, seconds=1.0, steps_done=1,
                    train_losses=[x], val_curve=[(1, x)]) for i, x in enumerate(losses)]
    return VariantResult(label=label, kind="mla", mechanism=label.upper(), sweep={}, latent={},
                         reference=False, params=1, ffn_width=1, n_layers=1, kv_params_per_layer=1,
                         kv_bytes_per_token=1.0, kv_bytes_per_token_bf16=1.0, kv_dtype="float32",
                         decode_tokens_per_s={}, runs=runs, control=control)


def test_no_equivalence_unless_the_control_is_caught() -> None:
    mha = [1.000, 1.010, 1.020, 1.030, 1.040]
    close = [x + d for x, d in zip(mha, (0.001, -0.002, 0.0, 0.002, -0.001), strict=True)]
    report = CompareReport(machine={}, settings={"margin": 0.02, "train": {"steps": 1}}, data="",
                           data_bytes=0, command="")
    report.variants = [_result("mha", mha), _result("mla", close)]
    assert report.control_resolved is None and report.verdict("mla") == "equivalent"
    missed = [x + d for x, d in zip(mha, (0.05, -0.04, 0.01, 0.0, 0.02), strict=True)]
    report.variants.append(_result("control", missed, control=True))
    assert report.control_resolved is False
    assert report.versus_mha("mla").verdict == "equivalent" and report.verdict("mla") == "inconclusive"
    report.variants[-1] = _result("control", [x + 0.1 + 0.001 * i for i, x in enumerate(mha)], control=True)
    assert report.control_resolved is True and report.verdict("mla") == "equivalent"
    assert "came out worse than MHA" in "\n".join(verdict_lines(report))


def test_training_flops_by_hand() -> None:
    from latentattn.calc.flops import attention_flops_per_token, training_flops_per_token
    from latentattn.config import GQAConfig, IndexerConfig, MLAConfig, ModelConfig

    cfg = ModelConfig(vocab_size=16, dim=8, n_layers=1, intermediate_size=12,
                      attention=GQAConfig(n_heads=2, n_kv_heads=1, head_dim=4))
    # matmul weights: attention 8*4*(2*2 + 2*1) = 192, SwiGLU 3*8*12 = 288, LM head 16*8 = 128;
    # attention at T = 5: 3 keys on average, 2 heads * (4 + 4) * 2 FLOPs each = 96.
    assert attention_flops_per_token(cfg, 5) == 96
    assert training_flops_per_token(cfg, 5) == 3 * (2 * (192 + 288 + 128) + 96)
    mla = cfg.replace(attention=MLAConfig(n_heads=2, kv_lora_rank=4, qk_nope_head_dim=4,
                                          qk_rope_head_dim=2, v_head_dim=3, q_lora_rank=4))
    assert attention_flops_per_token(mla, 5) == 2 * 2 * (6 + 3) * 3
    dsa = mla.replace(attention=dataclasses.replace(mla.attention, indexer=IndexerConfig(2, 4, 2)))
    # T = 4, k = 2: queries attend to 1, 2, 2, 2 keys (1.75); the indexer scores 2.5 on average.
    assert attention_flops_per_token(dsa, 4) == 2 * 2 * 9 * 1.75 + 2 * 2 * 4 * 2.5


def test_summary_and_pareto() -> None:
    a = Summary.of([1.00, 1.02])
    assert Summary.of([2.0]).fmt() == "2.000" and "±" in a.fmt() and Summary.of([2.0]).std is None
    pts = [(100.0, 1.0), (10.0, 1.2), (50.0, 1.3), (10.0, 1.25), (5.0, 2.0)]
    assert pareto_front(pts) == [4, 1, 0]


# ---------------------------------------------------------------------------- user errors
_error = cli_error


@pytest.mark.parametrize(("content", "message"), [
    (None, "does not exist"), (b"", "is empty"), (b"abc\x00def", "contains NUL bytes"),
    (b"too short", "fewer than one window"),
])
def test_bad_data(tmp_path: Path, capsys: pytest.CaptureFixture[str], content: bytes | None,
                  message: str) -> None:
    data = tmp_path / "data.txt"
    if content is not None:
        data.write_bytes(content)
    out = tmp_path / "out"
    assert message in _error(capsys, ["compare", "--data", str(data), "--out", str(out), *TINY])
    assert not out.exists()


def test_text_too_small_for_the_protocol(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """More passes over the text than MAX_PASSES: one line naming the bytes needed; a run
    already kept in --out is left as it was."""
    data = tmp_path / "data.txt"
    data.write_bytes(b"The quick brown fox jumps over the lazy dog. " * 40)  # 1,800 bytes
    out = tmp_path / "out"
    (out / "runs").mkdir(parents=True)
    kept = out / "runs" / "mha.seed0.json"
    kept.write_text("{}")
    # 400 steps x 2 x 32 bytes = 25,600 bytes of training: 15.8 passes over 1,620 train bytes
    message = _error(capsys, ["compare", "--data", str(data), "--out", str(out), *TINY,
                              "--steps", "400"])
    assert "1,800 bytes are too little for this protocol" in message
    assert f"{400 * 2 * 32 / MAX_PASSES / 0.9:,.0f} bytes" in message
    assert kept.read_text() == "{}" and sorted(p.name for p in out.rglob("*")) == ["mha.seed0.json", "runs"]


@pytest.mark.parametrize(("flags", "message"), [
    (["--steps", "0"], "--steps must be >= 1"), (["--seeds", "0"], "--seeds must be >= 1"),
    (["--dim", "36"], "multiple of 8"), (["--sweep", "nope=1"], "unknown name"),
    (["--margin", "0"], "--margin must be a positive number"),
    (["--lr-grid", "0,1e-3"], "learning rates must be positive"),
    (["--lr", "nope=1e-3"], "nope, which is not a variant"),
    (["--pilot-fraction", "0"], "--pilot-fraction must lie in (0, 1]"),
    (["--retrofit-at", "1"], "--retrofit-at must lie in (0, 1), got 1.0"),
    (["--retrofit-at", "0"], "--retrofit-at must lie in (0, 1)"),
    (["--retrofit-warmup", "nan"], "--retrofit-warmup must lie in (0, 1)"),
    (["--retrofit-at", "0.95"], "both must lie inside the run (or pass --no-retrofit)"),
    (["--steps", "2000"], "would go over the training split 17 times (at most 8); give a --data "
                          "text of at least 17,778 bytes"),
    (["--quick", "--gpu"], "two presets"),
    (["--dtype", "fp16"], "--dtype float16: training needs loss scaling"),
    (["--dtype", "int8"], "--dtype must be one of auto, float32, bfloat16, float16, got 'int8'"),
    *([(["--device", "cuda"], "--device: device 'cuda': this torch sees no CUDA GPU"),
       (["--gpu"], "--device: device 'cuda'")] if not torch.cuda.is_available() else []),
])
def test_bad_flags(tmp_path: Path, text_file: Path, capsys: pytest.CaptureFixture[str],
                   flags: list[str], message: str) -> None:
    out = tmp_path / "out"
    argv = ["compare", "--data", str(text_file), "--out", str(out), *TINY, *flags]
    assert message in _error(capsys, argv)
    assert not out.exists()


def test_unwritable_out(tmp_path: Path, text_file: Path, capsys: pytest.CaptureFixture[str]) -> None:
    blocker = tmp_path / "file"
    blocker.write_text("keep")
    for out in (blocker, blocker / "sub"):
        msg = _error(capsys, ["compare", "--data", str(text_file), "--out", str(out), *TINY])
        assert "--out" in msg
    assert blocker.read_text() == "keep"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["file", "text.txt"]
