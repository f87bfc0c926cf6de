"""Prefill a DeepSeek Sparse Attention (DSA) model with a long context, then decode through its cache.

DSA (DeepSeek-V3.2) keeps MLA's latent cache and adds a small indexer key per token; for every
query the indexer picks the top-k cached tokens and the attention reads only those latents. So
the cache stays MLA-sized (far below a per-head K/V cache), and each decode step's attention
reads ``index_topk`` latents whatever the context (its indexer still scores every cached key, with
a few small heads). The script reports prefill tokens/s, decode ms per
token, the cache's bytes against the caches MLA and MHA-style attention would hold at that
context, and the share of the keys each query reads.

The model is ``tiny-dsa`` with random weights (the generated text is noise; the timings and bytes
are what this shows). Timings depend on the machine and its load: on a 2-core CPU a 32K prefill
of ``tiny-dsa`` takes about half a minute. The same measurement as a sweep is
``latentattn bench generate --model tiny-dsa``.

    python examples/long_context_dsa.py                            # 32,768 tokens, top-8
    python examples/long_context_dsa.py --context 8192 --index-topk 64 --fp8-keys
    python examples/long_context_dsa.py --context 512 --new-tokens 8 --out dsa.json
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import statistics
import time

import torch

import latentattn
from latentattn.precision import cpu_bf16


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--context", type=int, default=32768, help="prompt tokens to prefill (32768)")
    p.add_argument("--new-tokens", type=int, default=32, help="tokens to decode after it (32)")
    p.add_argument("--index-topk", type=int, default=8, help="keys each query reads (tiny-dsa's 8)")
    p.add_argument("--fp8-keys", action="store_true",
                   help="cache the indexer keys in fp8 (DeepSeek-V3.2's format) instead of fp32")
    p.add_argument("--chunk", type=int, default=4096, help="prefill this many tokens per forward (4096)")
    p.add_argument("--device", default="auto", help="auto (CUDA if present, else CPU), cpu, cuda, ...")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default=None, help="write every number to this JSON file")
    args = p.parse_args()
    capacity = args.context + args.new_tokens
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu") if args.device == "auto" \
        else torch.device(args.device)

    def clock() -> float:  # wall time once the device has finished its queued work
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        return time.perf_counter()

    # Overrides of `load` change the preset: a longer context, another k, fp8 indexer keys.
    model = latentattn.load("tiny-dsa", seed=args.seed, device=device, max_seq_len=capacity,
                            index_topk=args.index_topk,
                            indexer_key_cache="fp8" if args.fp8_keys else "model")
    cache = model.make_cache(batch=1, capacity=capacity)
    prompt = torch.randint(0, model.config.vocab_size, (1, args.context),
                           generator=torch.Generator().manual_seed(args.seed)).to(device)

    # Chunked prefill: each chunk attends to the cache so far, and only the last position's
    # logits are computed (the next token is all that generation needs).
    with torch.inference_mode():
        t0 = clock()
        for start in range(0, args.context, args.chunk):
            chunk = prompt[:, start:start + args.chunk]
            logits = model(chunk, cache, logits_at=torch.tensor([chunk.shape[1] - 1], device=device))
        prefill_s = clock() - t0

        step_ms = []
        token = logits.argmax(-1, keepdim=True)  # greedy
        for _ in range(args.new_tokens):
            t0 = clock()
            token = model(token, cache)[:, -1].argmax(-1, keepdim=True)
            step_ms.append((clock() - t0) * 1e3)

    # What the same model would cache without the indexer (MLA's latent alone), and decompressed
    # to per-head keys and values, as MHA caches them (MLA's "naive" form).
    attention = model.config.attention
    assert isinstance(attention, latentattn.MLAConfig)
    mla = model.config.replace(attention=dataclasses.replace(attention, indexer=None))
    dense = {"MLA latent (no indexer)": latentattn.load(mla),
             "per-head K/V (MHA-style)": latentattn.load(mla, mla_impl="naive")}
    cache_bytes = {f"DSA ({'fp8' if args.fp8_keys else 'fp32'} indexer keys)": cache.nbytes}
    cache_bytes |= {name: m.make_cache(batch=1, capacity=capacity).nbytes for name, m in dense.items()}

    decode_ms = statistics.median(step_ms) if step_ms else float("nan")
    read = min(args.index_topk, args.context) / args.context
    machine = torch.cuda.get_device_name(device) if device.type == "cuda" else \
        f"{cpu_bf16().model}, {torch.get_num_threads()} threads"
    print(f"tiny-dsa, {sum(p.numel() for p in model.parameters()):,} parameters, fp32, on {machine} "
          "(timings depend on the machine and its load)")
    print(f"prefill  {args.context:,} tokens in {prefill_s:.2f} s: {args.context / prefill_s:,.0f} tokens/s "
          f"({args.chunk:,}-token chunks)")
    print(f"decode   {decode_ms:.2f} ms/token (median of {len(step_ms)} steps)")
    print(f"reads    top-{args.index_topk} of {args.context:,} keys: {100 * read:.3f}% of the context "
          "per decoded token")
    print(f"\n{'cache at ' + format(capacity, ',') + ' tokens':<34} {'MiB':>9} {'vs DSA':>8}")
    dsa_bytes = next(iter(cache_bytes.values()))
    for name, nbytes in cache_bytes.items():
        print(f"{name:<34} {nbytes / 2**20:>9.2f} {nbytes / dsa_bytes:>7.2f}x")

    if args.out:
        report = {"context": args.context, "new_tokens": args.new_tokens, "index_topk": args.index_topk,
                  "fp8_keys": args.fp8_keys, "chunk": args.chunk, "machine": machine,
                  "prefill_s": prefill_s, "prefill_tokens_per_s": args.context / prefill_s,
                  "decode_ms_per_token": decode_ms, "decode_step_ms": step_ms,
                  "read_fraction": read, "cache_bytes": cache_bytes}
        with open(args.out, "w") as f:
            json.dump(report, f, indent=2)
        print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
