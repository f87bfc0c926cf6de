"""The static decode step: no host sync on the decode path of any cache, one compiled graph.

Every cache kind a decode step can run over (dense K/V, MLA's latent, paged, fp8 records, DSA's
indexer keys in the model's dtype and in e4m3) is checked two ways: eagerly under
:func:`forbid_host_sync` (which fails on ``.item()``, ``.tolist()``, ``bool(t)``, ``int(t)``),
and compiled with ``fullgraph=True`` (a graph break is an error) with recompilation forbidden
after the first step (the shapes do not change from step to step).
"""

from __future__ import annotations

import pytest
import torch
import torch._dynamo

import latentattn
from latentattn.errors import CacheOverflowError, ConfigError
from latentattn.model import compiled
from latentattn.model.compiled import HostSyncError, forbid_host_sync

# (preset, load overrides, make_cache arguments): every cache a decode step reads.
CACHES = {
    "dense-gqa": ("tiny-gqa", {}, {}),
    "naive-mla": ("tiny-mla", {"mla_impl": "naive"}, {}),
    "latent": ("tiny-mla", {"mla_impl": "absorb"}, {}),
    "paged": ("tiny-mla", {}, {"page_size": 8}),
    "fp8": ("tiny-mla", {}, {"latent_fp8": True}),
    "paged-fp8": ("tiny-mla", {}, {"latent_fp8": True, "page_size": 8}),
    "dsa": ("tiny-dsa", {}, {}),
    "dsa-fp8-keys": ("tiny-dsa", {"indexer_key_cache": "fp8"}, {}),
    "dsa-fp8-latent": ("tiny-dsa", {}, {"latent_fp8": True}),
}


def _model(name: str) -> tuple[latentattn.Transformer, dict[str, object]]:
    preset, overrides, cache_args = CACHES[name]
    return latentattn.load(preset, seed=0, max_seq_len=64, **overrides), cache_args


def _decode_logits(model: latentattn.Transformer, ids: torch.Tensor, steps: int, static: bool,
                   cache_args: dict[str, object], guard: bool = False) -> torch.Tensor:
    """Prefill ids (B, T), then ``steps`` greedy decode steps; the stacked decode logits."""
    cache = model.make_cache(ids.shape[0], ids.shape[1] + steps, static=static, **cache_args)
    with torch.no_grad():
        tok = model(ids, cache)[:, -1:].argmax(-1)
        out = []
        for _ in range(steps):
            if guard:
                with forbid_host_sync():
                    logits = model(tok, cache)
            else:
                logits = model(tok, cache)
            out.append(logits[:, -1])
            tok = logits[:, -1:].argmax(-1)
    return torch.stack(out, 1)


def test_the_guard_fails_on_every_host_read() -> None:
    t = torch.ones(2)
    with forbid_host_sync():
        for read in (lambda: t.sum().item(), t.tolist, lambda: bool(t.all()), lambda: int(t[0]),
                     lambda: float(t[0]), lambda: range(t[0].long())):
            with pytest.raises(HostSyncError):
                read()
    assert t.sum().item() == 2.0  # restored after the block


@pytest.mark.parametrize("name", list(CACHES))
def test_decode_step_never_reads_the_device(name: str) -> None:
    """Eager decode over a static cache, guarded, gives the eager dynamic cache's logits. The
    same arithmetic over more (masked) positions: equal to fp32 rounding of the softmax sums."""
    model, cache_args = _model(name)
    ids = torch.randint(0, model.config.vocab_size, (2, 9), generator=torch.Generator().manual_seed(1))
    want = _decode_logits(model, ids, 4, static=False, cache_args=cache_args)
    got = _decode_logits(model, ids, 4, static=True, cache_args=cache_args, guard=True)
    torch.testing.assert_close(got, want)


def test_ragged_prefill_then_static_decode() -> None:
    """A ragged batch reads its lengths back once, at prefill; its decode steps do not."""
    model, _ = _model("latent")
    ids = torch.randint(0, model.config.vocab_size, (3, 8), generator=torch.Generator().manual_seed(2))
    lengths = torch.tensor([8, 3, 5])
    outs = []
    for static in (False, True):
        cache = model.make_cache(3, 12, static=static)
        with torch.no_grad():
            tok = model(ids, cache, lengths, logits_at=lengths - 1).argmax(-1, keepdim=True)
            assert cache.host_lengths == [8, 3, 5]
            with forbid_host_sync():
                outs.append(model(tok, cache)[:, -1])
    torch.testing.assert_close(outs[1], outs[0])


def test_overflow_is_checked_on_the_host() -> None:
    model, _ = _model("latent")
    cache = model.make_cache(1, 4, static=True)
    with torch.no_grad():
        model(torch.zeros(1, 4, dtype=torch.long), cache)
        with forbid_host_sync(), pytest.raises(CacheOverflowError, match="row 0 would hold 5"):
            model(torch.zeros(1, 1, dtype=torch.long), cache)


@pytest.mark.parametrize("name", ["dense-gqa", "paged-fp8", "dsa-fp8-keys"])
def test_decode_step_compiles_to_one_graph(name: str) -> None:
    """fullgraph=True: a graph break (a host read, a data-dependent shape) fails the compile; after
    the first decode step a recompilation fails too. The compiled generation equals the eager."""
    model, cache_args = _model(name)
    ids = torch.randint(0, model.config.vocab_size, (2, 6), generator=torch.Generator().manual_seed(3))
    want = model.generate(ids, 5, **cache_args)  # type: ignore[arg-type]
    torch._dynamo.reset()
    latentattn.compile(model, fullgraph=True)
    assert compiled.static_decode(model)
    cache = model.make_cache(2, 11, **cache_args)  # type: ignore[arg-type]
    assert cache.static
    with torch.no_grad():
        tok = model(ids, cache)[:, -1:].argmax(-1)
        tok = model(tok, cache)[:, -1:].argmax(-1)  # compiles the decode step
        with torch._dynamo.config.patch(error_on_recompile=True):
            for _ in range(3):
                tok = model(tok, cache)[:, -1:].argmax(-1)
    got = model.generate(ids, 5, **cache_args)  # type: ignore[arg-type]
    torch._dynamo.reset()
    assert torch.equal(got, want)


def test_compile_without_a_compiler_is_one_clear_error(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(compiled, "compiler_error", lambda: "torch.compile needs a C++ compiler")
    model, _ = _model("latent")
    with pytest.raises(ConfigError, match="C\\+\\+ compiler"):
        latentattn.compile(model)
    assert model.compiled_steps is None


def test_generate_compile_without_a_compiler_exits_2(monkeypatch: pytest.MonkeyPatch,
                                                     capsys: pytest.CaptureFixture[str]) -> None:
    from conftest import cli_error

    monkeypatch.setattr(compiled, "compiler_error", lambda: "torch.compile needs a C++ compiler")
    line = cli_error(capsys, ["generate", "--model", "tiny-mla", "--prompt", "x",
                              "--max-new-tokens", "2", "--compile"])
    assert "--compile: torch.compile needs a C++ compiler" in line


def test_v4_over_a_static_cache_equals_its_dynamic_cache() -> None:
    """DeepSeek-V4's caches (window ring, compressed entries) under a static step: the entries past
    a row's position are hidden by their visibility, so reading the whole capacity changes
    nothing. (Its MoE reads the chosen experts back to the host: not a static_decode model.)"""
    model = latentattn.load("tiny-v4", seed=0, max_seq_len=64)
    assert not compiled.static_decode(model)
    ids = torch.randint(0, model.config.vocab_size, (2, 9), generator=torch.Generator().manual_seed(1))
    want = _decode_logits(model, ids, 6, static=False, cache_args={})
    torch.testing.assert_close(_decode_logits(model, ids, 6, static=True, cache_args={}), want)
