"""GGUF files (llama.cpp's format) of Llama-family models, read through transformers.

transformers' GGUF support (``from_pretrained(dir, gguf_file=...)``, with the ``gguf`` package)
dequantises every tensor to float and undoes llama.cpp's row permutation of q_proj / k_proj
(``modeling_gguf_pytorch_utils``), which a hand-written reader would have to get right; its
config and tokenizer come from the file's metadata. We take its config (mapped by
:mod:`latentattn.interop.llama_config`), its weights (the same names as a Hugging Face Llama
checkpoint) and its tokenizer. Needs ``pip install 'latentattn[gguf]'``.
"""

from __future__ import annotations

import contextlib
import functools
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch

from latentattn.config import ModelConfig
from latentattn.errors import CheckpointError, ConfigError
from latentattn.model.transformer import Transformer

GGUF_SUFFIX = ".gguf"


def _short(e: Exception) -> str:
    return " ".join(str(e).split())[:200]


def _need_gguf() -> None:
    try:
        import gguf  # noqa: F401
        import transformers  # noqa: F401
    except ImportError:
        raise ConfigError("reading GGUF files needs the gguf and transformers packages: "
                          "pip install 'latentattn[gguf]'") from None


@functools.lru_cache(maxsize=4)
def _hf_config_cached(path: Path, mtime_ns: int) -> Any:
    _need_gguf()
    from transformers import AutoConfig

    try:
        return AutoConfig.from_pretrained(path.parent, gguf_file=path.name)
    except (ValueError, KeyError, RuntimeError, NotImplementedError) as e:
        raise CheckpointError(f"{path}: cannot read this GGUF file ({_short(e)})") from None


def _hf_config(path: Path) -> Any:
    # Parsing a GGUF file's metadata takes transformers ~15 s for a 135M model: once per file.
    return _hf_config_cached(path.resolve(), path.stat().st_mtime_ns)


def gguf_config(path: Path, **overrides: Any) -> ModelConfig:
    """The ModelConfig of the model in GGUF file ``path`` (metadata only, no weights)."""
    from latentattn.interop.hf_config import config_from_hf

    return config_from_hf(_hf_config(path).to_dict(), source=str(path), **overrides)


@contextlib.contextmanager
def _one_tensor_name_map() -> Iterator[None]:
    """transformers' ``get_gguf_hf_weights_map`` (``modeling_gguf_pytorch_utils.py``) calls
    ``gguf.get_tensor_name_map(arch, n_blocks)`` once per submodule, recursively: about 400 times
    for a 30-layer model, each building the same ``TensorNameMap`` (8.5 of the 19 s SmolLM2-135M's
    weights took to load on 2 cores). The map depends only on its arguments and is only read, so
    while transformers loads, one map per (arch, n_blocks) serves every call."""
    import gguf

    original = gguf.get_tensor_name_map
    gguf.get_tensor_name_map = functools.lru_cache(maxsize=8)(original)
    try:
        yield
    finally:
        gguf.get_tensor_name_map = original


def from_gguf(path: Path, cfg: ModelConfig, dtype: torch.dtype | None,
              device: torch.device) -> Transformer:
    """The model in GGUF file ``path`` as ``cfg`` (from :func:`gguf_config`), dequantised to
    ``dtype`` (float32 when None: the quantised blocks have no dtype of their own)."""
    _need_gguf()
    from transformers import AutoModelForCausalLM
    from transformers.utils import logging as hf_logging

    shown = hf_logging.is_progress_bar_enabled()
    hf_logging.disable_progress_bar()  # its per-tensor bars: our commands have their own output
    try:
        with _one_tensor_name_map():
            hf = AutoModelForCausalLM.from_pretrained(path.parent, gguf_file=path.name,
                                                      config=_hf_config(path), dtype=torch.float32)
    except (ValueError, KeyError, RuntimeError, NotImplementedError) as e:
        # e.g. a quantisation type transformers' dequantiser does not know
        raise CheckpointError(f"{path}: cannot read this GGUF file ({_short(e)})") from None
    finally:
        if shown:
            hf_logging.enable_progress_bar()
    theirs = {k.removeprefix("model."): v for k, v in hf.state_dict().items()
              if not (k == "lm_head.weight" and cfg.tie_word_embeddings)}
    model = Transformer.empty(cfg, dtype or torch.float32, device)
    state = model.state_dict()
    ours = {k for k in state if not (k == "lm_head.weight" and cfg.tie_word_embeddings)}
    missing, extra = sorted(ours - set(theirs)), sorted(set(theirs) - ours)
    if missing or extra:
        raise CheckpointError(f"{path}: its tensors do not match the model ("
                              + (f"missing {missing[:3]}" if missing else f"unexpected {extra[:3]}") + ")")
    with torch.no_grad():
        for k in ours:
            if theirs[k].shape != state[k].shape:
                raise CheckpointError(f"{path}: tensor {k} has shape {list(theirs[k].shape)}, "
                                      f"expected {list(state[k].shape)}")
            state[k].copy_(theirs[k])
    del hf, theirs
    return model.eval()


def gguf_tokenizer(path: Path) -> tuple[Any, int | None]:
    """(the ``tokenizers.Tokenizer`` in the file's metadata, its EOS id)."""
    _need_gguf()
    from transformers import AutoTokenizer

    try:
        tok = AutoTokenizer.from_pretrained(path.parent, gguf_file=path.name)
    except (ValueError, KeyError, RuntimeError, NotImplementedError, OSError) as e:
        raise CheckpointError(f"{path}: cannot read its tokenizer ({_short(e)})") from None
    eos = tok.eos_token_id
    return tok.backend_tokenizer, eos if isinstance(eos, int) else None


__all__ = ["GGUF_SUFFIX", "from_gguf", "gguf_config", "gguf_tokenizer"]
