"""``latentattn kv-cache`` and ``latentattn info``: what a model's config implies, read through
``latentattn.load_config`` (no weights are touched, so a 671B checkpoint is read in milliseconds)."""

from __future__ import annotations

import argparse
import json
from typing import Any

from latentattn.cli.common import (
    UserError,
    add_model_args,
    attention_summary,
    fmt_bytes,
    fmt_count,
    fmt_int,
    model_overrides,
    render_table,
)
from latentattn.config import MLAConfig, ModelConfig


def _config(args: argparse.Namespace) -> ModelConfig:
    from latentattn.loading import load_config

    return load_config(args.model, **model_overrides(args))


def cmd_kv_cache(args: argparse.Namespace) -> int:
    from latentattn.calc.kv_bytes import kv_table

    if args.context < 1 or args.batch < 1:
        raise UserError("--context and --batch must be positive")
    cfg = _config(args)
    table = kv_table(cfg, args.context, args.batch)
    if args.json:
        print(json.dumps(table.as_dict(), indent=2))
        return 0
    headers = ["", "form", "B/token/layer", f"B/token ({cfg.n_layers} layers)",
               f"per seq @ {args.context:,}"]
    if args.batch > 1:
        headers.append(f"x batch {args.batch}")
    headers += ["vs MHA", "formula"]
    rows = []
    for r in table.rows:
        ratio = r.ratio_vs_mha
        vs = "1.00x" if ratio == 1 else (f"{1 / ratio:,.1f}x smaller" if ratio < 1
                                        else f"{ratio:,.2f}x larger")
        cells = ["*" if r.own else "", r.label, fmt_int(r.bytes_per_token_per_layer),
                 fmt_int(r.bytes_per_token), fmt_bytes(r.bytes_per_sequence)]
        if args.batch > 1:
            cells.append(fmt_bytes(r.bytes_total))
        cells += [vs, r.formula]
        rows.append(cells)
    right = set(range(2, len(headers) - 1))
    print(f"KV cache of {cfg.name}: {attention_summary(cfg)}; {cfg.n_layers} layers")
    print(render_table(headers, rows, right))
    print("* = this model's configured cache form")
    print(f"Note: {table.note}.")
    return 0


def cmd_info(args: argparse.Namespace) -> int:
    from latentattn.calc.kv_bytes import cache_bytes_per_token_per_layer
    from latentattn.calc.params import count_parameters

    cfg = _config(args)
    p = count_parameters(cfg)
    bpl = cache_bytes_per_token_per_layer(cfg)
    lines = [
        f"model:        {cfg.name}",
        f"attention:    {attention_summary(cfg)}",
        f"layers:       {cfg.n_layers}",
        f"hidden size:  {cfg.dim:,}  (dense FFN {cfg.intermediate_size:,})",
        f"vocab:        {cfg.vocab_size:,}",
        f"max context:  {cfg.max_seq_len:,}",
    ]
    y = cfg.rope.yarn
    rope = f"theta {cfg.rope.theta:g}, {'interleaved' if cfg.rope.interleaved else 'half-split'}"
    if y is not None:
        rope += f", YaRN x{y.factor:g} from {y.original_max_position_embeddings:,}"
    lines.append(f"rope:         {rope}")
    if cfg.moe is not None:
        m = cfg.moe
        lines.append(
            f"MoE:          {m.n_routed_experts} routed + {m.n_shared_experts} shared experts, "
            f"{m.num_experts_per_tok} per token, expert FFN {m.moe_intermediate_size:,}, "
            f"first {m.first_k_dense_replace} layer(s) dense, {m.scoring_func}/{m.topk_method}"
        )
    else:
        lines.append("MoE:          none (dense)")
    lines.append(f"parameters:   {fmt_int(p['total'])} ({fmt_count(p['total'])}) total"
                 " (no multi-token-prediction module)")
    if cfg.moe is not None:
        lines.append(f"active/token: {fmt_int(p['active'])} ({fmt_count(p['active'])})")
    lines.append(
        f"  embedding {fmt_count(p['embedding'])}, lm_head {fmt_count(p['lm_head'])}, "
        f"attention {fmt_count(p['attention'])}, dense FFN {fmt_count(p['dense_mlp'])}, "
        f"routed experts {fmt_count(p['moe_routed'])}, shared experts {fmt_count(p['moe_shared'])}"
    )
    form = ("MLA " + ("naive (decompressed)" if cfg.attention.impl == "naive" else "latent")
            if isinstance(cfg.attention, MLAConfig) else cfg.attention.name.upper())
    lines.append(f"KV cache:     {fmt_int(bpl)} B per token per layer ({form}, bf16), "
                 f"{fmt_int(bpl * cfg.n_layers)} B per token")
    print("\n".join(lines))
    return 0


def register(sub: Any) -> None:
    kv = sub.add_parser("kv-cache", help="KV-cache bytes per token: MHA, GQA, MQA and MLA forms",
                        description="Formula KV-cache bytes per token for the model's own cache "
                        "form and the forms it is compared against (bf16 unless a row says fp8).")
    add_model_args(kv, weights=False)
    kv.add_argument("--context", type=int, default=131072, help="tokens per sequence (131072)")
    kv.add_argument("--batch", type=int, default=1, help="sequences (1)")
    kv.add_argument("--json", action="store_true", help="print JSON instead of a table")
    kv.set_defaults(func=cmd_kv_cache)

    info = sub.add_parser("info", help="config summary, parameter counts, cache bytes",
                          description="Summarise a model's config; parameters are counted from "
                          "the config without allocating the model.")
    add_model_args(info, weights=False)
    info.set_defaults(func=cmd_info)
