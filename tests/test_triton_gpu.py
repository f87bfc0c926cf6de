"""The Triton kernels compiled on a CUDA GPU at the launches latentattn makes: DeepSeek-V3's 128
heads over the 512 + 64 latent row, V3.2's 64 x 128 indexer, batches 1 to 32, contexts to 32k,
64-token pages in a shuffled pool, fp8 records, and prefills whose offsets pass 2^31 elements.
Skipped without CUDA or in the interpreter; ``make gpu-check`` runs this file with
TRITON_INTERPRET=0 and puts each test's outcome, time and figures in one JSON.

Each check is a helper parametrized by device, dtype and shape (``check_*``): the tests here call
them at the real shapes, tests/test_gpu_check.py calls the same helpers on CPU tensors in Triton's
interpreter at tiny fp32 shapes, so their logic runs on every machine.

The rule is flash-attention's (tests/test_flash_attn.py): the kernel is no further from the
exact result (computed in float64 on the very inputs the kernel reads) than ``C`` times the
PyTorch computation at the kernel's precision is, plus a floor of a few fp32 ulps::

    max|kernel - exact| <= C * max|torch - exact| + sqrt(terms) * eps(fp32) * max|exact|

"PyTorch at the kernel's precision" is flash-attention's ``attention_ref(upcast=False)``: the
same formula with every matmul, score and probability in the kernel's dtype (bf16 scores and
probabilities, as a bf16 model would compute them). The kernels keep their scores in fp32, so
they should sit well inside the bound; a bug (a wrong index, scale, page or offset, a dropped
tile, an over-read of the NaN every unused slot holds) is orders of magnitude outside it. The
floor keeps a baseline that happens to round exactly (one key, say) from demanding the same luck
of the kernel; in bf16 it is negligible. The fp32 indexer's baseline is its PyTorch path in fp32,
the precision the indexer computes in."""

from __future__ import annotations

import copy
import gc
import os
from collections.abc import Callable, Iterator
from typing import Any

import pytest
import torch

pytestmark = pytest.mark.skipif(
    not torch.cuda.is_available() or os.environ.get("TRITON_INTERPRET") == "1",
    reason="needs a CUDA GPU with compiled kernels (TRITON_INTERPRET=0): make gpu-check")

R, DR, H = 512, 64, 128  # DeepSeek-V3 / V3.2: latent rank, rope dims, query heads
INDEX_HEADS, INDEX_DIM = 64, 128  # V3.2's indexer
PAGE = 64  # FlashMLA's and vLLM's page size
C = 2.0  # flash-attention's factor
FP32_EPS = torch.finfo(torch.float32).eps
Figures = dict[str, float]


# ---------------------------------------------------------------------------- the rule
def max_error(got: torch.Tensor, exact: torch.Tensor) -> float:
    """max |got - exact| over exact's finite entries, after checking that ``got`` is non-finite
    exactly where ``exact`` is, with the same values (an LSE of -inf, a masked logit)."""
    assert got.shape == exact.shape, (got.shape, exact.shape)
    finite = torch.isfinite(exact)
    assert torch.equal(torch.isfinite(got), finite), "non-finite entries differ"
    assert torch.equal(got[~finite].double(), exact[~finite].double()), "non-finite entries differ"
    return float((got[finite].double() - exact[finite].double()).abs().max()) if finite.any() else 0.0


def within(got: torch.Tensor, exact: torch.Tensor, base: torch.Tensor, *, terms: int, what: str
           ) -> Figures:
    """Assert the module docstring's rule for one output; return its figures (for the JSON
    ``make gpu-check`` writes: how close each kernel came to its bound, not only pass/fail).
    ``terms``: the longest chain of additions behind one output, for the floor."""
    err, base_err = max_error(got, exact), max_error(base, exact)
    finite = exact[torch.isfinite(exact)]
    scale = float(finite.abs().max()) if finite.numel() else 0.0
    bound = C * base_err + terms**0.5 * FP32_EPS * scale
    assert err <= bound, (f"{what}: max |kernel - float64| = {err:.3g} exceeds {C:g} x the "
                          f"{base.dtype} PyTorch error {base_err:.3g} + floor = {bound:.3g}")
    return {f"{what} err": err, f"{what} torch err": base_err, f"{what} bound": bound}


def _lengths(batch: int, longest: int, seed: int) -> list[int]:
    """Ragged lengths: one sequence of 1 token and one of ``longest``, the rest anywhere between
    (rarely a multiple of a page or a tile)."""
    if batch == 1:
        return [longest]
    rest = torch.randint(2, longest, (batch - 2,), generator=torch.Generator().manual_seed(seed))
    return [1, longest, *rest.tolist()]


def _nan_fill(dtype: torch.dtype) -> float | int:
    """What every slot no sequence owns holds, so an over-read shows: NaN, or 0xFF bytes in fp8
    records (NaN as e4m3, as fp32 scale and as bf16 rope)."""
    return 0xFF if dtype == torch.uint8 else float("nan")


def _paginate(cache: torch.Tensor, lengths: list[int], page: int, generator: torch.Generator
              ) -> tuple[torch.Tensor, torch.Tensor]:
    """The rows of a contiguous cache (B, S, W) in ``page``-row pages of a shuffled pool (two
    spare pages, unused rows filled as :func:`_nan_fill`) and a block table (B, max pages + 1,
    unused cells -1)."""
    need = [-(-n // page) for n in lengths]
    width, device = cache.shape[-1], cache.device
    pool = torch.full((sum(need) + 2, page, width), _nan_fill(cache.dtype), dtype=cache.dtype,
                      device=device)
    order = torch.randperm(pool.shape[0], generator=generator, device=device)
    table = torch.full((len(lengths), max(need) + 1), -1, dtype=torch.int32, device=device)
    start = 0
    for i, (n, k) in enumerate(zip(lengths, need, strict=True)):
        pids = order[start : start + k]
        start += k
        table[i, :k] = pids.to(torch.int32)
        rows = torch.full((k * page, width), _nan_fill(cache.dtype), dtype=cache.dtype, device=device)
        rows[:n] = cache[i, :n]
        pool[pids] = rows.view(k, page, width)
    return pool, table


# ---------------------------------------------------------------------------- dense decode
def _decode_one(q: torch.Tensor, rows: torch.Tensor, scale: float, rank: int
                ) -> tuple[torch.Tensor, torch.Tensor]:
    """softmax(scale q rows^T) rows[:, :rank] and the LSE, in the inputs' dtype (float64: the
    exact result; bf16: the baseline, scores and probabilities rounded to bf16)."""
    s = (q @ rows.T) * scale
    p = torch.softmax(s, dim=-1)
    return p @ rows[:, :rank], torch.logsumexp(s.double(), dim=-1)


def check_dense_decode(device: str, dtype: torch.dtype, lengths: list[int], *, heads: int = H,
                       rank: int = R, rope: int = DR, page: int | None = None, fp8: bool = False,
                       num_splits: int | None = None, seed: int = 0) -> Figures:
    """Absorbed decode (``mla_decode_triton``, or ``mla_decode_fp8_triton`` over FlashMLA's fp8
    records) of one token per sequence over ragged ``lengths``, contiguous or in ``page``-row
    pages, every slot past a sequence's end NaN; (o, lse) by the rule."""
    from latentattn.cache.fp8 import pack_record, unpack_record
    from latentattn.kernels.mla_decode import mla_decode_fp8_triton, mla_decode_triton

    g = torch.Generator(device=device).manual_seed(seed)
    b, longest, width = len(lengths), max(lengths), rank + rope
    scale = width**-0.5
    q = torch.randn(b, heads, width, device=device, generator=g).to(dtype)
    latent = torch.randn(b, longest, width, device=device, generator=g)
    cache = pack_record(latent, rank) if fp8 else latent.to(dtype)
    del latent
    for i, n in enumerate(lengths):
        cache[i, n:] = _nan_fill(cache.dtype)
    # The values the kernel reads: the records decoded (e4m3 x a power of two, exact in bf16).
    rows = unpack_record(cache, rank) if fp8 else cache
    n = torch.tensor(lengths, dtype=torch.int32, device=device)
    table = None
    if page is not None:
        cache, table = _paginate(cache, lengths, page, g)
    decode = mla_decode_fp8_triton if fp8 else mla_decode_triton
    got_o, got_lse = decode(q, cache, n, scale, rank, block_table=table, num_splits=num_splits)
    exact, base = [], []
    for i, m in enumerate(lengths):
        exact.append(_decode_one(q[i].double(), rows[i, :m].double(), scale, rank))
        base.append(_decode_one(q[i], rows[i, :m].to(dtype), scale, rank))
    terms = width + longest
    figures = within(got_o, torch.stack([e[0] for e in exact]), torch.stack([e[0] for e in base]),
                     terms=terms, what="o")
    lse_base = torch.stack([e[1] for e in base]).float()  # the kernel's LSE is fp32
    figures |= within(got_lse, torch.stack([e[1] for e in exact]), lse_base, terms=terms, what="lse")
    return figures


# ---------------------------------------------------------------------------- sparse attention
def _sparse(q: torch.Tensor, kv: torch.Tensor, idx: torch.Tensor, scale: float, rank: int
            ) -> tuple[torch.Tensor, torch.Tensor]:
    """Attention over the selected rows only, in the inputs' dtype (as :func:`_decode_one`);
    -1 slots masked, a token with none valid gets o = 0 and LSE -inf. Differentiable."""
    b = kv.shape[0]
    sel = kv[torch.arange(b, device=kv.device)[:, None, None], idx.clamp(min=0).long()]  # (B, T, K, W)
    s = torch.einsum("bhtd,btkd->bhtk", q, sel) * scale
    s = s.masked_fill((idx < 0)[:, None], float("-inf"))
    # A token with no valid slot: scores 0 there, so that softmax (and its gradient) stays
    # finite, then p = 0. A softmax in the dtype, as a bf16 model computes it: no p rebuilt
    # from an LSE rounded to bf16, whose error would loosen the baseline.
    empty = (idx < 0).all(dim=-1)[:, None, :, None]  # (B, 1, T, 1)
    s = s.masked_fill(empty, 0.0)
    p = torch.softmax(s, dim=-1).masked_fill(empty, 0.0)
    lse = torch.logsumexp(s.double(), dim=-1).masked_fill(empty[..., 0], float("-inf"))
    return torch.einsum("bhtk,btkc->bhtc", p, sel[..., :rank]), lse


def check_sparse(device: str, dtype: torch.dtype, *, batch: int, tokens: int, keys: int, topk: int,
                 heads: int = H, rank: int = R, rope: int = DR, backward: bool = False,
                 fp8: bool = False, num_splits: int | None = None, rows: list[int] | None = None,
                 seed: int = 0) -> Figures:
    """Sparse attention over top-k indices (``sparse_mla_triton``, or ``sparse_mla_fp8_triton``
    over fp8 records): every 7th slot -1, a token with no valid slot (prefill), every row no
    token selects NaN. (o, lse) by the rule, and with ``backward`` (dq, dkv) for a random dO.
    ``rows``: check only these tokens against the references (a prefill too long to compute
    them in full), the kernel still running over every token."""
    from latentattn.cache.fp8 import pack_record, unpack_record
    from latentattn.kernels.sparse_mla import sparse_mla_fp8_triton, sparse_mla_triton

    assert not (backward and (fp8 or rows is not None))
    g = torch.Generator(device=device).manual_seed(seed)
    width = rank + rope
    scale = width**-0.5
    q = torch.randn(batch, heads, tokens, width, device=device, generator=g, dtype=dtype)
    latent = torch.randn(batch, keys, width, device=device, generator=g)
    idx = torch.randint(0, keys, (batch, tokens, topk), device=device, generator=g, dtype=torch.int32)
    idx[..., ::7] = -1
    if tokens > 1:
        idx[0, 0] = -1
    chosen = torch.zeros(batch, keys, dtype=torch.bool, device=device)
    chosen.scatter_(1, idx.clamp(min=0).flatten(1).long(), True)
    cache = pack_record(latent, rank) if fp8 else latent.to(dtype)
    del latent
    cache[~chosen] = _nan_fill(cache.dtype)
    kv = unpack_record(cache, rank) if fp8 else cache  # the values the kernel reads
    sub = slice(None) if rows is None else torch.tensor(rows, device=device)
    q_sub, idx_sub = q[:, :, sub], idx[:, sub]
    terms = width + topk
    if backward:
        do = torch.randn(batch, heads, tokens, rank, device=device, generator=g, dtype=dtype)

        def run(fn: Callable[..., tuple[torch.Tensor, torch.Tensor]], qq: torch.Tensor,
                kk: torch.Tensor, **kw: Any) -> list[torch.Tensor]:
            qq, kk = qq.detach().clone().requires_grad_(), kk.detach().clone().requires_grad_()
            o, lse = fn(qq, kk, idx, scale, rank, **kw)
            return [o.detach(), lse.detach(), *torch.autograd.grad(o, (qq, kk), do.to(o.dtype))]

        got = run(sparse_mla_triton, q, cache, num_splits=num_splits)
        exact = run(_sparse, q.double(), kv.double())
        base = run(_sparse, q, kv)
        base[1] = base[1].float()
        figures: Figures = {}
        for a, e, p, what in zip(got, exact, base, ("o", "lse", "dq", "dkv"), strict=True):
            # dkv sums over every token and head that selected a row; dq over the top-k.
            figures |= within(a, e, p, terms=terms + (tokens * heads if what == "dkv" else 0),
                              what=what)
        return figures
    with torch.no_grad():
        if fp8:
            o, lse = sparse_mla_fp8_triton(q, cache, idx, scale, rank, num_splits=num_splits)
        else:
            o, lse = sparse_mla_triton(q, cache, idx, scale, rank, num_splits=num_splits)
        o, lse = o[:, :, sub], lse[:, :, sub]  # the checked tokens only
        exact = _sparse(q_sub.double(), kv.double(), idx_sub, scale, rank)
        base_o, base_lse = _sparse(q_sub, kv.to(dtype), idx_sub, scale, rank)
    return (within(o, exact[0], base_o, terms=terms, what="o")
            | within(lse, exact[1], base_lse.float(), terms=terms, what="lse"))


# ---------------------------------------------------------------------------- the indexer
def _index(q: torch.Tensor, w: torch.Tensor, k: torch.Tensor, positions: torch.Tensor,
           scale: float) -> torch.Tensor:
    """I[b, t, s] = scale sum_h w relu(q . k), -inf past the token's position, in the inputs'
    dtype (float64 here: the exact result)."""
    logits = torch.einsum("bthd,bsd->bths", q, k).relu()
    out = torch.einsum("bth,bths->bts", w, logits) * scale
    keys = torch.arange(k.shape[1], device=k.device)
    return out.masked_fill(keys[None, None] > positions[..., None], float("-inf"))


def check_indexer(device: str, key_dtype: torch.dtype, *, tokens: int, keys: int,
                  heads: int = INDEX_HEADS, dim: int = INDEX_DIM, fp8: bool = False,
                  rows: list[int] | None = None, seed: int = 0) -> Figures:
    """The indexer's logits (``indexer_logits_triton``) for the last ``tokens`` positions of
    ``keys``, over keys in ``key_dtype`` or, with ``fp8``, quantised by ``quantize_e4m3``; the
    exact result on the keys as the kernel reads them (the fp8 ones decoded), the baseline
    ``indexer_logits_ref``, its PyTorch path in fp32. ``rows``: as in :func:`check_sparse`."""
    from latentattn.cache.fp8 import dequantize_e4m3, quantize_e4m3
    from latentattn.kernels.indexer_logits import indexer_logits_ref, indexer_logits_triton

    g = torch.Generator(device=device).manual_seed(seed)
    q = torch.randn(1, tokens, heads, dim, device=device, generator=g)
    w = torch.randn(1, tokens, heads, device=device, generator=g)
    k = torch.randn(1, keys, dim, device=device, generator=g)
    positions = torch.arange(keys - tokens, keys, device=device)[None]
    scale = dim**-0.5
    k_scale = None
    if fp8:
        k, k_scale = quantize_e4m3(k)
        exact_keys = dequantize_e4m3(k, k_scale)
    else:
        k = k.to(key_dtype)
        exact_keys = k.float()
    got = indexer_logits_triton(q, w, k, positions, scale, k_scale=k_scale)
    sub = slice(None) if rows is None else torch.tensor(rows, device=device)
    got = got[:, sub]
    q, w, positions = q[:, sub], w[:, sub], positions[:, sub]
    exact = _index(q.double(), w.double(), exact_keys.double(), positions, scale)
    base = indexer_logits_ref(q, w, k, positions, scale, k_scale=k_scale)
    return within(got, exact, base, terms=dim + heads, what="logits")


# ---------------------------------------------------------------------------- a whole model
DECODE_WRAPPERS = {"latentattn.attention.mla": ("mla_decode_triton", "mla_decode_fp8_triton"),
                   "latentattn.attention.dsa": ("indexer_logits_triton", "sparse_mla_triton",
                                                "sparse_mla_fp8_triton")}
EXPECTED_CALLS = {"tiny-dsa": {"indexer_logits_triton", "sparse_mla_triton"}}  # else MLA's decode


def check_generation(name: str, device: str, *, batch: int = 2, prompt_len: int = 40,
                     new_tokens: int = 8, seed: int = 0) -> Figures:
    """``latentattn.load(name, seed=0)`` (fp32) generating greedily on ``device`` through the
    Triton kernels (CUDA: the default backend; CPU: ``triton`` forced, which runs them in the
    interpreter) gives the CPU PyTorch path's tokens, a near-tie apart (conftest's
    ``assert_same_greedy``); the kernel wrappers the model calls are counted, so a model that
    silently ran PyTorch fails."""
    from conftest import assert_same_greedy
    from latentattn import load
    from latentattn.kernels.backend import use_backend

    model = load(name, seed=seed)
    prompt = torch.randint(0, model.config.vocab_size, (batch, prompt_len),
                           generator=torch.Generator().manual_seed(seed))
    with use_backend("auto"):
        want = model.generate(prompt, new_tokens)  # CPU tensors: the PyTorch path
    on_device = copy.deepcopy(model).to(device)
    calls: dict[str, int] = {}
    with pytest.MonkeyPatch.context() as mp:
        for module, names in DECODE_WRAPPERS.items():
            for wrapper in names:
                mp.setattr(f"{module}.{wrapper}", _counted(calls, wrapper, f"{module}.{wrapper}"))
        with use_backend("auto" if torch.device(device).type == "cuda" else "triton"):
            got = on_device.generate(prompt.to(device), new_tokens).cpu()
    want_calls = EXPECTED_CALLS.get(name, {"mla_decode_triton"})
    assert want_calls <= calls.keys(), (f"{name} generated on {device} without calling "
                                        f"{sorted(want_calls - calls.keys())}: {calls}")
    assert_same_greedy(got, want, model, prompt_len)
    return {"differing tokens": float((got != want).sum()), "kernel calls": float(sum(calls.values()))}


def _counted(calls: dict[str, int], name: str, path: str) -> Callable[..., Any]:
    import importlib

    module, attr = path.rsplit(".", 1)
    fn = getattr(importlib.import_module(module), attr)

    def wrapper(*args: Any, **kwargs: Any) -> Any:
        calls[name] = calls.get(name, 0) + 1
        return fn(*args, **kwargs)

    return wrapper


# ---------------------------------------------------------------------------- the GPU tests
@pytest.fixture(autouse=True)
def _free_memory() -> Iterator[None]:
    """Each test's tensors (up to ~15 GB at the int32-offset shapes) gone before the next."""
    yield
    gc.collect()
    torch.cuda.empty_cache()


def _record(record_property: Callable[[str, object], None], figures: Figures) -> None:
    for key, value in figures.items():
        record_property(key, value)


DECODE_CASES = [
    # bf16 rows, contiguous and in 64-token pages, B 1 / 4 / 32 up to 32k (B = 1 splits the most)
    *(pytest.param(torch.bfloat16, page, False, b, longest, id=f"bf16-{name}-B{b}-{longest // 1024}k")
      for page, name in ((None, "contiguous"), (PAGE, "paged"))
      for b, longest in ((1, 32768), (4, 16384), (32, 8192))),
    pytest.param(torch.bfloat16, None, True, 4, 16384, id="fp8-contiguous-B4-16k"),
    pytest.param(torch.bfloat16, PAGE, True, 32, 8192, id="fp8-paged-B32-8k"),
    pytest.param(torch.float16, None, False, 4, 16384, id="fp16-contiguous-B4-16k"),
    pytest.param(torch.float16, PAGE, False, 1, 32768, id="fp16-paged-B1-32k"),
]


@pytest.mark.parametrize(("dtype", "page", "fp8", "batch", "longest"), DECODE_CASES)
def test_dense_decode(dtype: torch.dtype, page: int | None, fp8: bool, batch: int, longest: int,
                      record_property: Callable[[str, object], None]) -> None:
    _record(record_property, check_dense_decode("cuda", dtype, _lengths(batch, longest, batch),
                                                page=page, fp8=fp8))


@pytest.mark.parametrize(("fp8", "tokens", "keys", "topk", "splits", "backward", "rows"), [
    pytest.param(False, 128, 8192, 2048, None, True, None, id="prefill-T128-fwd-bwd"),
    pytest.param(False, 1, 65536, 2048, 16, False, None, id="decode-split16"),
    pytest.param(False, 1, 65536, 2048, 1, False, None, id="decode-unsplit"),
    pytest.param(True, 1, 16384, 2048, None, False, None, id="fp8-decode"),
    pytest.param(True, 1, 16384, 2048, 16, False, None, id="fp8-decode-split16"),
    # q (1, 128, 32768, 576): head 127's offset, 127 x 32768 x 576, is past 2^31 elements.
    pytest.param(False, 32768, 32768, 512, None, False, [0, 1, 16384, 32766, 32767],
                 id="prefill-T32k-past-int32"),
])
def test_sparse(fp8: bool, tokens: int, keys: int, topk: int, splits: int | None, backward: bool,
                rows: list[int] | None, record_property: Callable[[str, object], None]) -> None:
    batch = 2 if tokens == 1 else 1
    _record(record_property, check_sparse("cuda", torch.bfloat16, batch=batch, tokens=tokens,
                                          keys=keys, topk=topk, backward=backward, fp8=fp8,
                                          num_splits=splits, rows=rows))


@pytest.mark.parametrize(("fp8", "tokens", "keys", "rows"), [
    pytest.param(False, 64, 8192, None, id="bf16-keys"),
    pytest.param(True, 64, 8192, None, id="fp8-keys"),
    pytest.param(False, 1, 32768, None, id="bf16-keys-decode"),
    # (1, 49152, 49152) fp32 logits, 9.7 GB: row t starts at t x 49152, past 2^31 from t = 43691.
    pytest.param(False, 49152, 49152, [0, 24576, 49150, 49151], id="prefill-T48k-past-int32"),
])
def test_indexer(fp8: bool, tokens: int, keys: int, rows: list[int] | None,
                 record_property: Callable[[str, object], None]) -> None:
    _record(record_property, check_indexer("cuda", torch.bfloat16, tokens=tokens, keys=keys,
                                           fp8=fp8, rows=rows))


@pytest.mark.parametrize("name", ["tiny-mla", "tiny-dsa"])
def test_tiny_model_generates_on_cuda(name: str, record_property: Callable[[str, object], None]
                                      ) -> None:
    _record(record_property, check_generation(name, "cuda"))
