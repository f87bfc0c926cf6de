"""Helpers the transformers-oracle tests share (tests/test_interop.py, tests/test_interop_dsa.py):
a saved transformers model with its generations, token ids, checkpoint editing, and the weights
widening that makes a wrongly mapped tensor show."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file

from latentattn import ModelConfig, Transformer


def ids(t: int, seed: int = 0) -> torch.Tensor:
    """(2, t) token ids in [0, 256), the same for a given seed."""
    return torch.randint(0, 256, (2, t), generator=torch.Generator().manual_seed(seed))


def hf_generate(model: Any, prompt: torch.Tensor, n: int) -> torch.Tensor:
    # No eos: both sides must produce exactly n tokens.
    return model.generate(prompt, attention_mask=torch.ones_like(prompt), do_sample=False,
                          max_new_tokens=n, min_new_tokens=n, eos_token_id=None, pad_token_id=0)


def max_diff(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.float() - b.float()).abs().max())


class HFRun:
    """A transformers model saved with its own save_pretrained, and its greedy generation from a
    30-token prompt (30 + 8 new tokens cross YaRN's original 32 positions), computed once per case.
    Subclasses add the logits their tests compare."""

    def __init__(self, case: str, path: Path, model: Any) -> None:
        self.case, self.path, self.model = case, path, model
        model.save_pretrained(path)
        with torch.no_grad():
            self.prompt = ids(30, seed=1)
            self.generated = hf_generate(model, self.prompt, 8)


def transformers_load(path: Path) -> tuple[Any, dict[str, Any]]:
    """transformers' own model of a checkpoint we wrote (eager attention, eval mode), with its
    loading info: the missing and unexpected keys it saw."""
    from transformers import AutoModelForCausalLM

    model, info = AutoModelForCausalLM.from_pretrained(
        path, attn_implementation="eager", output_loading_info=True)
    return model.eval(), info


def save_ours(model: Transformer, path: Path) -> dict[str, Any]:
    """latentattn.save_pretrained, then the config.json it wrote."""
    import latentattn

    latentattn.save_pretrained(model, path)
    return dict(json.loads((path / "config.json").read_text()))


def edit_weights(path: Path, edit: Any) -> None:
    """Apply ``edit(tensors)`` to a saved checkpoint's model.safetensors in place."""
    tensors = load_file(str(path / "model.safetensors"))
    edit(tensors)
    save_file(tensors, str(path / "model.safetensors"), metadata={"format": "pt"})


def edit_config(path: Path, **changes: Any) -> None:
    d = json.loads((path / "config.json").read_text())
    (path / "config.json").write_text(json.dumps({**d, **changes}))


def widen_weights(model: Transformer) -> Transformer:
    """Wider weights than the 0.02 init, non-unit norm gains and a non-zero routing bias, so that
    a wrongly mapped tensor shows in the logits."""
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() >= 2:
                p.normal_(0, 0.1)
            else:
                p.normal_(1.0, 0.1)
        for name, buf in model.named_buffers():
            if name.endswith("e_score_correction_bias"):
                buf.copy_(torch.randn_like(buf) * 0.5)
    return model


def our_model(cfg: ModelConfig) -> Transformer:
    """Our model of ``cfg``, seeded and widened (:func:`widen_weights`), in eval mode."""
    torch.manual_seed(7)
    return widen_weights(Transformer(cfg).eval())


def real_v3_config() -> dict[str, Any]:
    # deepseek-ai/DeepSeek-V3 config.json (FP8 release), the fields that shape the model.
    return {
        "architectures": ["DeepseekV3ForCausalLM"], "model_type": "deepseek_v3",
        "vocab_size": 129280, "hidden_size": 7168, "intermediate_size": 18432,
        "moe_intermediate_size": 2048, "num_hidden_layers": 61, "num_nextn_predict_layers": 1,
        "num_attention_heads": 128, "num_key_value_heads": 128, "n_shared_experts": 1,
        "n_routed_experts": 256, "ep_size": 1, "routed_scaling_factor": 2.5,
        "kv_lora_rank": 512, "q_lora_rank": 1536, "qk_rope_head_dim": 64, "v_head_dim": 128,
        "qk_nope_head_dim": 128, "topk_method": "noaux_tc", "n_group": 8, "topk_group": 4,
        "num_experts_per_tok": 8, "moe_layer_freq": 1, "first_k_dense_replace": 3,
        "norm_topk_prob": True, "scoring_func": "sigmoid", "hidden_act": "silu",
        "max_position_embeddings": 163840, "rms_norm_eps": 1e-06, "tie_word_embeddings": False,
        "rope_theta": 10000, "attention_bias": False, "attention_dropout": 0.0,
        "rope_scaling": {"beta_fast": 32, "beta_slow": 1, "factor": 40, "mscale": 1.0,
                         "mscale_all_dim": 1.0, "original_max_position_embeddings": 4096,
                         "type": "yarn"},
        "quantization_config": {"activation_scheme": "dynamic", "fmt": "e4m3",
                                "quant_method": "fp8", "weight_block_size": [128, 128]},
        "torch_dtype": "bfloat16",
    }
