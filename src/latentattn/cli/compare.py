"""``latentattn compare``: the subcommand's flags, presets and output files.

Presets, sized on a 2-core CPU (torch 2.13, fp32, 2 threads); both train the same ~230K-parameter
models (dim 64, 3 layers, 4 heads; the five variants, DSA retrofitted onto the MLA runs,
DeepSeek-V4's attention scaled to the window (``--no-v4`` leaves it out) and the positive control):

* default (the standard run): 7 seeds, 600 steps of 16 x 128 bytes (5.3 bytes per parameter),
  each variant's LR from full-length pilots on two seeds over 1.5e-3, 3e-3, 6e-3, extended by
  its ratio past an edge pick (:mod:`latentattn.compare.lr`), decode at 256 and 2048 tokens;
* ``--quick`` (``make demo``): 1 seed (no intervals), 300 steps, LR 3e-3 for all.

The times measured for each are in the README.

Any flag given explicitly overrides the preset. Each finished (variant, seed) is kept in
``--out/runs/`` as it completes (:mod:`latentattn.compare.store`): rerunning the same command
continues where it stopped, another protocol in the same ``--out`` is refused, ``--restart``
starts over. Before training, a short timing probe prints the estimated time.
"""

from __future__ import annotations

import argparse
import functools
import math
import os
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from latentattn.cli.common import (
    DEVICE_HELP,
    add_device_arg,
    add_dtype_arg,
    choose_device,
    int_list,
    on_start,
    say_device,
    training_precision,
)
from latentattn.compare.lr import (
    DEFAULT_EXTEND,
    DEFAULT_PILOT_FRACTION,
    DEFAULT_PILOT_SEEDS,
    check_extend,
    check_labels,
    check_pilot_seeds,
    parse_grid,
    parse_lrs,
    pilot_seeds,
)
from latentattn.compare.stats import DEFAULT_MARGIN
from latentattn.errors import LatentAttnError

DEFAULT_OUT = "compare-out"
# Fork a trained dense run late: DeepSeek-V3.2 (arXiv 2512.02556) added DSA to a trained V3.1-Terminus.
DEFAULT_RETROFIT_AT = 0.75
DEFAULT_RETROFIT_WARMUP = 0.05  # V3.2: 1000 warm-up steps before 15000 sparse ones
DEFAULT_LR = 3e-3
CURVE_WINDOWS = 64  # validation windows of each point on the loss curves (the final loss uses all)


@dataclass(frozen=True)
class Preset:
    steps: int
    batch_size: int
    seq_len: int
    seeds: int
    contexts: tuple[int, ...]
    dim: int
    layers: int
    lr_grid: tuple[float, ...] = ()


# The standard run: ~230K-parameter models (dim 64, 3 layers) for 600 steps of 16 x 128 bytes,
# 1.23M bytes = 5.3 bytes per parameter and 2.9 passes over the default text; each variant's LR
# picked by full-length pilots (two seeds) from a x2 grid, extended past an edge pick. 7 seeds: at 5, the
# paired MLA - MHA difference's 95% interval was +/-0.029 (sd 0.023; t = 2.776 / sqrt 5); 7
# narrow it by a quarter (t = 2.447 / sqrt 7). 5 seeds took 37 min here.
FULL = Preset(steps=600, batch_size=16, seq_len=128, seeds=7, contexts=(256, 2048), dim=64,
              layers=3, lr_grid=(1.5e-3, 3e-3, 6e-3))
# make demo: the same models, half the steps, one seed, no pilots: a few minutes, no intervals.
QUICK = Preset(steps=300, batch_size=16, seq_len=128, seeds=1, contexts=(256, 2048), dim=64,
               layers=3)
# --gpu: FamilySize's ~1.1M-parameter models (dim 128, 4 layers) for 1400 steps of 64 x 256
# tokens, 22.9M = ~20 tokens per parameter (Chinchilla, arXiv 2203.15556), 5 seeds, bf16 autocast on CUDA.
# Sized for about 10 minutes on one H100-class GPU by an estimate (a 4-layer step of a few ms),
# not yet measured. It needs a text of at least 22.9M / MAX_PASSES bytes: the default one
# (~470 KB) is refused.
GPU = Preset(steps=1400, batch_size=64, seq_len=256, seeds=5, contexts=(1024, 8192), dim=128,
             layers=4, lr_grid=(1.5e-3, 3e-3, 6e-3))
# A run that goes over its training text more often than this measures memorisation: refused.
MAX_PASSES = 8


class CompareInputError(LatentAttnError):
    """A ``latentattn compare`` flag value or input file that cannot be used."""


def int_tuple(text: str) -> tuple[int, ...]:
    return tuple(int_list(text))


def register(sub: Any) -> None:
    """Add ``compare`` to the ``latentattn`` subcommands (``sub`` from ``add_subparsers``)."""
    c = sub.add_parser(
        "compare", help="train MHA, MQA, GQA, MLA, MLA+DSA and V4 alike and measure them",
        description="Train the five attention mechanisms, DeepSeek-V4's attention (sliding, CSA "
        "and HCA layers, its windows scaled to --seq-len), and a positive control (MLA with a "
        "latent of an eighth of a head, which must come out worse than MHA), at the same depth and "
        "width, with parameter counts matched within 3% through the FFN width, on the same data, "
        "seeds, steps and schedule, each with its own LR from a short pilot over --lr-grid; "
        "measure parameters, KV parameters, allocated KV cache bytes per token, validation loss "
        "on the whole held-out split (mean and spread over seeds) with each variant's difference "
        "from MHA paired by seed (95% interval, equivalence test, verdict), how far the runs "
        "trained, training and decode speed, and DSA's attention-mass recall. Writes "
        "results.json, results.md and PNG plots to --out and prints the table. --sweep adds "
        "MLA / MLA+DSA variants at other latent ranks or top-k and a Pareto plot.")
    c.add_argument("--data", default=None, metavar="PATH",
                   help="UTF-8 text file (default: CPython's pydoc_data.topics prose, ~470 KB)")
    c.add_argument("--steps", type=int, default=None,
                   help=f"optimiser steps per run ({FULL.steps}; --quick {QUICK.steps})")
    c.add_argument("--seeds", type=int, default=None,
                   help=f"seeds 0..K-1 per variant ({FULL.seeds}; --quick {QUICK.seeds})")
    c.add_argument("--quick", action="store_true",
                   help="the small preset make demo runs (under 10 minutes on 2 CPU cores)")
    c.add_argument("--gpu", action="store_true",
                   help=f"the GPU protocol: ~1.1M-parameter models (dim {GPU.dim}, {GPU.layers} "
                   f"layers), {GPU.steps} steps of {GPU.batch_size} x {GPU.seq_len} tokens (~20 "
                   f"per parameter), {GPU.seeds} seeds, --device cuda --dtype bfloat16 unless given; "
                   f"needs a --data text of at least "
                   f"{GPU.steps * GPU.batch_size * GPU.seq_len / MAX_PASSES / 0.9 / 1e6:.1f} MB")
    add_device_arg(c, "where to train and measure: " + DEVICE_HELP + "; --gpu: cuda")
    # The protocol's precision is the preset's (fp32 on a CPU, as the README's runs), not what
    # auto would pick on this machine: None keeps it unless --dtype is given.
    add_dtype_arg(c, default=None,
                  help="training precision: float32 (fp32), or bfloat16 (bf16) autocast over fp32 "
                  "weights; auto: bfloat16 where it is native (a CUDA GPU with bf16, a CPU with "
                  "AVX-512 BF16 or AMX); float16 is refused (float32; --gpu bfloat16)")
    c.add_argument("--out", default=DEFAULT_OUT, metavar="DIR",
                   help=f"output directory, created if missing ({DEFAULT_OUT})")
    c.add_argument("--sweep", action="append", default=[], metavar="NAME=V1,V2,...",
                   help="kv_lora_rank=... (MLA and DSA) or index_topk=... (DSA); repeat for the grid")
    c.add_argument("--batch-size", type=int, default=None,
                   help=f"sequences per step ({FULL.batch_size}; --quick {QUICK.batch_size})")
    c.add_argument("--seq-len", type=int, default=None,
                   help=f"bytes per sequence ({FULL.seq_len}; --quick {QUICK.seq_len}); "
                   "DSA's index_topk is a sixteenth of it unless swept")
    c.add_argument("--dim", type=int, default=None,
                   help=f"model width, a multiple of 8 ({FULL.dim}; --quick {QUICK.dim})")
    c.add_argument("--layers", type=int, default=None,
                   help=f"layers ({FULL.layers}; --quick {QUICK.layers})")
    c.add_argument("--lr", default=None, metavar="LR|LABEL=LR,...",
                   help=f"peak learning rate for every variant (then no pilots), or pinned per "
                   "variant label (mha=3e-3,mla=2e-3; the others take --lr-grid's pick); without "
                   f"it the grid picks ({DEFAULT_LR:g} where there is no grid)")
    c.add_argument("--lr-grid", default=None, metavar="A,B,C",
                   help="pick each variant's LR (unless pinned) from these values by a pilot: "
                   "--pilot-seeds seeds of its own, --pilot-fraction of the steps, lowest mean "
                   "validation loss; a pick "
                   "at the grid's edge extends it by its own ratio, up to --lr-extend times ("
                   + ",".join(f"{x:g}" for x in FULL.lr_grid) + "; --quick none)")
    c.add_argument("--pilot-fraction", type=float, default=DEFAULT_PILOT_FRACTION, metavar="F",
                   help="share of --steps each LR pilot trains; below 1 the pilot decays its LR "
                   f"sooner, which favours high LRs ({DEFAULT_PILOT_FRACTION:g})")
    c.add_argument("--pilot-seeds", type=int, default=DEFAULT_PILOT_SEEDS, metavar="N",
                   help="pilot each LR on N seeds of its own and pick by their mean; more than one "
                   "keeps a lucky seed from picking an LR most seeds fail at (2; each pilot seed "
                   "costs one more run per LR tried)")
    c.add_argument("--lr-extend", type=int, default=DEFAULT_EXTEND, metavar="N",
                   help="while a variant's best pilot LR is the largest (smallest) tried, pilot one "
                   "grid ratio above (below) it, at most N times; still at the edge after N: exit 2, "
                   f"finished runs kept; 0: pick from the grid as given ({DEFAULT_EXTEND})")
    c.add_argument("--contexts", type=int_tuple, default=None,
                   help="decode contexts, comma-separated (" + ",".join(map(str, FULL.contexts))
                   + "; --quick " + ",".join(map(str, QUICK.contexts)) + "; --gpu "
                   + ",".join(map(str, GPU.contexts)) + ")")
    c.add_argument("--margin", type=float, default=DEFAULT_MARGIN, metavar="NATS",
                   help="equivalence margin in nats/byte, fixed before the run: a variant is "
                   f"'equivalent' to MHA when the 90%% interval of the paired difference lies "
                   f"inside +/- this ({DEFAULT_MARGIN:g})")
    c.add_argument("--no-control", action="store_true",
                   help="leave out the positive control (an MLA with its latent starved to an "
                   "eighth of a head, which must come out worse than MHA; without it no run shows "
                   "it could detect a difference)")
    c.add_argument("--retrofit-at", type=float, default=DEFAULT_RETROFIT_AT, metavar="F",
                   help="DSA as DeepSeek-V3.2 trains it: fork each MLA run at this fraction of the "
                   "steps into MLA+DSA with fresh indexers, warm them up with the model frozen, "
                   "then train sparse to the end; compared with the dense continuation at equal "
                   f"tokens ({DEFAULT_RETROFIT_AT:g})")
    c.add_argument("--retrofit-warmup", type=float, default=DEFAULT_RETROFIT_WARMUP, metavar="F",
                   help="share of the steps the retrofit's frozen indexer warm-up takes "
                   f"({DEFAULT_RETROFIT_WARMUP:g})")
    c.add_argument("--no-retrofit", action="store_true",
                   help="leave out the DSA retrofit (MLA+DSA trained from scratch stays)")
    c.add_argument("--no-v4", action="store_true",
                   help="leave out DeepSeek-V4's attention (window --seq-len/8, CSA rate 4 with "
                   "top-k --seq-len/32 entries, HCA rate --seq-len/16; trained from scratch with "
                   "its indexer's KL)")
    c.add_argument("--ablations", nargs="?", const="all", default=None, metavar="NAME,...",
                   help="add MLA variants that change one thing (all of them, or those named): "
                   "mla-noq (no query compression) and mla-mqa-bytes (MQA's cache bytes), both "
                   "parameter-matched with LRs of their own; mla-scaled (DeepSeek-V2's latent "
                   "scale sqrt(dim/rank) in both latent norms' gains), mla-kv-gain (the KV latent "
                   "norm's alone), mla-up-init (the up-projections' init x sqrt(dim/rank)) and "
                   "mla-low-lr (half MLA's LR), at MLA's LR: what the MLA-vs-MHA claim and MLA's "
                   "seed spread should not hinge on")
    c.add_argument("--restart", action="store_true",
                   help="train every run again: forget the finished runs kept in --out (by default "
                   "a rerun of the same command continues where it stopped)")
    c.add_argument("--quiet", action="store_true", help="no progress bars")
    c.set_defaults(func=cmd_compare)


def _resolve(args: argparse.Namespace) -> dict[str, Any]:
    if args.quick and args.gpu:
        raise CompareInputError("--quick and --gpu are two presets: give one")
    preset = QUICK if args.quick else GPU if args.gpu else FULL
    from latentattn.precision import resolve_device

    device = "cuda" if args.gpu and args.device in (None, "auto") else args.device
    choice = choose_device(device)
    try:
        resolved = resolve_device(choice.device)
    except LatentAttnError as e:
        raise CompareInputError(f"--device: {e}") from None
    precision = training_precision(args.dtype or ("bfloat16" if args.gpu else "float32"))
    if precision == "auto":
        from latentattn.precision import choose_precision

        bf16 = choose_precision("auto", resolved).bf16
    else:
        bf16 = precision == "bf16"
    values: dict[str, Any] = {
        "device": str(resolved), "device_choice": choice,
        "bf16": bf16,
        "steps": preset.steps if args.steps is None else args.steps,
        "seeds": preset.seeds if args.seeds is None else args.seeds,
        "batch_size": preset.batch_size if args.batch_size is None else args.batch_size,
        "seq_len": preset.seq_len if args.seq_len is None else args.seq_len,
        "contexts": preset.contexts if args.contexts is None else args.contexts,
        "dim": preset.dim if args.dim is None else args.dim,
        "layers": preset.layers if args.layers is None else args.layers, "margin": args.margin,
    }
    common, pinned = (None, {}) if args.lr is None else parse_lrs(args.lr)
    values["lr"] = DEFAULT_LR if common is None else common
    values["lrs"] = pinned
    # One LR given for all means no pilots, unless a grid is asked for too.
    default_grid = () if common is not None else preset.lr_grid
    values["lr_grid"] = default_grid if args.lr_grid is None else parse_grid(args.lr_grid)
    if not (math.isfinite(args.pilot_fraction) and 0 < args.pilot_fraction <= 1):
        raise CompareInputError(f"--pilot-fraction must lie in (0, 1], got {args.pilot_fraction}")
    values["lr_extend"] = check_extend(args.lr_extend)
    values["pilot_seeds"] = check_pilot_seeds(args.pilot_seeds)
    values["ablations"] = _ablations(args.ablations)
    for name in ("steps", "seeds", "batch_size", "dim", "layers"):
        if values[name] < 1:
            raise CompareInputError(f"--{name.replace('_', '-')} must be >= 1, got {values[name]}")
    if values["seq_len"] < 2:
        raise CompareInputError(f"--seq-len must be >= 2, got {values['seq_len']}")
    for flag, value in (("--retrofit-at", args.retrofit_at), ("--retrofit-warmup", args.retrofit_warmup)):
        if not (math.isfinite(value) and 0 < value < 1):
            raise CompareInputError(f"{flag} must lie in (0, 1), got {value}")
    if not args.no_retrofit:
        fork = round(args.retrofit_at * values["steps"])
        warm_end = fork + max(1, round(args.retrofit_warmup * values["steps"]))
        if not 0 < fork < warm_end < values["steps"]:
            raise CompareInputError(
                f"--retrofit-at {args.retrofit_at:g} and --retrofit-warmup {args.retrofit_warmup:g} "
                f"of {values['steps']} steps fork at step {fork} and end the warm-up at step "
                f"{warm_end}: both must lie inside the run (or pass --no-retrofit)")
    if not (math.isfinite(values["margin"]) and values["margin"] > 0):
        raise CompareInputError(f"--margin must be a positive number of nats/byte, got {values['margin']}")
    return values


def _ablations(text: str | None) -> bool | tuple[str, ...]:
    """--ablations: absent False, bare True (all), else the names given."""
    from latentattn.compare.variants import ABLATIONS

    if text is None:
        return False
    if text == "all":
        return True
    names = tuple(dict.fromkeys(n.strip() for n in text.split(",") if n.strip()))
    unknown = [n for n in names if n not in ABLATIONS]
    if unknown or not names:
        raise CompareInputError(f"--ablations: unknown {', '.join(unknown) or repr(text)}; choose "
                                f"from {', '.join(ABLATIONS)} (or give none for all)")
    return names


def _command(args: argparse.Namespace, v: dict[str, Any]) -> str:
    """The run's command with every setting explicit (what reproduces it)."""
    parts = ["latentattn", "compare"]
    if args.quick:
        parts.append("--quick")
    if args.gpu:
        parts.append("--gpu")
    parts += ["--device", v["device"], "--dtype", "bfloat16" if v["bf16"] else "float32"]
    if args.data is not None:
        parts += ["--data", str(args.data)]
    parts += ["--steps", str(v["steps"]), "--seeds", str(v["seeds"]),
              "--batch-size", str(v["batch_size"]), "--seq-len", str(v["seq_len"]),
              "--dim", str(v["dim"]), "--layers", str(v["layers"]),
              *(["--lr", args.lr] if args.lr is not None else []),
              "--contexts", ",".join(map(str, v["contexts"])), "--margin", f"{v['margin']:g}"]
    if v["lr_grid"]:
        parts += ["--lr-grid", ",".join(f"{x:g}" for x in v["lr_grid"]),
                  "--pilot-fraction", f"{args.pilot_fraction:g}", "--pilot-seeds",
                  str(v["pilot_seeds"]), "--lr-extend", str(v["lr_extend"])]
    for spec in args.sweep:
        parts += ["--sweep", spec]
    if args.no_control:
        parts.append("--no-control")
    if v["ablations"] is True:
        parts.append("--ablations")
    elif v["ablations"]:
        parts += ["--ablations", ",".join(v["ablations"])]
    if args.no_v4:
        parts.append("--no-v4")
    if args.no_retrofit:
        parts.append("--no-retrofit")
    else:
        parts += ["--retrofit-at", f"{args.retrofit_at:g}", "--retrofit-warmup",
                  f"{args.retrofit_warmup:g}"]
    parts += ["--out", str(args.out)]
    return " ".join(parts)


def _prepare_out(out: str) -> Path:
    path = Path(out)
    if path.exists() and not path.is_dir():
        raise CompareInputError(f"--out: {path} exists and is not a directory")
    try:
        path.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise CompareInputError(f"--out: cannot create directory {path} ({e.strerror})") from None
    if not os.access(path, os.W_OK | os.X_OK):
        raise CompareInputError(f"--out: directory {path} is not writable")
    return path


def _forget_runs(out: Path) -> None:
    """--restart: drop the finished runs (and their protocol) kept in ``out``."""
    import shutil

    from latentattn.compare.store import PROTOCOL_FILE, RUNS_DIR

    shutil.rmtree(out / RUNS_DIR, ignore_errors=True)
    (out / PROTOCOL_FILE).unlink(missing_ok=True)


def _eval_every(steps: int) -> int:
    """8-12 points on each validation curve, the last at the final step when a divisor allows."""
    return next((steps // k for k in range(8, 13) if steps % k == 0), max(1, steps // 8))


def cmd_compare(args: argparse.Namespace) -> int:
    from tqdm import tqdm

    from latentattn.compare.plots import PLOTS, plot_lr_pilot, plot_sweep_pareto
    from latentattn.compare.report import CompareSettings
    from latentattn.compare.run import pilot_label, run_compare
    from latentattn.compare.store import DirStore, protocol
    from latentattn.compare.sweep import parse_sweeps
    from latentattn.compare.table import markdown_report, markdown_table, scale_lines, verdict_lines
    from latentattn.compare.variants import build_variants, family_size
    from latentattn.data import byte_tokens, load_text, train_val_split
    from latentattn.io import atomic_write, write_json, write_text
    from latentattn.train.settings import TrainSettings

    v = _resolve(args)
    sweeps = parse_sweeps(args.sweep)
    text = load_text(args.data)
    train_tokens, val_tokens = train_val_split(byte_tokens(text))
    if len(val_tokens) < v["seq_len"] + 1:
        raise CompareInputError(
            f"data: {len(text.encode()):,} bytes leave {len(val_tokens):,} for validation (the last "
            f"10%), fewer than one window of --seq-len {v['seq_len']} + 1; use more text or a "
            "shorter --seq-len")
    passes = v["steps"] * v["batch_size"] * v["seq_len"] / max(1, len(train_tokens))
    if passes > MAX_PASSES:
        need = v["steps"] * v["batch_size"] * v["seq_len"] / MAX_PASSES / 0.9
        raise CompareInputError(
            f"data: {len(text.encode()):,} bytes are too little for this protocol: "
            f"{v['steps']} steps x {v['batch_size']} x {v['seq_len']} would go over the training "
            f"split {passes:.0f} times (at most {MAX_PASSES}); give a --data text of at least "
            f"{need:,.0f} bytes, or fewer --steps")
    size = family_size(v["dim"], v["layers"], v["seq_len"])
    variants = build_variants(size, sweeps, control=not args.no_control, ablations=v["ablations"],
                              retrofit=not args.no_retrofit, v4=not args.no_v4)
    check_labels(v["lrs"], [x.label for x in variants])
    train_settings = TrainSettings(
        steps=v["steps"], batch_size=v["batch_size"], seq_len=v["seq_len"], lr=v["lr"], bf16=v["bf16"],
        warmup_steps=min(20, v["steps"] // 10), eval_every=_eval_every(v["steps"]),
        eval_windows=CURVE_WINDOWS,
    )
    settings = CompareSettings(size=size, train=train_settings, seeds=v["seeds"],
                               contexts=tuple(v["contexts"]), sweeps=sweeps, margin=v["margin"],
                               lrs=v["lrs"], lr_grid=v["lr_grid"], pilot_fraction=args.pilot_fraction,
                               lr_extend=v["lr_extend"], pilot_seeds=v["pilot_seeds"],
                               retrofit_at=args.retrofit_at, retrofit_warmup=args.retrofit_warmup,
                               device=v["device"])
    out = _prepare_out(args.out)
    if args.restart:
        _forget_runs(out)
    store = DirStore(out, protocol(settings, variants, train_tokens, val_tokens))
    # Runs still to train; an LR pilot counts as --pilot-fraction of a run in the estimate.
    pilots = {x.label: [pilot_label(x.label, lr) for lr in settings.lr_grid]
              for x in variants if x.label not in settings.lrs and not x.lr_of}
    todo_seeds = {x.label: sum(not store.has(x.label, seed) for seed in range(v["seeds"]))
                  for x in variants}
    todo_pilots = {label: sum(not store.has(p, seed) for p in names
                              for seed in pilot_seeds(settings.pilot_seeds))
                   for label, names in pilots.items()}
    # A retrofit trains the steps after its fork (and its dense run again up to the fork when
    # that run is already finished).
    share = {x.label: 1 - args.retrofit_at if x.retrofit_of else 1.0 for x in variants}
    todo = {label: share[label] * n + settings.pilot_fraction * todo_pilots.get(label, 0)
            for label, n in todo_seeds.items()}
    total = len(variants) * v["seeds"] + settings.pilot_seeds * sum(len(p) for p in pilots.values())
    left = sum(todo_seeds.values()) + sum(todo_pilots.values())
    if left < total:
        print(f"latentattn: {total - left} of {total} runs already finished in {out}: continuing "
              "with the rest", file=sys.stderr)
    say_device(v["device_choice"])
    if left and not args.quiet:
        from latentattn.compare.probe import estimate_seconds

        est = estimate_seconds(settings, variants, todo, train_tokens, val_tokens)
        print(f"latentattn: {left} run(s) to train, estimated {est / 60:.1f} min on this machine "
              "(from a short timing probe; decode timing not included)",
              file=sys.stderr)
    with tqdm(total=total, file=sys.stderr, desc="compare", unit="run", disable=args.quiet) as bar:
        progress = on_start(bar)

        def on_run(label: str, seed: int) -> None:
            progress(f"{label} seed {seed}")

        report = run_compare(
            settings, train_tokens, val_tokens, args.data or "pydoc_data.topics (CPython)",
            command=_command(args, v), on_run=on_run, progress=not args.quiet, variants=variants,
            store=store)
        bar.update(total - bar.n)

    files = ["results.json", "results.md", *PLOTS]
    write_json(out / "results.json", report.as_dict())
    write_text(out / "results.md", markdown_report(report))
    plots = dict(PLOTS)
    if report.swept:
        plots["sweep_pareto.png"] = plot_sweep_pareto
        files.append("sweep_pareto.png")
    if any(x.pilot_losses for x in report.variants):
        plots["lr_pilot.png"] = plot_lr_pilot
        files.append("lr_pilot.png")
    for name, plot in plots.items():
        atomic_write(out / name, functools.partial(plot, report), suffix=".png")
    print(markdown_table(report))
    print()
    print("\n".join(verdict_lines(report)))
    print()
    print("\n".join(scale_lines(report)))
    if report.swept:
        print("Pareto front (KV bytes vs val loss): " + ", ".join(report.pareto_labels()))
    print(f"wrote {', '.join(files)} to {out} ({report.seconds / 60:.1f} min in this invocation)")
    return 0
