"""Does the lightning indexer learn? Attention-mass recall before and after the V3.2 warm-up,
on real text.

1. Pretrain a small MLA+DSA model densely (LM loss, no selection): the "existing model" that
   DeepSeek-V3.2 started from (V3.1-Terminus).
2. Measure on held-out text: per layer, the dense attention mass inside the indexer's top-k,
   beside two baselines (the k most recent keys; k random keys), and the validation loss with
   dense attention and with top-k selection.
3. Indexer warm-up (V3.2 report s2.1): everything frozen but the indexers, which learn from the
   KL to the main attention's head-averaged distribution.
4. Measure again.
"""

from __future__ import annotations

import statistics
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from typing import Any

import torch
import torch.nn.functional as F

from latentattn.config import IndexerConfig, MLAConfig, ModelConfig, RopeConfig
from latentattn.data import byte_tokens, random_batch, train_val_split
from latentattn.model.transformer import Transformer
from latentattn.timing import machine_info
from latentattn.train.dsa import required, selection_recall, set_dsa_stage


@dataclass(frozen=True)
class IndexerBenchSettings:
    dim: int = 128
    n_layers: int = 2
    n_heads: int = 4
    q_lora_rank: int = 64
    kv_lora_rank: int = 64
    qk_nope_head_dim: int = 32
    qk_rope_head_dim: int = 16
    v_head_dim: int = 32
    index_n_heads: int = 8
    index_head_dim: int = 32
    index_topk: int = 32
    seq_len: int = 256
    batch: int = 8
    pretrain_steps: int = 300
    warmup_steps: int = 200
    lr: float = 3e-3
    warmup_lr: float = 1e-3  # the V3.2 report's warm-up learning rate
    eval_batches: int = 4
    seed: int = 0

    def model_config(self) -> ModelConfig:
        attn = MLAConfig(
            n_heads=self.n_heads, q_lora_rank=self.q_lora_rank, kv_lora_rank=self.kv_lora_rank,
            qk_nope_head_dim=self.qk_nope_head_dim, qk_rope_head_dim=self.qk_rope_head_dim,
            v_head_dim=self.v_head_dim,
            indexer=IndexerConfig(self.index_n_heads, self.index_head_dim, self.index_topk),
        )
        return ModelConfig(vocab_size=256, dim=self.dim, n_layers=self.n_layers,
                           intermediate_size=4 * self.dim, attention=attn,
                           rope=RopeConfig(interleaved=True), max_seq_len=self.seq_len,
                           name="indexer-bench")


@dataclass
class Measurement:
    step: str
    recall: list[dict[str, float]]  # per layer: indexer / recent / uniform
    val_loss_dense: float
    val_loss_sparse: float


@dataclass
class IndexerReport:
    machine: dict[str, Any]
    settings: dict[str, Any]
    data: str
    pretrain_loss: list[float] = field(default_factory=list)
    warmup_kl: list[float] = field(default_factory=list)
    measurements: list[Measurement] = field(default_factory=list)

    def as_dict(self) -> dict[str, Any]:
        return {"machine": self.machine, "settings": self.settings, "data": self.data,
                "pretrain_loss": self.pretrain_loss, "warmup_kl": self.warmup_kl,
                "measurements": [asdict(m) for m in self.measurements]}


def _lm_loss(model: Transformer, batch: torch.Tensor) -> torch.Tensor:
    logits = model(batch[:, :-1])
    return F.cross_entropy(logits.flatten(0, 1).float(), batch[:, 1:].flatten())


@torch.no_grad()
def _measure(model: Transformer, name: str, val: list[torch.Tensor]) -> Measurement:
    model.eval()
    recalls = [selection_recall(model, b[:, :-1]) for b in val]
    per_layer = [{key: statistics.mean(r[i][key] for r in recalls) for key in recalls[0][i]}
                 for i in range(len(recalls[0]))]
    set_dsa_stage(model, "inference")
    sparse = statistics.mean(float(_lm_loss(model, b)) for b in val)
    set_dsa_stage(model, "dense")
    dense = statistics.mean(float(_lm_loss(model, b)) for b in val)
    model.train()
    return Measurement(name, per_layer, dense, sparse)


def run_indexer_bench(
    text: str, data_name: str, s: IndexerBenchSettings = IndexerBenchSettings(),
    progress: Callable[[str, int], None] | None = None,
) -> IndexerReport:
    """progress(stage, steps_done) is called after every optimiser step."""
    torch.manual_seed(s.seed)
    train, val_tokens = train_val_split(byte_tokens(text))
    gen = torch.Generator().manual_seed(s.seed)
    val_gen = torch.Generator().manual_seed(s.seed + 1)
    val = [random_batch(val_tokens, s.batch, s.seq_len, val_gen) for _ in range(s.eval_batches)]
    model = Transformer(s.model_config())
    report = IndexerReport(machine=machine_info(), settings=asdict(s), data=data_name)

    set_dsa_stage(model, "dense")
    opt = torch.optim.AdamW(model.parameters(), lr=s.lr, weight_decay=0.1)
    for i in range(s.pretrain_steps):
        loss = _lm_loss(model, random_batch(train, s.batch, s.seq_len, gen))
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        report.pretrain_loss.append(loss.item())
        if progress:
            progress("pretrain", i + 1)
    report.measurements.append(_measure(model, "before warm-up", val))

    set_dsa_stage(model, "warmup")
    trainable = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(trainable, lr=s.warmup_lr)
    for i in range(s.warmup_steps):
        _, kl = model(random_batch(train, s.batch, s.seq_len, gen)[:, :-1], return_indexer_loss=True)
        loss = required(kl)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        report.warmup_kl.append(loss.item())
        if progress:
            progress("warm-up", i + 1)
    set_dsa_stage(model, "dense")  # unfreeze, dense attention for the measurement
    report.measurements.append(_measure(model, "after warm-up", val))
    return report


def plot_indexer_report(report: IndexerReport, path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (a, b) = plt.subplots(1, 2, figsize=(11, 4))
    a.plot(report.pretrain_loss, label="dense pretraining: LM loss (nats/byte)")
    a.plot(range(len(report.pretrain_loss), len(report.pretrain_loss) + len(report.warmup_kl)),
           report.warmup_kl, label="indexer warm-up: KL (summed over layers)")
    a.set_xlabel("step")
    a.set_yscale("log")
    a.legend(fontsize=8)
    a.grid(True, alpha=0.3)
    names = [m.step for m in report.measurements]
    n_layers = len(report.measurements[0].recall)
    width = 0.8 / (3 * n_layers)
    for j, key in enumerate(("indexer", "recent", "uniform")):
        for layer in range(n_layers):
            xs = [i + (j * n_layers + layer) * width for i in range(len(names))]
            b.bar(xs, [m.recall[layer][key] for m in report.measurements], width,
                  label=f"{key}, layer {layer}")
    b.set_xticks([i + 0.4 - width / 2 for i in range(len(names))], names)
    b.set_ylabel(f"attention mass inside k={report.settings['index_topk']} keys")
    b.set_ylim(0, 1)
    b.legend(fontsize=7, ncol=3)
    b.grid(True, axis="y", alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, format="png", dpi=110)
    plt.close(fig)


def indexer_headline(report: IndexerReport) -> list[str]:
    lines = []
    for m in report.measurements:
        rec = "; ".join(f"layer {i}: indexer {r['indexer']:.3f}, recent {r['recent']:.3f}, "
                        f"uniform {r['uniform']:.3f}" for i, r in enumerate(m.recall))
        lines.append(f"{m.step}: recall {rec}; val loss dense {m.val_loss_dense:.4f}, "
                     f"top-k {m.val_loss_sparse:.4f} nats/byte")
    return lines
