"""One command-line vocabulary (issue 20 item 3): every subcommand's parser and --help, walked.

--dtype takes the same names and aliases everywhere, --device defaults to auto, one value is
--batch-size / --index-topk and a sweep --batch-sizes / --index-topks / --contexts, train picks
its model with --model, every bench prints without --json/--plot; the old spellings still parse,
hidden, with one deprecation line; a Hugging Face Hub id gets the download hint (item 6).
"""

from __future__ import annotations

import argparse
import re
from collections.abc import Iterator
from pathlib import Path

import pytest

import latentattn
from conftest import cli_error
from latentattn.cli import build_parser, main
from latentattn.cli.common import DTYPE_ALIASES, DTYPE_METAVAR, MODEL_HELP, dtype_name
from latentattn.errors import CheckpointError
from latentattn.precision import DTYPE_NAMES

# Spellings no subcommand may show any more (they parse, hidden, where DEPRECATED says).
OLD = ("--batch", "--batches", "--topk", "--topks", "--bf16", "--precision", "--preset", "--init",
       "--heal-precision")
REMOVED_IN = "0.3"
# Every hidden old spelling, frozen as test_cli.py's SURFACE freezes the visible flags:
# subcommand -> {old: (its argument or None, the new spelling the deprecation line names)}.
DEPRECATED: dict[tuple[str, ...], dict[str, tuple[str | None, str]]] = {
    ("kv-cache",): {"--batch": ("3", "--batch-size")},
    ("train",): {"--preset": ("tiny-mla", "--model"), "--init": ("tiny-mla", "--model"),
                 "--precision": ("bf16", "--dtype"), "--bf16": (None, "--dtype bfloat16")},
    ("bench", "decode"): {"--batches": ("1,2", "--batch-sizes")},
    ("bench", "dsa"): {"--topks": ("8,16", "--index-topks")},
    ("bench", "generate"): {"--context": ("64,128", "--contexts")},
    ("bench", "convert"): {"--heal-precision": ("fp32", "--heal-dtype")},
    ("bench", "kernels"): {"--batches": ("2", "--batch-sizes"), "--topk": ("64", "--index-topk")},
    ("bench", "indexer"): {"--topk": ("8", "--index-topk"), "--batch": ("2", "--batch-size")},
    ("kernels", "check"): {"--batches": ("1", "--batch-sizes"), "--topk": ("16", "--index-topk")},
}
TEST_ONLY = {"--tiny"}  # hidden: the timed benches' small dims, for the tests
# What each subcommand needs besides the flag under test for its parser to accept a command line.
REQUIRED: dict[tuple[str, ...], list[str]] = {
    ("kv-cache",): ["--model", "tiny-mla"], ("train",): ["--out", "run"],
    ("generate",): ["--model", "m", "--prompt", "p", "--max-new-tokens", "1"],
    ("eval",): ["--model", "m", "--data", "d"], ("export",): ["--model", "m", "out"],
    ("bench", "generate"): ["--model", "tiny-gqa"], ("bench", "convert"): ["--model", "m", "--data", "d"],
}


def _subparsers(parser: argparse.ArgumentParser) -> dict[str, argparse.ArgumentParser]:
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            return dict(action.choices)
    return {}


def _leaves(parser: argparse.ArgumentParser, path: tuple[str, ...] = ()) -> Iterator[
        tuple[tuple[str, ...], argparse.ArgumentParser]]:
    subs = _subparsers(parser)
    if not subs:
        yield path, parser
    for name, sub in subs.items():
        yield from _leaves(sub, (*path, name))


LEAVES = dict(_leaves(build_parser()))


def _flags(parser: argparse.ArgumentParser, *, hidden: bool) -> set[str]:
    return {s for a in parser._actions for s in a.option_strings
            if s.startswith("--") and (a.help is argparse.SUPPRESS) == hidden}


def _action(parser: argparse.ArgumentParser, flag: str) -> argparse.Action:
    (action,) = [a for a in parser._actions if flag in a.option_strings]
    return action


def test_every_subcommand_is_walked() -> None:
    assert {p[0] for p in LEAVES} == {"kv-cache", "info", "generate", "eval", "convert", "export",
                                      "train", "compare", "bench", "kernels"}
    assert len([p for p in LEAVES if p[0] == "bench"]) == 9


@pytest.mark.parametrize("path", list(LEAVES), ids=" ".join)
def test_no_old_spelling_in_help(path: tuple[str, ...]) -> None:
    parser = LEAVES[path]
    assert not _flags(parser, hidden=False) & set(OLD)
    text = parser.format_help()
    for old in OLD:
        assert not re.search(rf"(?<![\w-]){re.escape(old)}(?![\w-])", text), (path, old)
    # The hidden flags are exactly the frozen old spellings (and the tests' --tiny).
    assert _flags(parser, hidden=True) - TEST_ONLY == set(DEPRECATED.get(path, {}))
    if path == ("bench", "generate"):
        assert "--context " not in text  # a sweep: --contexts


@pytest.mark.parametrize("path", [p for p in LEAVES if "--dtype" in _flags(LEAVES[p], hidden=False)
                                  or "--heal-dtype" in _flags(LEAVES[p], hidden=False)], ids=" ".join)
def test_every_dtype_takes_the_same_names(path: tuple[str, ...]) -> None:
    parser = LEAVES[path]
    flag = "--dtype" if "--dtype" in _flags(parser, hidden=False) else "--heal-dtype"
    action = _action(parser, flag)
    assert action.type is dtype_name and action.metavar == DTYPE_METAVAR and action.choices is None
    assert action.default in (None, *DTYPE_NAMES)
    for name in DTYPE_NAMES:
        ns = parser.parse_args([*REQUIRED.get(path, []), flag, name])
        assert getattr(ns, action.dest) == name
    for alias, name in DTYPE_ALIASES.items():
        ns = parser.parse_args([*REQUIRED.get(path, []), flag, alias])
        assert getattr(ns, action.dest) == name


def test_dtype_is_everywhere_it_was() -> None:
    with_dtype = {p for p, parser in LEAVES.items() if "--dtype" in _flags(parser, hidden=False)}
    assert {("generate",), ("eval",), ("train",), ("compare",), ("bench", "decode"), ("bench", "dsa"),
            ("bench", "v4"), ("bench", "generate"), ("bench", "kernels")} <= with_dtype


@pytest.mark.parametrize("path", [p for p in LEAVES if "--device" in _flags(LEAVES[p], hidden=False)],
                         ids=" ".join)
def test_every_device_defaults_to_auto(path: tuple[str, ...]) -> None:
    action = _action(LEAVES[path], "--device")
    assert action.default == "auto" and "auto" in (action.help or "")


@pytest.mark.parametrize("path", [p for p in LEAVES if p[0] == "bench"], ids=" ".join)
def test_bench_outputs_are_optional(path: tuple[str, ...]) -> None:
    for flag in ("--json", "--plot"):
        action = _action(LEAVES[path], flag)
        assert not action.required and action.default is None


@pytest.mark.parametrize(("argv", "header"), [
    (["bench", "v4", "--quick", "--kinds", "sliding", "--no-prefill", "--contexts", "64", "--repeats", "1"],
     r"^ *context +kind +step ms"),
    (["bench", "decode", "--tiny", "--no-hf", "--contexts", "16", "--batch-sizes", "1", "--repeats", "1"],
     r"^ *batch +context +mha ms .*\n *-+( +-+)+$"),
], ids=["v4", "decode"])
def test_bench_prints_and_writes_nothing_without_json_or_plot(
        argv: list[str], header: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
        capsys: pytest.CaptureFixture[str]) -> None:
    monkeypatch.chdir(tmp_path)
    assert main([*argv, "--quiet"]) == 0
    out = capsys.readouterr().out
    assert re.search(header, out, re.M), out  # the result table
    assert "wrote" not in out
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize(("path", "old"), [(p, o) for p, olds in DEPRECATED.items() for o in olds],
                         ids=lambda x: x if isinstance(x, str) else " ".join(x))
def test_old_spelling_parses_as_the_new_with_one_line(path: tuple[str, ...], old: str,
                                                      capsys: pytest.CaptureFixture[str]) -> None:
    value, new = DEPRECATED[path][old]
    parser = LEAVES[path]
    given = [old] if value is None else [old, value]
    ns_old = parser.parse_args([*REQUIRED.get(path, []), *given])
    assert capsys.readouterr().err.splitlines() == [
        f"latentattn: {old} is deprecated; use {new} (it will be removed in {REMOVED_IN})"]
    new_argv = new.split() if value is None else [new, value]
    ns_new = parser.parse_args([*REQUIRED.get(path, []), *new_argv])
    assert capsys.readouterr().err == ""
    assert vars(ns_old) == vars(ns_new)


def test_old_spelling_runs(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["kv-cache", "--model", "deepseek-v3", "--batch-size", "2"]) == 0
    new = capsys.readouterr()
    assert main(["kv-cache", "--model", "deepseek-v3", "--batch", "2"]) == 0
    old = capsys.readouterr()
    assert old.out == new.out and "x batch 2" in old.out
    assert old.err == "latentattn: --batch is deprecated; use --batch-size (it will be removed in 0.3)\n"


def test_train_takes_model_or_attn(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out = ["--out", str(tmp_path / "run")]
    assert cli_error(capsys, ["train", *out]) == (
        "latentattn: error: give --model SPEC or --attn KIND (or --resume a checkpoint in --out)")
    line = cli_error(capsys, ["train", "--attn", "mla", "--model", "tiny-mla", *out])
    assert line == "latentattn: error: give one of --attn and --model, not both"
    assert "--mla-impl goes with --model" in cli_error(capsys, ["train", "--attn", "mla", "--mla-impl",
                                                                "naive", *out])
    assert "give it with --model RUN" in cli_error(capsys, ["train", "--attn", "mla", "--retrofit-dsa",
                                                            *out])
    assert not (tmp_path / "run").exists()


@pytest.mark.parametrize("spec", ["HuggingFaceTB/SmolLM2-135M", "deepseek-ai/DeepSeek-V3.2-Exp"])
def test_hub_id_gets_the_download_hint(spec: str, capsys: pytest.CaptureFixture[str]) -> None:
    hint = f"huggingface-cli download {spec} --local-dir DIR"
    for command in (["info"], ["kv-cache"], ["generate", "--prompt", "a", "--max-new-tokens", "1"]):
        line = cli_error(capsys, [*command, "--model", spec])
        assert hint in line and "--model DIR" in line and "Hugging Face Hub id" in line
    for load in (latentattn.load_config, latentattn.load):
        with pytest.raises(CheckpointError, match=re.escape(hint)):
            load(spec)


@pytest.mark.parametrize("spec", ["./org/name", "org/name.json", "org/name/more"])
def test_paths_are_not_hub_ids(spec: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                               capsys: pytest.CaptureFixture[str]) -> None:
    monkeypatch.chdir(tmp_path)
    line = cli_error(capsys, ["info", "--model", spec])
    assert line == f"latentattn: error: no such file or directory: {spec}"


def test_an_existing_org_name_directory_is_a_path(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                  capsys: pytest.CaptureFixture[str]) -> None:
    monkeypatch.chdir(tmp_path)
    latentattn.save_pretrained(latentattn.load("tiny-mla", seed=0), tmp_path / "org" / "name")
    assert main(["info", "--model", "org/name"]) == 0
    assert "kv_lora_rank" in capsys.readouterr().out


# ---------------------------------------------------------------------------- help drift
def _quoted_default(help: str) -> str | None:
    """The default a help text quotes: the first item of its last parenthesis, when that looks
    like a number or a comma-separated list of numbers (``(512)``, ``(1,8)``, ``(3e-4: ...)``)."""
    m = re.search(r"\(([^()]*)\)[^()]*$", help)
    if m is None:
        return None
    first = re.split(r"[;:]|\s", m.group(1).strip(), maxsplit=1)[0]
    number = r"[-+]?\d[\d.e+-]*"
    return first if re.fullmatch(rf"{number}(,{number})*", first) else None


def _numbers(text: str) -> list[float]:
    return [float(x) for x in text.split(",")]


@pytest.mark.parametrize("path", list(LEAVES), ids=" ".join)
def test_help_quotes_the_real_defaults(path: tuple[str, ...]) -> None:
    for action in LEAVES[path]._actions:
        default = action.default
        if not action.help or action.help is argparse.SUPPRESS or isinstance(default, bool):
            continue
        if isinstance(default, tuple):
            default = list(default)
        if not (isinstance(default, (int, float)) or (isinstance(default, list) and default
                                                       and all(isinstance(x, int) for x in default))):
            continue
        quoted = _quoted_default(action.help)
        if quoted is None:
            continue
        real = [float(x) for x in default] if isinstance(default, list) else [float(default)]
        assert _numbers(quoted) == pytest.approx(real), (path, action.option_strings, quoted, default)


def test_compare_help_says_what_the_code_does() -> None:
    from latentattn.cli.compare import FULL, GPU, QUICK

    parser = LEAVES[("compare",)]
    text = " ".join(parser.format_help().split())
    assert "half a head" not in text and "an eighth of a head" in text
    contexts = _action(parser, "--contexts").help or ""
    for preset in (FULL, QUICK, GPU):
        assert ",".join(map(str, preset.contexts)) in contexts


def test_model_help_names_every_kind_of_spec() -> None:
    for words in ("GGUF", "smollm2-135m", "latentattn convert", "latentattn train", "config.json",
                  "Hugging Face"):
        assert words in MODEL_HELP
