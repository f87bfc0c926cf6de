"""Hugging Face DeepSeek-V2/V3/V3.2 checkpoints: safetensors <-> Transformer (config.json <->
ModelConfig is :mod:`latentattn.interop.hf_config`, re-exported here). DeepSeek-V4's
(``deepseek_v4``) are read and written by :mod:`latentattn.interop.hf_v4`, dispatched from here.

The rules here mirror transformers 5.x: ``modeling_deepseek_v2.py``, ``modeling_deepseek_v3.py``
and ``modeling_deepseek_v32.py`` (tensor names, which layers are MoE, tensors kept in fp32).

Our parameter names are the checkpoint's without the ``model.`` prefix (``lm_head.weight`` keeps
its name; V3.2's indexer is ``model.layers.N.self_attn.indexer.*`` in both), and experts are
stored per expert in both, so loading is a rename plus checks.
Weights are read with ``safetensors`` only: pickle files (``pytorch_model.bin``) can run code when
loaded and are refused.
"""

from __future__ import annotations

import json
import math
import os
import re
from collections.abc import Iterator
from contextlib import ExitStack
from pathlib import Path
from typing import Any

import torch

from latentattn.config import ModelConfig, V4AttentionConfig
from latentattn.errors import CheckpointError, ConfigError, LatentAttnError
from latentattn.interop.hf_config import (
    CONFIG_NAME,
    SUPPORTED_MODEL_TYPES,
    config_from_hf,
    config_to_hf,
    mtp_layers_from_hf,
)
from latentattn.io import fsync_dir, fsync_file
from latentattn.model.transformer import Transformer
from latentattn.precision import resolve_device, resolve_dtype

WEIGHTS_NAME = "model.safetensors"
INDEX_NAME = "model.safetensors.index.json"
PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt", ".pkl")
DEFAULT_MAX_SHARD_SIZE = 5 * 10**9  # transformers' default "5GB" (decimal units)

__all__ = [
    "CONFIG_NAME", "SUPPORTED_MODEL_TYPES", "config_from_hf", "config_to_hf", "dequantize_fp8",
    "from_pretrained", "save_pretrained", "save_pretrained_dir",
]


# --------------------------------------------------------------------------- FP8
def dequantize_fp8(
    weight: torch.Tensor, scale_inv: torch.Tensor, block: tuple[int, int] = (128, 128)
) -> torch.Tensor:
    """Block-scaled FP8 -> fp32, as DeepSeek-V3's ``inference/kernel.py`` ``weight_dequant``.

    ``scale_inv`` (ceil(out/bo), ceil(in/bi)) holds one fp32 multiplier per (bo, bi) block.
    """
    if weight.dim() != 2 or scale_inv.dim() != 2:
        raise CheckpointError(
            f"FP8 weight and scale must be 2-D, got {tuple(weight.shape)} and {tuple(scale_inv.shape)}"
        )
    bo, bi = block
    rows, cols = weight.shape
    expected = (math.ceil(rows / bo), math.ceil(cols / bi))
    if tuple(scale_inv.shape) != expected:
        raise CheckpointError(
            f"FP8 scale shape {tuple(scale_inv.shape)} does not match weight {tuple(weight.shape)} "
            f"with blocks {block} (expected {expected})"
        )
    scale = scale_inv.float().repeat_interleave(bo, dim=0).repeat_interleave(bi, dim=1)
    return weight.float() * scale[:rows, :cols]


_FP8_DTYPES = tuple(
    getattr(torch, name) for name in ("float8_e4m3fn", "float8_e5m2", "float8_e4m3fnuz",
                                      "float8_e5m2fnuz") if hasattr(torch, name)
)


# --------------------------------------------------------------------------- loading
def _checkpoint_files(root: Path) -> tuple[list[Path], dict[str, str] | None]:
    """The safetensors files to read and, for an indexed checkpoint, its key -> file map."""
    index = root / INDEX_NAME
    if index.is_file():
        try:
            weight_map = json.loads(index.read_text())["weight_map"]
        except (json.JSONDecodeError, KeyError, TypeError) as e:
            raise CheckpointError(f"{index}: not a valid safetensors index ({e})") from None
        names = sorted(set(weight_map.values()))
        missing = [n for n in names if not (root / n).is_file()]
        if missing:
            raise CheckpointError(f"{index} names shard(s) that do not exist: {', '.join(missing)}")
        return [root / n for n in names], weight_map
    if (root / WEIGHTS_NAME).is_file():
        return [root / WEIGHTS_NAME], None
    files = sorted(root.glob("*.safetensors"))
    if files:
        return files, None
    pickles = sorted(p.name for p in root.iterdir() if p.suffix in PICKLE_SUFFIXES)
    if pickles:
        raise CheckpointError(
            f"{root} holds only pickle weights ({', '.join(pickles)}); latentattn loads safetensors "
            f"only: convert them with transformers (AutoModelForCausalLM.from_pretrained(...)"
            f".save_pretrained(dir, safe_serialization=True)) or safetensors.torch.save_file"
        )
    raise CheckpointError(f"{root} has no {WEIGHTS_NAME}, {INDEX_NAME} or *.safetensors file")


def _hf(our_name: str) -> str:
    return our_name if our_name == "lm_head.weight" else "model." + our_name


_LAYER = re.compile(r"^model\.layers\.(\d+)\.")


def _ignored(hf_name: str, cfg: ModelConfig, mtp: range) -> bool:
    """Checkpoint tensors that are not part of the model and are skipped, as transformers does."""
    m = _LAYER.match(hf_name)
    if m and int(m.group(1)) in mtp:
        # DeepSeek-V3 ships its multi-token-prediction module as layer 61, which transformers
        # skips (_keys_to_ignore_on_load_unexpected in modeling_deepseek_v3.py). Only the layers
        # config.json declares as MTP: any other layer past the model is an error.
        return True
    if hf_name.endswith("rotary_emb.inv_freq"):
        return True  # old remote-code checkpoints saved the RoPE buffer; we recompute it
    return hf_name == "lm_head.weight" and cfg.tie_word_embeddings  # tied: the embedding is it


def checkpoint_dtype(raw: dict[str, Any], source: str) -> torch.dtype:
    """The dtype a checkpoint was saved in: config.json's ``dtype`` (transformers 5) or
    ``torch_dtype`` (4.x); float32 when it names none. An FP8 release (DeepSeek-V3's
    ``quantization_config``) says bfloat16 there, which is what its dequantised weights become."""
    name = raw.get("dtype", raw.get("torch_dtype"))
    if name is None or name == "auto":
        return torch.float32
    try:
        return resolve_dtype(name)
    except ConfigError:
        raise ConfigError(f"{source}: dtype {name!r} is not a floating torch dtype") from None


def from_pretrained(
    path: str | os.PathLike[str],
    # `object`, checked at run time: latentattn.from_pretrained forwards **overrides: object.
    dtype: object = None,
    device: object = None,
    cfg: ModelConfig | None = None,
    **overrides: Any,
) -> Transformer:
    """Load a Hugging Face DeepSeek-V2/V3/V3.2/V4 checkpoint directory (config.json +
    safetensors; V4: :mod:`latentattn.interop.hf_v4`).

    ``dtype=None`` keeps the checkpoint's own dtype (config.json's ``dtype``/``torch_dtype``:
    a bf16 checkpoint loads as bf16); FP8 block-scaled weights (DeepSeek-V3's release) are
    dequantized. ``overrides`` are ModelConfig fields, e.g. ``mla_impl="absorb"``; or ``cfg``,
    the config already mapped from config.json with its overrides (``latentattn.load`` passes it).
    Most callers want :func:`latentattn.load`, which reads every kind of model.
    Raises CheckpointError for a missing file or tensor, an extra tensor or a wrong shape.
    """
    root = Path(path)
    if not root.is_dir():
        raise CheckpointError(f"checkpoint directory {root} does not exist")
    config_path = root / CONFIG_NAME
    if not config_path.is_file():
        raise CheckpointError(f"{config_path} does not exist")
    try:
        raw = json.loads(config_path.read_text())
    except json.JSONDecodeError as e:
        raise ConfigError(f"{config_path}: not valid JSON ({e})") from None
    if cfg is None:
        cfg = config_from_hf(raw, source=str(config_path), **overrides)
    elif overrides:
        raise ConfigError("give from_pretrained either cfg or overrides, not both")
    if raw.get("model_type") == "deepseek_v4":
        from latentattn.interop.hf_v4 import from_pretrained_v4

        target = checkpoint_dtype(raw, str(config_path)) if dtype is None else resolve_dtype(dtype)
        return from_pretrained_v4(root, raw, cfg, target, resolve_device(device))
    mtp = mtp_layers_from_hf(raw, source=str(config_path))
    quant = raw.get("quantization_config") or {}
    block_size = quant.get("weight_block_size") or [128, 128]
    block = (int(block_size[0]), int(block_size[1]))
    target_dtype = checkpoint_dtype(raw, str(config_path)) if dtype is None else resolve_dtype(dtype)
    dev = resolve_device(device)

    from safetensors import safe_open

    files, _ = _checkpoint_files(root)
    with ExitStack() as stack:
        handles = [stack.enter_context(safe_open(str(p), framework="pt")) for p in files]
        where: dict[str, Any] = {}
        for h in handles:
            for k in h.keys():  # noqa: SIM118 (a safe_open handle is not a dict)
                where[k] = h
        model = Transformer.empty(cfg, target_dtype, dev)
        state = model.state_dict()
        expected = {_hf(k): k for k in state if not (k == "lm_head.weight" and cfg.tie_word_embeddings)}

        scales = {k for k in where if k.endswith("_scale_inv")}
        extra = [
            k for k in where
            if k not in expected and k not in scales and not _ignored(k, cfg, mtp)
            # DeepseekV2/V3/V32MoE always builds shared_experts; with n_shared_experts == 0 its
            # weights are empty tensors that our MoE (shared_experts=None) has no slot for.
            and not (".shared_experts." in k and 0 in where[k].get_slice(k).get_shape())
        ]
        if extra:
            beyond = any((m := _LAYER.match(k)) and int(m.group(1)) >= cfg.n_layers for k in extra)
            raise CheckpointError(
                f"{root}: unexpected tensor(s) not in the model: {', '.join(sorted(extra)[:5])}"
                + (f" (and {len(extra) - 5} more)" if len(extra) > 5 else "")
                + (f" (config.json declares {mtp.start} layer(s) and {len(mtp)} "
                   "multi-token-prediction layer(s), num_nextn_predict_layers)" if beyond else "")
            )
        missing = sorted(k for k in expected if k not in where)
        if missing:
            raise CheckpointError(
                f"{root}: missing tensor(s): {', '.join(missing[:5])}"
                + (f" (and {len(missing) - 5} more)" if len(missing) > 5 else "")
            )
        for hf_name, ours in expected.items():
            found = tuple(where[hf_name].get_slice(hf_name).get_shape())
            want = tuple(state[ours].shape)
            if found != want:
                raise CheckpointError(
                    f"{root}: tensor {hf_name} has shape {list(found)}, expected {list(want)}"
                )
        with torch.no_grad():
            for hf_name, ours in expected.items():
                tensor = where[hf_name].get_tensor(hf_name)
                scale_name = hf_name + "_scale_inv"  # "x.weight" -> "x.weight_scale_inv"
                if scale_name in where:
                    tensor = dequantize_fp8(tensor, where[scale_name].get_tensor(scale_name), block)
                elif tensor.dtype in _FP8_DTYPES:
                    raise CheckpointError(f"{root}: FP8 tensor {hf_name} has no {scale_name}")
                state[ours].copy_(tensor)
                del tensor
    model.eval()
    return model


# --------------------------------------------------------------------------- saving
def _parse_size(size: int | str) -> int:
    if isinstance(size, int):
        return size
    m = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([KMG]i?B)?\s*", size, re.IGNORECASE)
    if not m:
        raise ConfigError(f"max_shard_size {size!r} is not a size like 5GB or 500MB")
    unit = (m.group(2) or "B").upper()
    mult = {"B": 1, "KB": 10**3, "MB": 10**6, "GB": 10**9, "KIB": 2**10, "MIB": 2**20,
            "GIB": 2**30}[unit]
    return int(float(m.group(1)) * mult)


def _shards(tensors: dict[str, torch.Tensor], limit: int) -> list[dict[str, torch.Tensor]]:
    """Greedy split in key order, each shard at most ``limit`` bytes (a bigger tensor alone)."""
    shards: list[dict[str, torch.Tensor]] = [{}]
    size = 0
    for k, t in tensors.items():
        n = t.numel() * t.element_size()
        if shards[-1] and size + n > limit:
            shards.append({})
            size = 0
        shards[-1][k] = t
        size += n
    return shards


def _hf_tensors(model: Transformer) -> Iterator[tuple[str, torch.Tensor]]:
    seen: set[int] = set()
    for name, t in model.state_dict().items():
        if name == "lm_head.weight" and model.config.tie_word_embeddings:
            continue  # transformers writes only model.embed_tokens.weight for tied embeddings
        t = t.detach().to("cpu").contiguous()
        ptr = t.untyped_storage().data_ptr()
        if ptr in seen:
            t = t.clone()  # safetensors refuses tensors that share memory
        seen.add(t.untyped_storage().data_ptr())
        yield _hf(name), t
    moe = model.config.moe
    if moe is not None and moe.n_shared_experts == 0:
        # DeepseekV2/V3/V32MoE always builds shared_experts (intermediate size 0 here) and reports
        # its weights missing unless the file has them: write the empty tensors it expects.
        dim, dtype = model.config.dim, model.dtype
        for i in range(model.config.n_layers):
            if model.config.is_moe_layer(i):
                prefix = f"model.layers.{i}.mlp.shared_experts."
                yield prefix + "gate_proj.weight", torch.empty(0, dim, dtype=dtype)
                yield prefix + "up_proj.weight", torch.empty(0, dim, dtype=dtype)
                yield prefix + "down_proj.weight", torch.empty(dim, 0, dtype=dtype)


def save_pretrained(
    model: Transformer, path: str | os.PathLike[str], max_shard_size: int | str = DEFAULT_MAX_SHARD_SIZE
) -> None:
    """Write ``config.json`` and ``model.safetensors`` (or shards + index) in the Hugging Face
    DeepSeek layout (V4: DeepSeek's tensor names, :mod:`latentattn.interop.hf_v4`), loadable by
    transformers and by :func:`from_pretrained`.

    Files are written under temporary names and renamed into place, config.json last; weight
    files of an earlier checkpoint in the directory are removed, as transformers does.
    """
    from safetensors.torch import save_file

    hf_config = config_to_hf(model.config)  # first: a GQA model fails before touching the disk
    hf_config["dtype"] = str(model.dtype).removeprefix("torch.")
    limit = _parse_size(max_shard_size)
    if limit <= 0:
        raise ConfigError(f"max_shard_size must be positive, got {max_shard_size!r}")
    root = Path(path)
    if root.exists() and not root.is_dir():
        raise CheckpointError(f"{root} exists and is not a directory")
    root.mkdir(parents=True, exist_ok=True)

    if isinstance(model.config.attention, V4AttentionConfig):
        from latentattn.interop.hf_v4 import v4_checkpoint_tensors

        tensors = dict(v4_checkpoint_tensors(model))  # DeepSeek's naming (interop.hf_v4)
    else:
        tensors = dict(_hf_tensors(model))
    shards = _shards(tensors, limit)
    final: dict[str, bytes | dict[str, torch.Tensor]] = {}
    if len(shards) == 1:
        final[WEIGHTS_NAME] = shards[0]
    else:
        weight_map: dict[str, str] = {}
        for i, shard in enumerate(shards, 1):
            name = f"model-{i:05d}-of-{len(shards):05d}.safetensors"
            final[name] = shard
            weight_map.update(dict.fromkeys(shard, name))
        total = sum(t.numel() * t.element_size() for t in tensors.values())
        index = {"metadata": {"total_size": total}, "weight_map": weight_map}
        final[INDEX_NAME] = json.dumps(index, indent=2, sort_keys=True).encode() + b"\n"
    final[CONFIG_NAME] = json.dumps(hf_config, indent=2, sort_keys=True).encode() + b"\n"

    temps: dict[str, Path] = {}
    try:
        for name, content in final.items():
            tmp = root / f".{name}.tmp-{os.getpid()}"
            temps[name] = tmp
            if isinstance(content, bytes):
                tmp.write_bytes(content)
            else:
                # metadata format=pt: transformers refuses safetensors files without it.
                save_file(content, str(tmp), metadata={"format": "pt"})
            fsync_file(tmp)  # durable before any rename: latentattn.io explains why
        for name in sorted(final, key=lambda n: n == CONFIG_NAME):  # config.json last
            os.replace(temps.pop(name), root / name)
    finally:
        for tmp in temps.values():
            tmp.unlink(missing_ok=True)
    fsync_dir(root)  # the renames: the new checkpoint is now on disk whole
    # Stale weights of an earlier save (other shard count, or sharded vs single) would be mixed in
    # on load; transformers' save_pretrained deletes them the same way.
    stale = re.compile(r"^model(-\d{5}-of-\d{5})?\.safetensors(\.index\.json)?$")
    removed = False
    for p in root.iterdir():
        if stale.match(p.name) and p.name not in final:
            p.unlink()
            removed = True
    if removed:
        fsync_dir(root)  # or a crash could bring the stale shards back beside the new ones


def save_pretrained_dir(model: Transformer, out: str | os.PathLike[str], tokenizer: Any = None) -> Path:
    """A new DeepSeek checkpoint directory ``out`` (which must not exist, or be empty), written
    whole or not at all (:func:`latentattn.io.new_directory`): :func:`save_pretrained`'s files
    and the tokenizer's tokenizer.json, its EOS id in config.json (``eos_token_id``, as
    transformers' and vLLM's generation read it)."""
    from latentattn.interop.native import save_tokenizer
    from latentattn.io import new_directory

    config_to_hf(model.config)  # refuse before creating anything

    def fill(tmp: Path) -> None:
        save_pretrained(model, tmp)
        eos = save_tokenizer(tokenizer, tmp)
        if eos is not None:
            config = json.loads((tmp / CONFIG_NAME).read_text())
            config["eos_token_id"] = eos
            (tmp / CONFIG_NAME).write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")

    try:
        return new_directory(out, fill)
    except LatentAttnError as e:
        if isinstance(e, ConfigError | CheckpointError):
            raise
        raise CheckpointError(str(e)) from None
