"""The compared models: one family (``latentattn.train.family``) at one depth and width, each
variant's SwiGLU width chosen so its parameter count matches MHA's within 3%: the five kinds,
DeepSeek-V4's attention (``v4_variant``), plus the swept MLA / MLA+DSA points."""

from __future__ import annotations

import dataclasses
import functools
import math
from collections.abc import Callable
from dataclasses import dataclass

import torch

from latentattn.calc.density import v4_read_fraction
from latentattn.compare.sweep import SweepPoint, sweep_points
from latentattn.config import (
    CSA,
    HCA,
    SLIDING,
    GQAConfig,
    IndexerConfig,
    MLAConfig,
    ModelConfig,
    V4AttentionConfig,
)
from latentattn.errors import ConfigError
from latentattn.model.transformer import Transformer
from latentattn.train.family import ATTN_KINDS, V4_KIND, FamilySize, matched_configs

N_HEADS = 4
PARAM_TOLERANCE = 0.03
CONTROL = "control"  # the label of the positive control
RETROFIT = "dsa-retrofit"  # the label of DSA forked from the MLA runs (retrofit_variant)
V4 = V4_KIND  # the label of DeepSeek-V4's attention (v4_variant)


def family_size(dim: int = 128, n_layers: int = 4, seq_len: int = 256) -> FamilySize:
    """FamilySize's proportions at any width: 4 heads, GQA with 2 KV heads, both latent ranks
    dim / 2, decoupled RoPE on half a head, indexer heads one head wide, and index_topk a
    sixteenth of the training window, so that the average query keeps 23% of its visible keys
    (latentattn.calc.topk_density; k = L / 4 would keep 59%, barely sparse).
    ``family_size()`` is ``FamilySize()``: dim 128, head 32, d_c 64, d_r 16, k 16 at 256 tokens."""
    if dim % (2 * N_HEADS):
        raise ConfigError(f"--dim must be a multiple of {2 * N_HEADS} ({N_HEADS} heads of even "
                          f"width), got {dim}")
    head = dim // N_HEADS
    rope = max(2, head // 2 - (head // 2) % 2)
    return FamilySize(
        dim=dim, n_layers=n_layers, n_heads=N_HEADS, seq_len=seq_len, gqa_kv_heads=2,
        kv_lora_rank=dim // 2, q_lora_rank=dim // 2, qk_rope_head_dim=rope, index_n_heads=N_HEADS,
        index_head_dim=head, index_topk=max(1, seq_len // 16),
    )


@dataclass(frozen=True)
class Variant:
    """``label`` keys the results ("gqa", "dsa[kv_lora_rank=16,index_topk=32]")."""

    label: str
    kind: str
    config: ModelConfig
    sweep: tuple[tuple[str, int], ...] = ()
    control: bool = False  # the positive control: an MLA built to lose (control_variant)
    ablation: str = ""  # what an ablation variant changes (ablation_variants), else ""
    retrofit_of: str = ""  # the dense variant whose runs this one forks (retrofit_variant)
    init: str = ""  # a change to the seed's initialisation, a key of INITS (apply_init)
    lr_of: str = ""  # train at this variant's LR (its pick or pin) times lr_factor, no pilot
    lr_factor: float = 1.0

    @property
    def mechanism(self) -> str:
        a = self.config.attention
        if isinstance(a, GQAConfig):
            base = {"mha": "MHA", "mqa": "MQA"}.get(a.name, a.name.upper())
        elif isinstance(a, MLAConfig):
            base = "MLA" if a.indexer is None else "MLA+DSA"
        else:
            base = "V4"
        if self.retrofit_of:
            base += " retrofit"
        what = ([f"{k}={v}" for k, v in self.sweep] + (["control"] if self.control else [])
                + ([self.ablation] if self.ablation else []))
        return f"{base} ({', '.join(what)})" if what else base

    @property
    def is_reference(self) -> bool:
        """MHA, MQA and GQA: the fixed points a sweep is compared against."""
        return isinstance(self.config.attention, GQAConfig)

    def latent_settings(self) -> dict[str, int]:
        """kv_lora_rank and index_topk of an MLA / DSA variant (empty for GQA ones)."""
        a = self.config.attention
        if not isinstance(a, MLAConfig):
            return {}
        out = {"kv_lora_rank": a.kv_lora_rank}
        if a.indexer is not None:
            out["index_topk"] = a.indexer.index_topk
        return out


def _swept(size: FamilySize, point: SweepPoint) -> ModelConfig:
    changed = dataclasses.replace(size, **dict(point.values))
    return matched_configs(changed, kinds=(point.kind,), tolerance=PARAM_TOLERANCE)[point.kind]


def control_variant(size: FamilySize, mla: ModelConfig) -> Variant:
    """The positive control: the MLA variant ``mla`` with its latent starved to an eighth of a
    head's width (d_c = d_h / 8: 2 at dim 64, 0.06x MHA's cache) and nothing else changed -- not
    even the FFN width, so it is MLA with strictly less capacity (its models are MLA's with the
    latent padded by zeros) and fewer parameters. Matching its parameters instead would hand the
    freed ones to the FFN, which at short horizons learns faster than attention capacity pays off
    (a --quick run measured it 0.031 nats/byte *better* than MHA that way). It must come out worse
    than MHA; a protocol that cannot tell so cannot resolve differences of that size (a
    positive control that is not detected invalidates the comparison). Half a head was not
    starved enough: at the standard protocol (5 seeds) d_c = 8 came out +0.003 [-0.035, +0.040]
    against MHA, as MQA did (K/V capacity does not bind at this size); d_c = 2 lost +0.125 and
    +0.060 on seeds 0 and 1 in a trial run."""
    a = mla.attention
    assert isinstance(a, MLAConfig)
    rank = max(1, size.head_dim // 8)
    cfg = mla.replace(name=CONTROL, attention=dataclasses.replace(a, kv_lora_rank=rank))
    return Variant(CONTROL, "mla", cfg, (("kv_lora_rank", rank),), control=True)


def retrofit_variant(size: FamilySize, mla: ModelConfig) -> Variant:
    """DSA as DeepSeek-V3.2 trains it: the MLA variant ``mla`` itself, forked late in its run
    into a model with fresh lightning indexers (``FamilySize``'s indexer: index_topk of them);
    ``latentattn.compare.run`` trains the fork (frozen warm-up, then sparse) and compares it
    with the dense run it forked from, at equal tokens."""
    a = mla.attention
    assert isinstance(a, MLAConfig)
    indexer = IndexerConfig(size.index_n_heads, size.index_head_dim, size.index_topk)
    cfg = mla.replace(name=RETROFIT, attention=dataclasses.replace(a, indexer=indexer))
    return Variant(RETROFIT, "dsa", cfg, retrofit_of="mla", lr_of="mla")


def _bottleneck_scale(model: Transformer, attn: torch.nn.Module, rank: str) -> float:
    return math.sqrt(model.config.dim / getattr(attn.cfg, rank))


def scale_latent_norms(model: Transformer, names: tuple[str, ...] = ("kv_a_layernorm", "q_a_layernorm"),
                       ) -> None:
    """DeepSeek-V2's "additional scaling factors at the width bottlenecks" (arXiv 2405.04434
    s2.1.3 and appendix on stability; a DeepSeek author names them in DeepSeek-V2 #23), in the
    form Marin #7383 uses: sqrt(dim / rank) after the latent RMSNorm. Folded into the norms'
    gains at initialisation (kv_a_layernorm and q_a_layernorm start at sqrt(dim / d_c) and
    sqrt(dim / d_q) instead of 1), so the model, its checkpoints and its exports are plain MLA
    (released DeepSeek-V2 checkpoints carry no separate factor either). ``names`` picks which
    of the two norms (the key/value latent's alone: ``("kv_a_layernorm",)``)."""
    ranks = {"kv_a_layernorm": "kv_lora_rank", "q_a_layernorm": "q_lora_rank"}
    for blk in model.blocks:
        attn = blk.self_attn
        for name in names:
            norm = getattr(attn, name, None)
            if norm is not None:
                with torch.no_grad():
                    norm.weight.fill_(_bottleneck_scale(model, attn, ranks[name]))


def scale_up_projections(model: Transformer) -> None:
    """The same sqrt(dim / rank) put in the up-projections' initial weights instead of the norms'
    gains: ``q_b_proj`` and ``kv_b_proj`` start at std 0.02 sqrt(dim / rank). Each reads a
    latent of RMS 1 (after its norm) through ``rank`` inputs where MHA's projections read the
    RMS-1 residual through ``dim``, so with std 0.02 MLA's queries, keys and values start
    sqrt(rank / dim) of MHA's; this starts them at MHA's. At initialisation the model computes
    what ``scale_latent_norms`` gives; in training Adam moves each weight by about the LR a step
    whatever its size, so the two differ in how fast the latent paths change relative to their
    scale."""
    ranks = {"kv_b_proj": "kv_lora_rank", "q_b_proj": "q_lora_rank"}
    for blk in model.blocks:
        attn = blk.self_attn
        for name, rank in ranks.items():
            proj = getattr(attn, name, None)
            if proj is not None and getattr(attn.cfg, rank, None):
                with torch.no_grad():
                    proj.weight.mul_(_bottleneck_scale(model, attn, rank))


# Changes to a seed's initialisation an ablation may make (Variant.init).
INITS: dict[str, Callable[[Transformer], None]] = {
    "latent-gain": scale_latent_norms,
    "kv-gain": functools.partial(scale_latent_norms, names=("kv_a_layernorm",)),
    "up-init": scale_up_projections,
}


def apply_init(model: Transformer, init: str) -> None:
    """Apply the named initialisation change (nothing for ``""``)."""
    if init:
        INITS[init](model)


def v4_variant(size: FamilySize) -> Variant:
    """DeepSeek-V4's attention (``latentattn.attention.v4``) in the family: a plain block (no mHC,
    a dense SwiGLU, as every variant here), parameters matched to MHA's through the SwiGLU width.
    Its shape (``latentattn.train.family.v4_attention``) scales V4's windows to the training
    window L = ``seq_len``:

    * one shared-KV head of ``kv_lora_rank`` values (as wide as MLA's latent), ``n_heads``
      query heads of that width, sinks, 2 output groups;
    * sliding window W = L / 8; CSA entries every m = 4 tokens (V4's rate), of which the
      indexer picks k = L / 32 (k m = L / 8 tokens' worth); HCA entries every m' = L / 16;
    * at L = 128 (the standard run): W 16, m 4, k 4, m' 8, layers sliding / CSA / HCA; at
      L = 256 (``FamilySize()``): W 32, m 4, k 8, m' 16, layers sliding / CSA / HCA / CSA.

    The share of its visible tokens a query reads is ``latentattn.calc.density.v4_read_fraction``
    (in the report). It trains from scratch as DeepSeek-V3.2's sparse stage: top-k selection from
    the first step, the LM loss plus the indexer's KL (its inputs detached, so the indexer learns
    only from the KL), every parameter trainable (``latentattn.train.v4``)."""
    cfg = matched_configs(size, kinds=(V4_KIND,), tolerance=PARAM_TOLERANCE)[V4_KIND]
    return Variant(V4, V4_KIND, cfg)


def v4_note(label: str, a: V4AttentionConfig, seq_len: int) -> str:
    """What the V4 variant ``label`` is at this scale and how much of its context a query reads."""
    read = v4_read_fraction(seq_len, a)
    short = {SLIDING: "sliding", CSA: "CSA", HCA: "HCA"}
    per_type = "; ".join(f"{short[t]} {read.covered[t]:.0%}, {read.keys[t]:.0%} as keys"
                         for t in read.covered)
    return (f"{label}: DeepSeek-V4's attention scaled to the {seq_len}-token window: layers "
            f"{' / '.join(short[t] for t in a.layer_types)}; sliding window {a.sliding_window}; CSA "
            f"entries every {a.csa_rate} tokens, the indexer ({a.index_n_heads} x "
            f"{a.index_head_dim}) picks {a.index_topk} ({a.index_topk * a.csa_rate} tokens' worth); "
            f"HCA entries every {a.hca_rate} tokens, all read; one shared K=V head of "
            f"{a.head_dim} values ({a.qk_rope_head_dim} rotary), {a.n_heads} query heads, sinks, "
            f"{a.o_groups} output groups; a plain block (no mHC, dense SwiGLU). A query's window "
            f"and entries cover on average {read.per_query:.0%} of its visible tokens over the "
            f"layers ({per_type}; CSA's assumes the picked entries lie before the window, the "
            f"most they can cover) and it attends {read.keys_per_query:.0%} as many keys as it "
            "sees tokens. Trained from scratch as DeepSeek-V3.2's sparse stage: top-k from the "
            "first step, LM loss plus the indexer KL (the indexer's inputs detached), every "
            "parameter trained; its val loss is the served (top-k) form. KV bytes per token at "
            f"the {seq_len}-token window: the window and the compressors' pending state do not "
            "grow with the context, the entries grow one per rate tokens.")


def ablation_variants(size: FamilySize, names: tuple[str, ...] | None = None) -> list[Variant]:
    """What the MLA-vs-MHA claim should not hinge on, each the MLA variant with one thing changed
    (``names`` picks some of ``ABLATIONS``, in that order; None: all):

    * ``mla-noq``: MLA without query compression, parameters matched. The KV-cache claim does
      not depend on it, and compressing queries through dim / 2 is where this MLA has the least
      capacity.
    * ``mla-mqa-bytes``: MLA whose cache holds as many values per token as MQA's (2 d_h =
      d_c + d_r), parameters matched: which uses the same cache better, a latent or one shared
      K/V head.
    * ``mla-scaled``: DeepSeek-V2's bottleneck scale factors (scale_latent_norms: both latent
      norms' gains start at sqrt(dim / rank)).
    * ``mla-kv-gain``: the key/value latent's RMSNorm gain alone starts at sqrt(dim / d_c).
    * ``mla-up-init``: the up-projections' initial weights sqrt(dim / rank) larger
      (scale_up_projections).
    * ``mla-low-lr``: MLA's own pick of LR, halved.

    The first two are other models and get LRs of their own; the last four are MLA's model with
    one change to its initialisation or LR, so they train at MLA's LR (times their factor): each
    isolates its change, and none can win by a luckier pilot.
    """
    chosen = ABLATIONS if names is None else names
    unknown = [n for n in chosen if n not in ABLATIONS]
    if unknown:
        raise ConfigError(f"--ablations: unknown {', '.join(unknown)}; choose from {', '.join(ABLATIONS)}")
    mla = matched_configs(size, kinds=("mla",), tolerance=PARAM_TOLERANCE)["mla"]
    out = []
    for name in ABLATIONS:
        if name not in chosen:
            continue
        if name == "mla-noq":
            noq = matched_configs(dataclasses.replace(size, q_lora_rank=None), kinds=("mla",),
                                  tolerance=PARAM_TOLERANCE)["mla"]
            out.append(Variant(name, "mla", noq.replace(name=name), ablation="no query compression"))
        elif name == "mla-mqa-bytes":
            rank = 2 * size.head_dim - size.qk_rope_head_dim
            if rank < 1:
                raise ConfigError(f"no MLA fits MQA's {2 * size.head_dim} cached values with a "
                                  f"{size.qk_rope_head_dim}-dim rope key")
            same_bytes = _swept(size, SweepPoint("mla", (("kv_lora_rank", rank),)))
            out.append(Variant(name, "mla", same_bytes.replace(name=name),
                               ablation=f"MQA's cache bytes, kv_lora_rank={rank}"))
        else:
            init, factor, what = _SAME_MODEL[name]
            out.append(Variant(name, "mla", mla.replace(name=name), ablation=what, init=init,
                               lr_of="mla", lr_factor=factor))
    return out


# The ablations that are MLA's own model: (Variant.init, LR factor, what the table says).
_SAME_MODEL = {
    "mla-scaled": ("latent-gain", 1.0, "latent scale sqrt(dim/rank)"),
    "mla-kv-gain": ("kv-gain", 1.0, "KV latent norm gain sqrt(dim/d_c)"),
    "mla-up-init": ("up-init", 1.0, "up-projection init x sqrt(dim/rank)"),
    "mla-low-lr": ("", 0.5, "LR x0.5"),
}
ABLATIONS = ("mla-noq", "mla-mqa-bytes", *_SAME_MODEL)


def build_variants(size: FamilySize, sweeps: dict[str, tuple[int, ...]] | None = None,
                   control: bool = True, ablations: bool | tuple[str, ...] = False,
                   retrofit: bool = True, v4: bool = True) -> list[Variant]:
    """The five kinds, DSA retrofitted onto MLA (unless ``retrofit=False``), DeepSeek-V4's
    attention (unless ``v4=False``), the positive control (unless ``control=False``), the
    ablations (``True``: all of ABLATIONS; or a tuple of their names), then every sweep point
    whose config is not already one of them."""
    base = matched_configs(size, kinds=ATTN_KINDS, tolerance=PARAM_TOLERANCE)
    variants = [Variant(kind, kind, cfg) for kind, cfg in base.items()]
    if retrofit:
        variants.append(retrofit_variant(size, base["mla"]))
    if v4:
        variants.append(v4_variant(size))
    if control:
        variants.append(control_variant(size, base["mla"]))
    if ablations:
        variants += ablation_variants(size, None if isinstance(ablations, bool) else ablations)
    for point in sweep_points(sweeps or {}):
        cfg = _swept(size, point)
        if cfg != base[point.kind]:  # the family's own value is the base variant already
            variants.append(Variant(point.label, point.kind, cfg, point.values))
    return variants
