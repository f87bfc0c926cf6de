"""``latentattn bench fp8-cache``: what MLA's fp8 latent cache (FlashMLA's 656-byte record,
cache.store.Record) costs in accuracy against a bf16 latent cache, on a model's own text.

Two measurements over the same tokens of a text:
* teacher-forced: the first ``prompt`` tokens are prefilled, then the next ``tokens`` are fed one
  at a time through both caches; at every step the two next-token distributions are compared
  (max |logit error|, KL(bf16 || fp8), whether the argmax agrees);
* free-running: both caches generate ``tokens`` greedy tokens from the same prompt; reported are
  the share of equal tokens and the first step at which the two continuations part.
Prefill attends over the exact latent in both runs (the cache is only read back at decode).

The noise floor beside it: the same teacher-forced comparison of the bf16 cache against a cache
in the model's own dtype (fp32 on a CPU), i.e. what bf16 itself costs. Intervals (95%): Wilson's
for the argmax agreement, a bootstrap over steps for the mean KL. Decode steps of one text are
not independent, so the intervals are narrower than the truth; they say how much the figure
moves with the steps drawn, not across texts.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any

import torch

from latentattn.model.transformer import Transformer
from latentattn.timing import machine_info


@dataclass
class FP8CacheReport:
    model: str
    data: str
    prompt_tokens: int
    decode_tokens: int
    bytes_per_token_per_layer_bf16: float
    bytes_per_token_per_layer_fp8: float
    max_abs_logit_error: float
    mean_kl: float
    max_kl: float
    argmax_agreement: float  # teacher-forced share of steps whose argmax is equal
    argmax_agreement_ci: tuple[float, float]
    mean_kl_ci: tuple[float, float]
    floor_dtype: str  # the model dtype the bf16 cache is compared with for the noise floor
    floor_max_abs_logit_error: float
    floor_mean_kl: float
    floor_argmax_agreement: float
    greedy_equal_share: float  # free-running share of equal tokens
    greedy_first_divergence: int | None  # step of the first different token (None: none)
    per_step_kl: list[float] = field(default_factory=list)
    machine: dict[str, Any] = field(default_factory=machine_info)

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


@torch.no_grad()
def run_fp8_cache_bench(model: Transformer, ids: torch.Tensor, prompt: int, tokens: int,
                        names: tuple[str, str], progress: bool = True) -> FP8CacheReport:
    """``ids`` (N,) token ids with N >= prompt + tokens; see the module docstring."""
    import sys

    from tqdm import tqdm

    model.eval()
    seq = ids[: prompt + tokens].to(model.device)[None]
    caches = {"exact": model.make_cache(1, prompt + tokens),
              "bf16": model.make_cache(1, prompt + tokens, dtype=torch.bfloat16),
              # bf16 for what is not the latent (a DSA model's indexer keys), as in the baseline
              "fp8": model.make_cache(1, prompt + tokens, dtype=torch.bfloat16, latent_fp8=True)}
    logits = {k: [model(seq[:, :prompt], c)[:, -1].float()] for k, c in caches.items()}
    for i in tqdm(range(prompt, prompt + tokens - 1), desc="fp8-cache", unit="token",
                  file=sys.stderr, disable=not progress):
        for k, c in caches.items():
            logits[k].append(model(seq[:, i : i + 1], c)[:, -1].float())
    exact, ref, got = (torch.cat(logits[k]) for k in ("exact", "bf16", "fp8"))
    err, kl, agree = _compare(ref, got)
    floor_err, floor_kl, floor_agree = _compare(exact, ref)
    fp8_tokens = model.generate(seq[:, :prompt], tokens, latent_fp8=True,
                                cache_dtype=torch.bfloat16)[0, prompt:]
    bf16_tokens = model.generate(seq[:, :prompt], tokens, cache_dtype=torch.bfloat16)[0, prompt:]
    same = bf16_tokens == fp8_tokens
    diverge = None if bool(same.all()) else int((~same).nonzero()[0, 0])
    return FP8CacheReport(
        model=names[0], data=names[1], prompt_tokens=prompt, decode_tokens=tokens,
        bytes_per_token_per_layer_bf16=caches["bf16"].bytes_per_token_per_layer,
        bytes_per_token_per_layer_fp8=caches["fp8"].bytes_per_token_per_layer,
        max_abs_logit_error=err, mean_kl=float(kl.mean()), max_kl=float(kl.max()),
        argmax_agreement=float(agree.float().mean()),
        argmax_agreement_ci=_share_ci(int(agree.sum()), agree.numel()), mean_kl_ci=_mean_ci(kl),
        floor_dtype=str(model.dtype).removeprefix("torch."), floor_max_abs_logit_error=floor_err,
        floor_mean_kl=float(floor_kl.mean()), floor_argmax_agreement=float(floor_agree.float().mean()),
        greedy_equal_share=float(same.float().mean()), greedy_first_divergence=diverge,
        per_step_kl=[float(x) for x in kl])


def _compare(ref: torch.Tensor, got: torch.Tensor) -> tuple[float, torch.Tensor, torch.Tensor]:
    """(max |logit error|, KL(ref || got) per step, argmax equal per step)."""
    lp_ref, lp_got = ref.log_softmax(-1), got.log_softmax(-1)
    kl = (lp_ref.exp() * (lp_ref - lp_got)).sum(-1)
    return float((ref - got).abs().max()), kl, ref.argmax(-1) == got.argmax(-1)


def _share_ci(k: int, n: int) -> tuple[float, float]:
    from scipy.stats import binomtest

    ci = binomtest(k, n).proportion_ci(confidence_level=0.95, method="wilson")
    return float(ci.low), float(ci.high)


def _mean_ci(x: torch.Tensor) -> tuple[float, float]:
    import numpy as np
    from scipy.stats import bootstrap

    data = x.double().cpu().numpy()
    if len(data) < 2 or float(np.ptp(data)) == 0.0:
        return float(data.mean()), float(data.mean())
    ci = bootstrap((data,), np.mean, confidence_level=0.95, n_resamples=2000,
                   random_state=np.random.default_rng(0)).confidence_interval
    return float(ci.low), float(ci.high)


def fp8_headline(r: FP8CacheReport) -> list[str]:
    return [
        f"{r.model}: fp8 latent cache {r.bytes_per_token_per_layer_fp8:,.0f} B/token/layer against "
        f"{r.bytes_per_token_per_layer_bf16:,.0f} in bf16 "
        f"({r.bytes_per_token_per_layer_fp8 / r.bytes_per_token_per_layer_bf16:.2f}x)",
        f"teacher-forced over {r.decode_tokens} decoded tokens after a {r.prompt_tokens}-token "
        f"prompt: max |logit error| {r.max_abs_logit_error:.4f}, KL(bf16 || fp8) mean "
        f"{r.mean_kl:.2e} [{r.mean_kl_ci[0]:.2e}, {r.mean_kl_ci[1]:.2e}] max {r.max_kl:.2e} nats, "
        f"argmax agreement {r.argmax_agreement:.1%} [{r.argmax_agreement_ci[0]:.1%}, "
        f"{r.argmax_agreement_ci[1]:.1%}] (95% intervals over steps)",
        f"noise floor, the bf16 cache against a {r.floor_dtype} one: max |logit error| "
        f"{r.floor_max_abs_logit_error:.4f}, KL mean {r.floor_mean_kl:.2e} nats, argmax agreement "
        f"{r.floor_argmax_agreement:.1%}",
        f"free-running greedy: {r.greedy_equal_share:.1%} equal tokens, "
        + ("no divergence" if r.greedy_first_divergence is None
           else f"first divergence at step {r.greedy_first_divergence}"),
    ]


def plot_fp8_report(r: FP8CacheReport, path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 3.5))
    ax.semilogy(range(len(r.per_step_kl)), [max(x, 1e-12) for x in r.per_step_kl], lw=0.8)
    ax.set_xlabel("decode step (teacher-forced)")
    ax.set_ylabel("KL(bf16 cache || fp8 cache), nats")
    ax.set_title(f"{r.model}: fp8 latent cache vs bf16")
    fig.tight_layout()
    fig.savefig(path, format="png", dpi=120)
    plt.close(fig)


__all__ = ["FP8CacheReport", "fp8_headline", "plot_fp8_report", "run_fp8_cache_bench"]
