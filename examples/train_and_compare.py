"""Train small models that differ only in their attention, over a few seeds, and compare them.

MHA, GQA and MLA from one family (``latentattn.train.family``): same depth, width and heads, each
variant's FFN width chosen so that its parameter count matches MHA's. Every variant trains on the
same text with the same settings; a seed fixes the initialisation and the data order, so the runs
pair by seed. The script prints each variant's KV-cache bytes per token (what its cache really
allocates), its validation loss over the seeds, and the paired difference MLA - MHA with its 95%
t interval.

This is the idea in ~100 lines. The real protocol (learning rates tuned per variant, equivalence
margins, DSA and DeepSeek-V4, plots, resumable runs) is ``latentattn compare``.

    python examples/train_and_compare.py                 # ~1M parameters, 200 steps, 3 seeds
    python examples/train_and_compare.py --tiny          # seconds: a smoke test
    python examples/train_and_compare.py --data my.txt --steps 500 --seeds 5 --out cmp.json
"""

from __future__ import annotations

import argparse
import json
import time

import latentattn
from latentattn.compare.stats import Summary, paired
from latentattn.data import load_text, train_val_split
from latentattn.tokenizer import ByteTokenizer, encode_corpus
from latentattn.train import TrainSettings, train
from latentattn.train.family import FamilySize, matched_configs

VARIANTS = ("mha", "gqa", "mla")
MARGIN = 0.02  # nats/byte: the equivalence margin `latentattn compare` uses by default
TINY = FamilySize(dim=32, n_layers=2, n_heads=4, seq_len=64, gqa_kv_heads=2, kv_lora_rank=16,
                  q_lora_rank=16, qk_rope_head_dim=4)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--steps", type=int, default=None, help="training steps per run (200; --tiny: 20)")
    p.add_argument("--seeds", type=int, default=None, help="seeds per variant, at least 2 (3; --tiny: 2)")
    p.add_argument("--data", default=None, help="UTF-8 text file (default: CPython's pydoc topics)")
    p.add_argument("--batch-size", type=int, default=None, help="sequences per step (16; --tiny: 4)")
    p.add_argument("--eval-windows", type=int, default=None,
                   help="validation windows to score (0: the whole validation split; --tiny: 16)")
    p.add_argument("--tiny", action="store_true", help="a tiny family and tiny defaults: a smoke test")
    p.add_argument("--out", default=None, help="write every number to this JSON file")
    args = p.parse_args()
    size = TINY if args.tiny else FamilySize()
    given = (args.steps, args.seeds, args.batch_size, args.eval_windows)
    steps, n_seeds, batch, windows = (
        x if x is not None else default
        for x, default in zip(given, (20, 2, 4, 16) if args.tiny else (200, 3, 16, 0), strict=True))
    seeds = list(range(n_seeds))

    # Bytes as tokens, the last tenth held out: what `latentattn train` does with its --data.
    tokens = encode_corpus(ByteTokenizer(), load_text(args.data))
    train_tokens, val_tokens = train_val_split(tokens)
    configs = matched_configs(size, VARIANTS)

    loss: dict[str, dict[int, float]] = {v: {} for v in VARIANTS}
    kv_bytes: dict[str, float] = {}
    params: dict[str, int] = {}
    for name, cfg in configs.items():
        for seed in seeds:
            model = latentattn.load(cfg, seed=seed).train()
            settings = TrainSettings(steps=steps, batch_size=batch, seq_len=size.seq_len, seed=seed,
                                     warmup_steps=max(1, steps // 10), eval_every=0,
                                     eval_windows=windows)
            t0 = time.perf_counter()
            result = train(model, train_tokens, val_tokens, settings, progress=False)
            loss[name][seed] = result.final_val_loss
            print(f"{name} seed {seed}: validation loss {result.final_val_loss:.4f} nats/byte "
                  f"({time.perf_counter() - t0:.1f} s)", flush=True)
        # What one token costs in the cache this model really allocates (fp32, every layer).
        kv_bytes[name] = model.make_cache(batch=1, capacity=size.seq_len).bytes_per_token
        params[name] = sum(p.numel() for p in model.parameters())

    print(f"\n{'variant':<8} {'params':>8} {'KV B/token':>11} {'val loss (nats/byte)':>22}")
    for name in VARIANTS:
        print(f"{name:<8} {params[name]:>8,} {kv_bytes[name]:>11,.0f} "
              f"{Summary.of(list(loss[name].values())).fmt(4):>22}")
    diff = paired(loss["mla"], loss["mha"], MARGIN)
    lo, hi = diff.interval(0.95) or (float("nan"), float("nan"))
    print(f"\nMLA - MHA by seed: {', '.join(f'{d:+.4f}' for d in diff.differences)}")
    print(f"mean {diff.mean:+.4f}, 95% t interval [{lo:+.4f}, {hi:+.4f}] over {diff.n} seeds "
          f"({diff.verdict} at margin {MARGIN}); MLA's cache is "
          f"{kv_bytes['mla'] / kv_bytes['mha']:.2f}x MHA's")

    if args.out:
        report = {"steps": steps, "seeds": seeds, "data": args.data or "pydoc_data.topics",
                  "variants": {v: {"params": params[v], "kv_bytes_per_token": kv_bytes[v],
                                   "val_loss": {str(s): x for s, x in loss[v].items()}}
                               for v in VARIANTS},
                  "mla_minus_mha": diff.as_dict()}
        with open(args.out, "w") as f:
            json.dump(report, f, indent=2)
        print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
