"""Convert a Llama-family model to MLA in DeepSeek's format, heal it by distillation from the
source, and export a Hugging Face checkpoint that vLLM and SGLang serve.

    python examples/convert_and_export.py --model smollm2-135m --out smol-mla --heal-steps 60

The three steps the command line runs as `latentattn convert --format deepseek`, `latentattn
train --model CONVERTED --teacher SRC --trainable attention` and `latentattn export`, here in
Python. Before and after healing it prints the perplexity on a held-out part of the text, and at
the end it checks that transformers' DeepseekV3ForCausalLM reads the export with our logits.
"""

from __future__ import annotations

import argparse
import math
from pathlib import Path

import torch

import latentattn
from latentattn.data import default_text, load_text, train_val_split
from latentattn.interop.hf import save_pretrained_dir
from latentattn.tokenizer import encode_corpus
from latentattn.train import TrainSettings, evaluate, train


def perplexity(model: latentattn.Transformer, tokens: torch.Tensor, seq_len: int) -> float:
    """On the first 8 windows of ``tokens``: enough to see a conversion's loss and its healing."""
    settings = TrainSettings(seq_len=seq_len, batch_size=2, eval_windows=8)
    return math.exp(evaluate(model, tokens, settings))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default="smollm2-135m", help="a GQA / MHA / MQA model latentattn loads")
    p.add_argument("--out", required=True, type=Path, help="the exported checkpoint (a new directory)")
    p.add_argument("--kv-lora-rank", type=int, default=None, help="latent rank (default: half the cache)")
    p.add_argument("--data", default=None, help="healing text (default: CPython's help topics)")
    p.add_argument("--heal-steps", type=int, default=60)
    p.add_argument("--lr", type=float, default=3e-4)
    p.add_argument("--batch-size", type=int, default=2)
    p.add_argument("--seq-len", type=int, default=256)
    args = p.parse_args()

    # 1. Convert: PCA latent on a calibration text, one head-wide RoRoPE key, DeepSeek's latent norm.
    result = latentattn.convert_model(args.model, kv_lora_rank=args.kv_lora_rank, format="deepseek")
    print(*result.summary(), sep="\n")
    model, tokenizer = result.model, result.tokenizer
    assert tokenizer is not None

    # 2. Heal: pure distillation from the source, only the converted attention layers train.
    text = default_text() if args.data is None else load_text(args.data)
    train_tokens, val_tokens = train_val_split(encode_corpus(tokenizer, text))
    teacher = latentattn.load(args.model, dtype=torch.float32)
    seq_len = min(args.seq_len, model.config.max_seq_len)
    print(f"perplexity: source {perplexity(teacher, val_tokens, seq_len):.2f}, "
          f"converted {perplexity(model, val_tokens, seq_len):.2f}")
    settings = TrainSettings(steps=args.heal_steps, batch_size=args.batch_size, seq_len=seq_len,
                             lr=args.lr, warmup_steps=max(1, args.heal_steps // 10), eval_every=0,
                             eval_windows=8, distill_weight=1.0, trainable="attention")
    train(model, train_tokens, val_tokens, settings, teacher=teacher, progress=False)
    print(f"perplexity after {args.heal_steps} heal steps: {perplexity(model, val_tokens, seq_len):.2f}")

    # 3. Export in bf16, the dtype vLLM and SGLang serve, then read it back through transformers.
    out = save_pretrained_dir(model.to(torch.bfloat16), args.out, tokenizer)
    print(f"wrote {out}")
    try:
        from transformers import DeepseekV3ForCausalLM
    except ImportError:
        return
    theirs = DeepseekV3ForCausalLM.from_pretrained(out, dtype=torch.float32).eval()
    ours = latentattn.load(out, dtype=torch.float32)
    ids = val_tokens[:64].unsqueeze(0)
    with torch.no_grad():
        diff = (theirs(ids).logits - ours(ids)).abs().max().item()
    print(f"transformers' DeepseekV3ForCausalLM reads it: max |logit difference| {diff:.2e}")


if __name__ == "__main__":
    main()
