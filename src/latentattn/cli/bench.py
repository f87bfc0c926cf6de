"""``latentattn bench decode|dsa|v4|generate|indexer|convert|precision|...``: benchmarks that print
their results to stdout, with a progress bar on stderr, and write JSON (--json) and a plot (--plot)
when asked. The benchmarks themselves are :mod:`latentattn.bench`."""

from __future__ import annotations

import argparse
import math
import os
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

from latentattn.calc.converted import METHODS as CONVERT_METHODS
from latentattn.cli.common import (
    UserError,
    add_deprecated,
    add_device_arg,
    add_dtype_arg,
    check_dtype,
    choose_device,
    dtype_name,
    int_list,
    int_or_full,
    on_start,
    render_table,
    say_device,
    training_precision,
)
from latentattn.io import atomic_write, check_parent, write_json

KINDS_V4 = ("sliding", "csa", "hca", "dsa", "mla")  # latentattn.bench.v4.KINDS, without importing torch
# bench kernels' sweeps when not given: DeepSeek-V3's 128 heads and long contexts on a GPU, a
# small CPU run of the PyTorch path (the kernels need a GPU).
KERNEL_CONTEXTS_GPU = [4096, 8192, 16384, 32768, 65536]
KERNEL_CONTEXTS_CPU = [1024, 4096]
KERNEL_BATCHES_GPU = [1, 32, 64, 128]
KERNEL_BATCHES_CPU = [1, 4]
KERNEL_HEADS_GPU = 128  # latentattn.bench.kernels.V3_DIMS["heads"], without importing torch
OUTPUTS = " Prints the results; --json and --plot also write them, when given."
TIMED_DTYPE_HELP = ("weights, cache and compute dtype (float32; auto: bfloat16 on a CPU with native "
                    "bf16, else float32)")


def _csv(values: list[int]) -> str:
    return ",".join(map(str, values))


def _check_outputs(args: argparse.Namespace) -> None:
    """--json and --plot are optional: check the parent directory of those given, before the
    benchmark's minutes of work, not after."""
    for path, flag in ((args.json, "--json"), (args.plot, "--plot")):
        if path is not None:
            check_parent(path, flag)


def _write_outputs(args: argparse.Namespace, data: Callable[[], Any],
                   plot: Callable[[str], None]) -> None:
    """Write the JSON (``data()``) and the plot (``plot(tmp_path)``) where --json / --plot ask."""
    if args.json is not None:
        write_json(args.json, data())
    if args.plot is not None:
        atomic_write(args.plot, plot, suffix=".png")


def _say_written(args: argparse.Namespace) -> None:
    written = [str(p) for p in (args.json, args.plot) if p is not None]
    if written:
        print("wrote " + " and ".join(written))


def _bench_dtype(name: str) -> Any:
    """The torch dtype of a benchmark's --dtype (auto: as ``latentattn.load``'s on this CPU)."""
    import torch

    from latentattn.precision import choose_dtype

    return choose_dtype("auto", "cpu").dtype if check_dtype(name) == "auto" else getattr(torch, name)


def _check_timed(args: argparse.Namespace) -> Any:
    """The checks a timed benchmark makes before running; returns its torch dtype."""
    _check_outputs(args)
    if args.repeats < 1:
        raise UserError(f"--repeats must be >= 1, got {args.repeats}")
    return _bench_dtype(args.dtype)


def _decode_table(report: Any) -> str:
    """bench decode's medians: one row per (batch, context), one column per variant."""
    headers = ["batch", "context", *(f"{v} ms" for v in report.variants)]
    rows = []
    for b in report.batches:
        for c in report.contexts:
            ms = [report.median(v, b, c) for v in report.variants]
            rows.append([str(b), f"{c:,}", *("-" if m is None else f"{m:,.3f}" for m in ms)])
    return render_table(headers, rows, set(range(len(headers))))


def cmd_bench_decode(args: argparse.Namespace) -> int:
    from tqdm import tqdm

    from latentattn.bench import decode

    dtype = _check_timed(args)
    include_hf = not args.no_hf
    if include_hf and not decode.hf_available():
        print(f"latentattn: transformers is not installed, skipping its DeepseekV3Attention "
              f"peer ({decode.HF_EXTRA_HINT} to include it)", file=sys.stderr)
        include_hf = False
    dims = decode.TINY_DIMS if args.tiny else decode.V2_LITE_DIMS
    n_variants = len(decode.VARIANTS) - (0 if include_hf else 1)
    total = n_variants * len(args.contexts) * len(args.batch_sizes)
    with tqdm(total=total, file=sys.stderr, desc="bench decode", unit="run",
              disable=args.quiet) as bar:
        report = decode.run_decode_bench(
            contexts=args.contexts, batches=args.batch_sizes, repeats=args.repeats, dtype=dtype,
            include_hf=include_hf, dims=dims, progress=on_start(bar),
        )
        bar.update(total - bar.n)
    _write_outputs(args, report.as_dict, lambda tmp: decode.plot_report(report, tmp))
    print(_decode_table(report))
    print(decode.headline(report))
    for key, sp in report.speedups().items():
        print(f"  {key}: " + ", ".join(f"{k} {v:.2f}x" for k, v in sp.items()))
    _say_written(args)
    return 0


def cmd_bench_dsa(args: argparse.Namespace) -> int:
    from tqdm import tqdm

    from latentattn.bench import dsa

    dtype = _check_timed(args)
    dims = dsa.TINY_DIMS if args.tiny else dsa.V32_DIMS
    total = len(args.decode_contexts) + len(args.prefill_contexts)
    with tqdm(total=total, file=sys.stderr, desc="bench dsa", unit="size", disable=args.quiet) as bar:
        report = dsa.run_dsa_bench(
            decode_contexts=args.decode_contexts, prefill_contexts=args.prefill_contexts,
            topks=args.index_topks, repeats=args.repeats, dtype=dtype, dims=dims, progress=on_start(bar),
        )
        bar.update(total - bar.n)
    _write_outputs(args, report.as_dict, lambda tmp: dsa.plot_dsa_report(report, tmp))
    print("\n".join(dsa.dsa_headline(report)))
    _say_written(args)
    return 0


def cmd_bench_v4(args: argparse.Namespace) -> int:
    from tqdm import tqdm

    from latentattn.bench import v4
    from latentattn.bench.v4_report import V4Report, plot_v4_report, table

    _check_outputs(args)
    if args.repeats < 1 or (args.chunk is not None and args.chunk < 1):
        raise UserError(f"--repeats and --chunk must be >= 1, got {args.repeats} and {args.chunk}")
    unknown = set(args.kinds) - set(v4.KINDS)
    if unknown:
        raise UserError(f"--kinds: unknown {sorted(unknown)}; choose from {','.join(v4.KINDS)}")
    dtype = _bench_dtype(args.dtype)
    contexts = args.contexts or list(v4.QUICK_CONTEXTS if args.quick else v4.CONTEXTS)
    prefill = [] if args.no_prefill else args.prefill or list(v4.QUICK_PREFILL if args.quick else v4.PREFILL)
    chunk = args.chunk if args.chunk is not None else (v4.QUICK_CHUNK if args.quick else 4096)

    def save(report: V4Report) -> None:
        if args.json is not None:
            write_json(args.json, report.as_dict())
        if args.plot is not None:
            atomic_write(args.plot, lambda tmp: plot_v4_report(report, tmp), suffix=".png")

    total = len(contexts) * len(args.kinds) + len(prefill) * len(set(args.kinds) & set(v4.PREFILL_KINDS))
    with tqdm(total=total, file=sys.stderr, desc="bench v4", unit="point", disable=args.quiet) as bar:
        report = v4.run_v4_bench(
            contexts, prefill, kinds=args.kinds, chunk=chunk, repeats=args.repeats, dtype=dtype,
            quick=args.quick, budget_mib=None if args.memory_gib is None else args.memory_gib * 1024,
            progress=on_start(bar), on_point=save)
        bar.update(total - bar.n)
    print(table(report))
    _say_written(args)
    return 0


def cmd_bench_indexer(args: argparse.Namespace) -> int:
    from tqdm import tqdm

    from latentattn.bench import indexer
    from latentattn.data import load_text

    _check_outputs(args)
    for flag in ("pretrain_steps", "warmup_steps", "index_topk", "seq_len", "batch_size"):
        if getattr(args, flag) < (0 if flag.endswith("steps") else 1):
            raise UserError(f"--{flag.replace('_', '-')} must be positive, got {getattr(args, flag)}")
    if args.index_topk >= args.seq_len:
        raise UserError(f"--index-topk ({args.index_topk}) must be smaller than --seq-len "
                        f"({args.seq_len}): otherwise every key is selected and recall is trivially 1")
    text = load_text(args.data)
    settings = indexer.IndexerBenchSettings(
        index_topk=args.index_topk, seq_len=args.seq_len, batch=args.batch_size,
        pretrain_steps=args.pretrain_steps, warmup_steps=args.warmup_steps, seed=args.seed)
    total = args.pretrain_steps + args.warmup_steps
    with tqdm(total=total, file=sys.stderr, desc="bench indexer", unit="step",
              disable=args.quiet) as bar:
        def progress(stage: str, done: int) -> None:
            bar.set_postfix_str(stage)
            bar.update(1)

        report = indexer.run_indexer_bench(text, args.data or "pydoc_data.topics (CPython)",
                                           settings, progress)
    _write_outputs(args, report.as_dict, lambda tmp: indexer.plot_indexer_report(report, tmp))
    print("\n".join(indexer.indexer_headline(report)))
    _say_written(args)
    return 0


def cmd_bench_convert(args: argparse.Namespace) -> int:
    from tqdm import tqdm

    from latentattn.bench.convert import (
        Heal,
        bench_sizes,
        convert_table,
        plot_convert_report,
        run_convert_bench,
    )
    from latentattn.cli.convert import calib_text
    from latentattn.convert.calibrate import calib_span
    from latentattn.convert.fit import FitSettings, check_calibration
    from latentattn.data import load_text, train_val_split
    from latentattn.loading import load, load_config
    from latentattn.precision import choose_precision
    from latentattn.tokenizer import encode_corpus

    _check_outputs(args)
    heal_precision = training_precision(args.heal_dtype, "--heal-dtype")
    cfg = load_config(args.model)
    asked = None if args.ranks is None else [int_or_full(r, "--ranks") for r in args.ranks.split(",") if r]
    if asked == []:
        raise UserError("--ranks must name at least one rank")
    sizes = bench_sizes(cfg.replace(name=str(args.model)), asked, args.rope_dim, args.rope_mode, args.format)
    ranks, rope_dim, mode = [s.kv_lora_rank for s in sizes], sizes[0].rope_dim, sizes[0].rope_mode
    deepseek = args.format == "deepseek"
    text = load_text(args.data)
    calib = calib_text(args.calib)
    if calib is None:
        raise UserError("bench convert calibrates on --calib: give a FILE or builtin")
    for flag in ("heal_steps", "heal_batch_size", "heal_seq_len"):
        if getattr(args, flag) < (0 if flag == "heal_steps" else 1):
            raise UserError(f"--{flag.replace('_', '-')} must be >= "
                            f"{0 if flag == 'heal_steps' else 1}, got {getattr(args, flag)}")
    if not (math.isfinite(args.heal_lr) and args.heal_lr > 0):
        raise UserError(f"--heal-lr must be a positive number, got {args.heal_lr}")
    fit = FitSettings(steps=args.fit_steps, lr=args.fit_lr) if args.fit_steps else None
    if args.calib_seed < 0:
        raise UserError(f"--calib-seed must be >= 0, got {args.calib_seed}")
    if fit is not None:
        check_calibration(args.calib_tokens, cfg.max_seq_len)
    model, tokenizer = load(args.model, dtype="float32", with_tokenizer=True)
    calib_all = encode_corpus(tokenizer, calib)
    if len(calib_all) < args.calib_tokens:
        raise UserError(f"--calib {args.calib} has {len(calib_all):,} tokens, fewer than --calib-tokens "
                        f"{args.calib_tokens:,}")
    calib_ids = calib_span(calib_all, args.calib_tokens, args.calib_seed)
    heal = None
    if args.heal_steps > 0:
        heal_text = calib_text(args.heal_data)
        assert heal_text is not None
        heal_tokens, heal_val = train_val_split(encode_corpus(tokenizer, heal_text))
        if min(len(heal_tokens), len(heal_val)) < args.heal_seq_len + 1:
            raise UserError(f"--heal-data {args.heal_data} is too short for one window of "
                            f"--heal-seq-len {args.heal_seq_len} + 1 in its validation tenth")
        if args.heal_seq_len > model.config.max_seq_len:
            raise UserError(f"--heal-seq-len {args.heal_seq_len} exceeds the model's max_seq_len "
                            f"{model.config.max_seq_len}")
        precision = choose_precision(heal_precision, model.device)
        print(f"heal {precision.line()}", flush=True)
        heal = Heal(heal_tokens, heal_val, steps=args.heal_steps, batch_size=args.heal_batch_size,
                    seq_len=args.heal_seq_len, lr=args.heal_lr, trainable=args.heal_trainable,
                    bf16=precision.bf16)
    with tqdm(total=len(ranks) * (1 + bool(heal) + bool(fit)) + 1, file=sys.stderr, desc="bench convert",
              unit="model", disable=args.quiet) as bar:
        def progress(label: str) -> None:
            bar.set_postfix_str(label)
            bar.update(1)

        report = run_convert_bench(model, tokenizer, calib_ids, text, ranks, rope_dim, args.method,
                                   args.seq_len, args.max_tokens,
                                   (str(args.model), args.data, args.calib), progress, heal,
                                   mode, deepseek, fit, args.sequential, args.calib_seed)
    _write_outputs(args, report.as_dict, lambda tmp: plot_convert_report(report, tmp))
    print(convert_table(report))
    _say_written(args)
    return 0


def cmd_bench_fp8(args: argparse.Namespace) -> int:
    from latentattn.bench.fp8cache import fp8_headline, plot_fp8_report, run_fp8_cache_bench
    from latentattn.data import load_text
    from latentattn.loading import load
    from latentattn.tokenizer import encode_corpus

    _check_outputs(args)
    if args.prompt_tokens < 1 or args.tokens < 2:
        raise UserError("--prompt-tokens must be >= 1 and --tokens >= 2")
    model, tokenizer = load(args.model, dtype="float32", with_tokenizer=True)
    need = args.prompt_tokens + args.tokens
    if need > model.config.max_seq_len:
        raise UserError(f"--prompt-tokens + --tokens = {need} exceeds the model's max_seq_len "
                        f"{model.config.max_seq_len}")
    ids = encode_corpus(tokenizer, load_text(args.data))
    if len(ids) < need:
        raise UserError(f"{args.data or 'the default text'} has {len(ids):,} tokens, fewer than "
                        f"--prompt-tokens + --tokens = {need:,}")
    report = run_fp8_cache_bench(model, ids, args.prompt_tokens, args.tokens,
                                 (str(args.model), args.data or "pydoc_data.topics (CPython)"),
                                 progress=not args.quiet)
    _write_outputs(args, report.as_dict, lambda tmp: plot_fp8_report(report, tmp))
    print("\n".join(fp8_headline(report)))
    _say_written(args)
    return 0


def cmd_bench_kernels(args: argparse.Namespace) -> int:
    import torch
    from tqdm import tqdm

    from latentattn.bench.kernel_report import kernel_table, plot_kernel_report
    from latentattn.bench.kernels import V3_DIMS, check_device, run_kernel_bench

    _check_outputs(args)
    choice = choose_device(args.device)
    device = check_device(choice.device)
    gpu = device.type == "cuda"
    contexts = args.contexts or (KERNEL_CONTEXTS_GPU if gpu else KERNEL_CONTEXTS_CPU)
    batches = args.batch_sizes or (KERNEL_BATCHES_GPU if gpu else KERNEL_BATCHES_CPU)
    heads = args.heads or (V3_DIMS["heads"] if gpu else 16)
    if min(contexts) < 1 or min(batches) < 1 or heads < 1 or args.index_topk < 1 or args.repeats < 1:
        raise UserError("--contexts, --batch-sizes, --heads, --index-topk and --repeats must be positive")
    # auto: the kernels' own precision on a GPU; the CPU runs only the PyTorch path, in fp32.
    auto = check_dtype(args.dtype) == "auto"
    dtype = (torch.bfloat16 if gpu else torch.float32) if auto else getattr(torch, args.dtype)
    with tqdm(total=len(contexts) * len(batches), file=sys.stderr, desc="bench kernels",
              disable=args.quiet) as bar:
        def progress(label: str) -> None:
            bar.set_postfix_str(label)
            bar.update(1)

        report = run_kernel_bench(device, dtype, contexts, batches, args.index_topk, args.repeats,
                                  {**V3_DIMS, "heads": heads}, progress)
    _write_outputs(args, report.as_dict, lambda tmp: plot_kernel_report(report, tmp))
    say_device(choice)  # after the work: an error stays the only line on stderr
    print(kernel_table(report))
    _say_written(args)
    return 0


def cmd_bench_precision(args: argparse.Namespace) -> int:
    import torch
    from tqdm import tqdm

    from latentattn.bench.precision import (
        PrecisionBenchSettings,
        convert_student,
        plot_precision_report,
        precision_table,
        run_precision_bench,
    )
    from latentattn.cli.convert import calib_text
    from latentattn.config import GQAConfig
    from latentattn.convert.calibrate import CALIB_WINDOW
    from latentattn.data import train_val_split
    from latentattn.loading import load, load_config
    from latentattn.tokenizer import encode_corpus

    _check_outputs(args)
    for flag, low in (("batch_size", 1), ("seq_len", 1), ("steps", 1), ("rounds", 1), ("warmup", 0),
                      ("kv_lora_rank", 1), ("calib_tokens", CALIB_WINDOW)):
        if getattr(args, flag) < low:
            raise UserError(f"--{flag.replace('_', '-')} must be >= {low}, got {getattr(args, flag)}")
    cfg = load_config(args.model)
    if not isinstance(cfg.attention, GQAConfig):
        raise UserError(f"{args.model} is {cfg.attention.name.upper()} already: bench precision "
                        "heals a GQA, MHA or MQA model converted to MLA")
    if args.seq_len > cfg.max_seq_len:
        raise UserError(f"--seq-len {args.seq_len} exceeds the model's max_seq_len {cfg.max_seq_len}")
    text = calib_text(args.data)
    assert text is not None  # --data defaults to builtin
    settings = PrecisionBenchSettings(batch_size=args.batch_size, seq_len=args.seq_len,
                                      warmup=args.warmup, steps=args.steps, rounds=args.rounds)
    teacher, tokenizer = load(args.model, dtype=torch.float32, with_tokenizer=True)
    ids = encode_corpus(tokenizer, text)
    tokens, val = train_val_split(ids)
    if min(len(tokens), len(val)) < args.seq_len + 1:
        raise UserError(f"--data {args.data} is too short for one window of --seq-len "
                        f"{args.seq_len} + 1 in its validation tenth")
    student = convert_student(teacher, ids[: args.calib_tokens], args.kv_lora_rank)
    with tqdm(total=2 * args.rounds, file=sys.stderr, desc="bench precision", unit="run",
              disable=args.quiet) as bar:
        report = run_precision_bench(teacher, student, tokens, val, settings,
                                     (str(args.model), f"MLA R={args.kv_lora_rank}, full rope"),
                                     progress=on_start(bar))
        bar.update(2 * args.rounds - bar.n)
    _write_outputs(args, report.as_dict, lambda tmp: plot_precision_report(report, tmp))
    print(precision_table(report))
    _say_written(args)
    return 0


def _compiler() -> Any:
    """``latentattn.compile``, after checking that it exists and that this machine can compile
    (``latentattn.model.compiled.compiler_error``: None, or the one-line reason it cannot)."""
    import importlib

    try:
        compiled = importlib.import_module("latentattn.model.compiled")
    except ImportError:
        raise UserError("--compile: latentattn.compile is not in this build "
                        "(latentattn.model.compiled is missing)") from None
    reason = compiled.compiler_error()
    if reason is not None:
        raise UserError(f"--compile: {reason}")
    import latentattn

    return getattr(latentattn, "compile", None) or compiled.compile


def cmd_bench_generate(args: argparse.Namespace) -> int:
    import gc

    import torch
    from tqdm import tqdm

    from latentattn.bench import generate as gb
    from latentattn.bench.generate_report import plot_generate_report, table
    from latentattn.bench.profile import profile_decode
    from latentattn.loading import load, load_config
    from latentattn.model.layout import decode_layout
    from latentattn.precision import cpu_bf16

    for path, flag in ((args.json, "--json"), (args.plot, "--plot"), (args.profile, "--profile")):
        if path is not None:
            check_parent(path, flag)
    if args.repeats < 1:
        raise UserError(f"--repeats must be >= 1, got {args.repeats}")
    if args.new_tokens < 2:
        raise UserError(f"--new-tokens must be >= 2 (decode is timed as t_N - t_1), got {args.new_tokens}")
    specs = list(dict.fromkeys(args.model))
    contexts = list(dict.fromkeys(args.contexts))
    dtype = _bench_dtype(args.dtype)
    compile_model = _compiler() if args.compile else None
    if args.max_seq_len is not None and args.max_seq_len < 1:
        raise UserError(f"--max-seq-len must be >= 1, got {args.max_seq_len}")
    overrides = {} if args.max_seq_len is None else {"max_seq_len": args.max_seq_len}
    for spec in specs:  # every model's config first: a bad one fails before anything is timed
        cfg = load_config(spec, **overrides)
        need = max(contexts) + args.new_tokens
        if need > cfg.max_seq_len:
            raise UserError(f"--model {spec}: --contexts {max(contexts):,} + --new-tokens "
                            f"{args.new_tokens} = {need:,} tokens exceeds the model's max_seq_len "
                            f"{cfg.max_seq_len:,}")
    include_hf = not args.no_transformers
    if include_hf and not gb.hf_available():
        print(f"latentattn: transformers is not installed, skipping its generate ({gb.HF_EXTRA_HINT} "
              "to include it)", file=sys.stderr)
        include_hf = False
    notes = []
    if dtype == torch.bfloat16 and not cpu_bf16().native:
        notes.append("bfloat16 on a CPU without native bf16 (no avx512_bf16 / amx_bf16): emulated "
                     "and slow")
        print(f"latentattn: {notes[-1]}", file=sys.stderr)
    if not include_hf:
        notes.append("transformers: not run" + (" (--no-transformers)" if args.no_transformers else ""))
    bandwidth = gb.measure_read_bandwidth()
    report = gb.new_report(contexts, args.new_tokens, args.repeats, dtype, args.compile, args.seed,
                           bandwidth)
    report.notes += notes

    def save(r: gb.GenerateReport) -> None:
        if args.json is not None:
            write_json(args.json, r.as_dict())

    total = len(specs) * len(contexts) * (2 if include_hf else 1)
    profiles: list[str] = []
    with tqdm(total=total, file=sys.stderr, desc="bench generate", unit="run",
              disable=args.quiet) as bar:
        progress = on_start(bar)
        for spec in specs:
            bar.set_postfix_str(f"loading {spec}")
            model = load(spec, dtype=dtype, seed=args.seed, **overrides)
            entry = gb.model_entry(spec, model)
            report.models.append(entry)
            hf = None
            if include_hf:
                try:
                    hf, entry.transformers = gb.to_transformers(model)
                except ValueError as e:
                    entry.transformers_note = str(e)
                    bar.total -= len(contexts)
                    bar.refresh()
            else:
                entry.transformers_note = "--no-transformers" if args.no_transformers else "not installed"
            # After transformers' copy is made: what `latentattn generate` runs.
            if compile_model is not None:
                model = compile_model(model)
            else:
                decode_layout(model)
            gb.run_model(report, spec, model, hf, progress=progress, on_point=save)
            if args.profile is not None:
                bar.set_postfix_str(f"profiling {spec}")
                profiles.append(f"## {spec}, {dtype}, {'compiled' if args.compile else 'eager'}\n"
                                + profile_decode(model, gb.prompt_ids(model.config.vocab_size,
                                                                      max(contexts), args.seed)))
            del model, hf
            gc.collect()
        bar.update(bar.total - bar.n)
    if hasattr(os, "getloadavg"):
        report.machine["loadavg_1_5_15_at_end"] = [round(x, 2) for x in os.getloadavg()]
    save(report)
    if args.profile is not None:
        text = "\n\n".join(profiles)
        atomic_write(args.profile, lambda tmp: Path(tmp).write_text(text), suffix=".txt")
    if args.plot is not None:
        atomic_write(args.plot, lambda tmp: plot_generate_report(report, tmp), suffix=".png")
    print(table(report))
    _say_written(args)
    return 0


def register(sub: Any) -> None:
    from latentattn.cli.convert import add_calibration_flags, parse_format

    bench = sub.add_parser("bench", help="benchmarks", description="Benchmarks.")
    bsub = bench.add_subparsers(dest="bench_command", required=True, metavar="BENCHMARK")

    def bench_parser(name: str, help: str, description: str, timed: bool = False) -> argparse.ArgumentParser:
        """A benchmark subcommand: every one prints its results and writes JSON and a plot only
        where --json / --plot are given, with a progress bar; a timed one (``_check_timed``) also
        takes a dtype and the tests' small dims."""
        b = bsub.add_parser(name, help=help, description=description + OUTPUTS)
        b.add_argument("--json", default=None, metavar="OUT.json", help="also write the results here")
        b.add_argument("--plot", default=None, metavar="OUT.png", help="also write a plot here")
        b.add_argument("--quiet", action="store_true", help="no progress bar")
        if timed:
            add_dtype_arg(b, default="float32", help=TIMED_DTYPE_HELP)
            b.add_argument("--tiny", action="store_true", help=argparse.SUPPRESS)  # small dims, tests
        return b

    gen = bench_parser(
        "generate", help="whole-model prefill and decode tokens/s against transformers and the roofline",
        description="Whole-model generation, batch 1, greedy, from a random prompt of each --contexts "
        "length: latentattn's prefill tokens/s (a generate of 1 new token) and decode tokens/s "
        "((t_N - t_1) / (N - 1) over a generate of --new-tokens N), after one untimed warm-up "
        "generation, against transformers' generate on the same weights and dtype (Llama for GQA "
        "models, DeepSeek's models for MLA/DSA in DeepSeek's format; skipped with a note where "
        "transformers cannot run the model) and against the memory roofline: this machine's read "
        "bandwidth (measured first: torch.sum over 1 GiB) over the bytes a decode step reads (every "
        "weight once, the embedding's one row, the KV cache at that context). --compile: "
        "latentattn.compile the model first and report each point's cold compile time.")
    gen.add_argument("--model", required=True, action="append", metavar="SPEC",
                     help="the model (repeat for several): a preset, checkpoint, run directory, "
                     "GGUF file or installed model (smollm2-135m)")
    gen.add_argument("--contexts", type=int_list, default=[512, 2048, 8192], metavar="N1,N2,...",
                     help="prompt lengths in tokens (512,2048,8192)")
    add_deprecated(gen, "--context", "--contexts", type=int_list)
    gen.add_argument("--new-tokens", type=int, default=32, metavar="N",
                     help="decoded tokens per timed generation (32; at least 2)")
    add_dtype_arg(gen, default="float32", help="weights, cache and compute dtype on both sides "
                  "(float32; auto: bfloat16 on a CPU with native bf16, else float32)")
    gen.add_argument("--compile", action="store_true",
                     help="latentattn.compile the model (needs a C++ compiler); transformers stays eager")
    gen.add_argument("--no-transformers", action="store_true", help="skip transformers' generate")
    gen.add_argument("--profile", type=Path, default=None, metavar="FILE",
                     help="also write torch.profiler's table of 8 decode steps at the longest "
                     "context for each model (operators by input shape: where the time goes)")
    gen.add_argument("--max-seq-len", type=int, default=None, metavar="N",
                     help="override the models' context limit (a preset such as tiny-dsa at 32k)")
    gen.add_argument("--repeats", type=int, default=3, metavar="N",
                     help="timed generations of 1 and of N tokens per point, medians (3)")
    gen.add_argument("--seed", type=int, default=0,
                     help="the random prompts' seed and random-init presets' weights (0)")
    gen.set_defaults(func=cmd_bench_generate)

    dec = bench_parser(
        "decode", help="time one decode step of one attention layer per variant",
        description="Time one decode step (one new token per row) of one attention layer at "
        "DeepSeek-V2-Lite dims: MHA, GQA-8, MLA naive, MLA absorbed and transformers' "
        "DeepseekV3Attention with the same weights and cache.", timed=True)
    dec.add_argument("--contexts", type=int_list, default=[1024, 2048, 4096, 8192, 16384],
                     help="comma-separated cached context lengths (1024,2048,4096,8192,16384)")
    dec.add_argument("--batch-sizes", type=int_list, default=[1, 8], metavar="B1,B2,...",
                     help="comma-separated batch sizes (1,8)")
    add_deprecated(dec, "--batches", "--batch-sizes", type=int_list)
    dec.add_argument("--repeats", type=int, default=5,
                     help="timed calls per point, median reported (5; calls over 2 s get 2)")
    dec.add_argument("--no-hf", action="store_true",
                     help="skip the transformers DeepseekV3Attention peer")
    dec.set_defaults(func=cmd_bench_decode)

    dsa = bench_parser(
        "dsa", help="DeepSeek Sparse Attention vs dense absorbed MLA: decode and prefill",
        description="One layer at DeepSeek-V3.2 dims, batch 1. Decode: the attention part of one "
        "step for dense absorbed MLA and for DSA (indexer + top-k + gathered attention) at each "
        "--index-topks, with the indexer's share. Prefill: DSA's masked MHA mode vs gathered form (and "
        "dense MLA), the faster form per length and the crossover.", timed=True)
    dsa.add_argument("--decode-contexts", type=int_list,
                     default=[1024, 2048, 4096, 8192, 16384, 32768, 65536],
                     help="cached contexts for decode (1024,...,65536)")
    dsa.add_argument("--prefill-contexts", type=int_list, default=[1024, 2048, 4096, 8192, 16384],
                     help="prompt lengths for prefill (1024,...,16384); the largest take minutes")
    dsa.add_argument("--index-topks", type=int_list, default=[512, 2048], metavar="K1,K2,...",
                     help="DSA's index_topk values (512,2048)")
    add_deprecated(dsa, "--topks", "--index-topks", type=int_list)
    dsa.add_argument("--repeats", type=int, default=5, help="timed decode calls per point (5)")
    dsa.set_defaults(func=cmd_bench_dsa)

    v4b = bench_parser(
        "v4", help="DeepSeek-V4 sliding/CSA/HCA layers vs V3.2 DSA and dense MLA: decode and prefill",
        description="One attention layer of each DeepSeek-V4 type (sliding, CSA, HCA) at V4-Flash "
        "dims, batch 1: decode-step time against context beside DeepSeek-V3.2's DSA step and dense "
        "absorbed MLA (bench dsa's layer at V3.2 dims, top-k 2048), with each step's FLOP and bytes "
        "and the time they predict at this machine's measured GEMM and copy rates; then the "
        "prefill of one CSA and one HCA layer in chunks through its cache. Caches are filled "
        "directly with random values. Every point runs in a fresh process (its peak RSS is its "
        "own); points predicted not to fit in memory are skipped with the reason. The JSON and "
        "plot are rewritten after every point.")
    v4b.add_argument("--contexts", type=int_list, default=None,
                     help="cached contexts for decode (4096,16384,65536,131072,262144,1048576)")
    v4b.add_argument("--kinds", type=lambda t: [k for k in t.split(",") if k], default=list(KINDS_V4),
                     help="layers to time (sliding,csa,hca,dsa,mla)")
    v4b.add_argument("--prefill", type=int_list, default=None,
                     help="prompt lengths for the CSA/HCA prefill (32768,131072)")
    v4b.add_argument("--no-prefill", action="store_true", help="decode points only")
    v4b.add_argument("--chunk", type=int, default=None, help="prefill chunk in tokens (4096)")
    v4b.add_argument("--repeats", type=int, default=5,
                     help="timed decode calls per point, median reported (5; calls over 2 s get 2)")
    add_dtype_arg(v4b, default="float32", help=TIMED_DTYPE_HELP)
    v4b.add_argument("--memory-gib", type=float, default=None,
                     help="skip points predicted to peak above this (default: 90%% of MemAvailable)")
    v4b.add_argument("--quick", action="store_true",
                     help="tiny dims and contexts (64,256), prefill 128 in chunks of 32: a smoke run")
    v4b.set_defaults(func=cmd_bench_v4)

    conv = bench_parser(
        "convert", help="KV bytes and perplexity of a GQA model converted to MLA at each rank",
        description="Calibrate --model (a GQA / MHA / MQA model) on --calib, convert it to MLA at "
        "each of --ranks with --rope-dim rotary dims (latentattn convert), and evaluate the source "
        "and each conversion on --data (which should not be the calibration text): KV cache bytes "
        "per token against the source's, perplexity and nats per byte; then heal each conversion for "
        "--heal-steps steps on --heal-data, distilling from the source (latentattn train --teacher), "
        "and evaluate it again.")
    conv.add_argument("--model", required=True, metavar="SPEC", help="the GQA / MHA / MQA model")
    conv.add_argument("--data", required=True, metavar="FILE", help="UTF-8 evaluation text")
    conv.add_argument("--calib", default="builtin", metavar="FILE|builtin",
                      help="calibration text (builtin: CPython's pydoc prose)")
    conv.add_argument("--calib-tokens", type=int, default=4096, metavar="N", help="(4096)")
    conv.add_argument("--ranks", default=None, metavar="R1,R2,...",
                      help="latent ranks, 'full' allowed (default: those giving 1/3, 1/2 and 2/3 of "
                      "the source's cache at --rope-dim; 64,128,192 for smollm2-135m)")
    conv.add_argument("--rope-dim", default=None, metavar="D|full",
                      help="rotary dims, as latentattn convert's (default: head_dim, RoRoPE)")
    conv.add_argument("--method", choices=list(CONVERT_METHODS), default="pca",
                      help="factorisation, as latentattn convert's (pca)")
    add_calibration_flags(conv)
    conv.add_argument("--rope-mode", choices=["blocks", "rorope"], default=None,
                      help="as latentattn convert's (rorope for a head-wide --rope-dim and "
                      "--format deepseek, blocks otherwise)")
    conv.add_argument("--format", type=parse_format, default="latentattn",
                      metavar="{latentattn,deepseek}",
                      help="deepseek: convert as convert --format deepseek does (RoRoPE and the "
                      "fitted latent RMSNorm), to measure what that format costs (latentattn)")
    conv.add_argument("--seq-len", type=int, default=512, metavar="N", help="eval window (512)")
    conv.add_argument("--fit-steps", type=int, default=0, metavar="N",
                      help="fit each converted model's attention layers to the source's outputs for N "
                      "steps a layer before healing (convert --fit-steps; 0, the default: no fit)")
    conv.add_argument("--fit-lr", type=float, default=1e-3, metavar="LR",
                      help="peak learning rate of that fit (1e-3)")
    conv.add_argument("--heal-steps", type=int, default=100, metavar="N",
                      help="heal each converted model for N steps, distilling from the source "
                      "(100; 0: no heal)")
    conv.add_argument("--heal-data", default="builtin", metavar="FILE|builtin",
                      help="the healing text (builtin: CPython's pydoc prose, the default "
                      "calibration text); keep it apart from --data")
    conv.add_argument("--heal-lr", type=float, default=3e-4, metavar="LR",
                      help="peak LR (3e-4: the best of 1e-4, 3e-4 and 1e-3 in a 30-step SmolLM2 pilot)")
    conv.add_argument("--heal-batch-size", type=int, default=2, metavar="N",
                      help="sequences per heal step (2)")
    conv.add_argument("--heal-seq-len", type=int, default=256, metavar="N",
                      help="tokens per heal sequence (256)")
    conv.add_argument("--heal-trainable", choices=["all", "attention"], default="attention",
                      help="the weights a heal trains (attention)")
    add_dtype_arg(conv, flag="--heal-dtype", default="auto",
                  help="the heals' precision, as train --dtype: bfloat16 is autocast over fp32 "
                  "weights; auto (default) takes bfloat16 on a CPU with native bf16 (AVX-512 BF16 "
                  "or AMX), float32 elsewhere")
    add_deprecated(conv, "--heal-precision", "--heal-dtype", type=dtype_name)
    conv.add_argument("--max-tokens", type=int, default=4097, metavar="N",
                      help="evaluate the first N tokens of --data (4097: 8 windows of 512)")
    conv.set_defaults(func=cmd_bench_convert)

    ker = bench_parser(
        "kernels", help="Triton kernels against the PyTorch path: GB/s, TFLOP/s, time",
        description="Dense absorbed MLA decode (bytes moved per step with the latent counted once, "
        "as FlashMLA counts it, and GB/s against this device's measured copy bandwidth) and sparse "
        "top-k decode (TFLOP/s and time against the dense kernel) at DeepSeek-V3/V3.2 dims "
        "(512 + 64 latent, --heads query heads), Triton kernels and the PyTorch path on the same "
        "device. The PyTorch path is what the model runs at decode without the kernels: its cache "
        "read (fp8 records dequantised), its decode step's mask and its own attention call. A "
        "point that fails (out of memory, say) is reported as missing, with its reason. On a CPU "
        "only the PyTorch path runs: the kernels need a GPU.")
    add_device_arg(ker)
    add_dtype_arg(ker, default="auto", help="auto (default): bfloat16 on a GPU, float32 on a CPU")
    ker.add_argument("--contexts", type=int_list, default=None,
                     help=f"cached tokens per sequence (GPU: {_csv(KERNEL_CONTEXTS_GPU)}; CPU: "
                     f"{_csv(KERNEL_CONTEXTS_CPU)})")
    ker.add_argument("--batch-sizes", type=int_list, default=None, metavar="B1,B2,...",
                     help=f"sequences (GPU: {_csv(KERNEL_BATCHES_GPU)}; CPU: {_csv(KERNEL_BATCHES_CPU)})")
    add_deprecated(ker, "--batches", "--batch-sizes", type=int_list)
    ker.add_argument("--heads", type=int, default=None,
                     help=f"query heads (GPU: {KERNEL_HEADS_GPU}; CPU: 16)")
    ker.add_argument("--index-topk", type=int, default=2048, metavar="K",
                     help="sparse: selected latents (2048)")
    add_deprecated(ker, "--topk", "--index-topk", type=int)
    ker.add_argument("--repeats", type=int, default=10, help="timed calls, median (10)")
    ker.set_defaults(func=cmd_bench_kernels)

    fp8 = bench_parser(
        "fp8-cache", help="accuracy of MLA's fp8 latent cache against a bf16 one",
        description="Decode the same text through a bf16 latent cache and through FlashMLA's fp8 "
        "record (e4m3 latent with one fp32 scale per 128 values, bf16 rope part: 656 bytes per "
        "token at DeepSeek's dims): teacher-forced logit error, KL and argmax agreement per step, "
        "and the agreement of free-running greedy decoding. --model: an MLA or DSA model with "
        "real weights (a train run, a converted model, a DeepSeek checkpoint).")
    fp8.add_argument("--model", required=True, metavar="SPEC", help="an MLA or DSA model")
    fp8.add_argument("--data", default=None, metavar="FILE",
                     help="UTF-8 text (default: CPython's pydoc prose)")
    fp8.add_argument("--prompt-tokens", type=int, default=64, metavar="N", help="prefilled (64)")
    fp8.add_argument("--tokens", type=int, default=256, metavar="N", help="decoded tokens (256)")
    fp8.set_defaults(func=cmd_bench_fp8)

    prec = bench_parser(
        "precision", help="one heal (distillation) step in fp32 and in bf16 autocast on this machine",
        description="Convert --model to MLA at --kv-lora-rank and time heal steps of it distilling "
        "from the source (bench convert's heal: latentattn train --teacher, attention weights "
        "trained) in fp32 and in bf16 autocast, on this CPU, from the same weights and batches: "
        "median seconds per step with a bootstrap 95% interval, the ratio, and this CPU's bf16 "
        "flags (avx512_bf16, amx_bf16). What train --dtype auto rests on.")
    prec.add_argument("--model", default="smollm2-135m", metavar="SPEC",
                      help="the GQA / MHA / MQA source (smollm2-135m)")
    prec.add_argument("--data", default="builtin", metavar="FILE|builtin",
                      help="calibration and healing text (builtin: CPython's pydoc prose)")
    prec.add_argument("--kv-lora-rank", type=int, default=128, metavar="R",
                      help="the student's latent rank (128)")
    prec.add_argument("--calib-tokens", type=int, default=512, metavar="N",
                      help="calibration tokens for the conversion (512; timing does not need a good one)")
    prec.add_argument("--batch-size", type=int, default=2, metavar="N",
                      help="sequences per step (2, as bench convert --heal-batch-size)")
    prec.add_argument("--seq-len", type=int, default=256, metavar="N",
                      help="tokens per sequence (256, as --heal-seq-len)")
    prec.add_argument("--warmup", type=int, default=1, metavar="N",
                      help="untimed steps at the start of each run (1)")
    prec.add_argument("--steps", type=int, default=3, metavar="N", help="timed steps per run (3)")
    prec.add_argument("--rounds", type=int, default=2, metavar="N",
                      help="runs per precision, alternating which goes first (2)")
    prec.set_defaults(func=cmd_bench_precision)

    idx = bench_parser(
        "indexer", help="does the DSA indexer learn? attention-mass recall before/after warm-up",
        description="Pretrain a small MLA+DSA model densely on real text, then run the DeepSeek-V3.2 "
        "indexer warm-up (everything frozen but the indexer, KL to the main attention). Reports, "
        "per layer, the dense attention mass inside the indexer's top-k before and after, beside "
        "the k most recent keys and k random keys, and the validation loss dense vs top-k.")
    idx.add_argument("--data", default=None, metavar="PATH",
                     help="UTF-8 text file (default: CPython's pydoc_data.topics prose)")
    idx.add_argument("--pretrain-steps", type=int, default=300, help="dense LM steps (300)")
    idx.add_argument("--warmup-steps", type=int, default=200, help="indexer warm-up steps (200)")
    idx.add_argument("--index-topk", type=int, default=32, metavar="K", help="DSA's index_topk (32)")
    add_deprecated(idx, "--topk", "--index-topk", type=int)
    idx.add_argument("--seq-len", type=int, default=256, help="tokens (bytes) per sequence (256)")
    idx.add_argument("--batch-size", type=int, default=8, metavar="N", help="sequences per step (8)")
    add_deprecated(idx, "--batch", "--batch-size", type=int)
    idx.add_argument("--seed", type=int, default=0)
    idx.set_defaults(func=cmd_bench_indexer)
