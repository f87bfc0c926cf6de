"""The whole model with each attention variant: cache, incremental decode, ragged rows, generation."""

from __future__ import annotations

import copy

import pytest
import torch

from conftest import assert_close, assert_same_greedy
from latentattn import CacheOverflowError, LatentAttnError, Transformer, get_preset
from latentattn.config import MLAConfig

VARIANTS = ["tiny-mha", "tiny-gqa", "tiny-mqa", "tiny-mla", "tiny-mla-moe"]
MLA_IMPLS = ["naive", "absorb", "auto"]


def _models() -> list[tuple[str, Transformer]]:
    # Built at import, before any test's seed fixture runs: without a seed of their own the
    # weights would depend on what the modules collected earlier drew from the global RNG.
    out = []
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        for name in VARIANTS:
            cfg = get_preset(name)
            if isinstance(cfg.attention, MLAConfig):
                out += [(f"{name}/{impl}", Transformer(cfg.replace(mla_impl=impl)).eval())
                        for impl in MLA_IMPLS]
            else:
                out.append((name, Transformer(cfg).eval()))
    return out


MODELS = _models()
IDS = [name for name, _ in MODELS]


@pytest.mark.parametrize(("name", "model"), MODELS, ids=IDS)
@torch.no_grad()
def test_at_once_equals_token_by_token(name: str, model: Transformer) -> None:
    ids = torch.randint(0, 256, (2, 13))
    full = model(ids)
    cache = model.make_cache(2, 20)
    steps = [model(ids[:, i : i + 1], cache) for i in range(13)]
    assert_close(torch.cat(steps, 1), full)
    assert cache.lengths.tolist() == [13, 13]


@pytest.mark.parametrize(("name", "model"), MODELS, ids=IDS)
@torch.no_grad()
def test_chunked_prefill_equals_at_once(name: str, model: Transformer) -> None:
    ids = torch.randint(0, 256, (2, 17))
    cache = model.make_cache(2, 32)
    chunks = [model(ids[:, :5], cache), model(ids[:, 5:12], cache), model(ids[:, 12:], cache)]
    assert_close(torch.cat(chunks, 1), model(ids))


@pytest.mark.parametrize(("name", "model"), MODELS, ids=IDS)
@torch.no_grad()
def test_ragged_batch_equals_rows_alone(name: str, model: Transformer) -> None:
    """Right-padded rows of different lengths: each row's logits and next tokens are its own."""
    lengths = torch.tensor([9, 4, 6])
    ids = torch.randint(0, 256, (3, 9))
    new = torch.randint(0, 256, (3, 1))
    cache = model.make_cache(3, 16)
    batched = model(ids, cache, lengths)
    step = model(new, cache)  # the decode step after a ragged prefill
    assert cache.lengths.tolist() == [10, 5, 7]
    for r, n in enumerate(lengths.tolist()):
        alone = model(torch.cat([ids[r : r + 1, :n], new[r : r + 1]], 1))[0]
        assert_close(batched[r, :n], alone[:n])
        assert_close(step[r, 0], alone[-1])


@pytest.mark.parametrize(("name", "model"), MODELS, ids=IDS)
def test_generation_with_cache_equals_without(name: str, model: Transformer) -> None:
    ids = torch.randint(0, 256, (2, 7))
    with_cache = model.generate(ids, 9)
    without = model.generate(ids, 9, use_cache=False)
    assert with_cache.shape == (2, 16)
    assert torch.equal(with_cache[:, :7], ids)
    assert_same_greedy(with_cache, without, model, 7)  # cached and uncached round differently


@pytest.mark.parametrize(("name", "model"), MODELS[:1] + MODELS[-3:], ids=IDS[:1] + IDS[-3:])
def test_ragged_generation_equals_rows_alone(name: str, model: Transformer) -> None:
    ids = torch.randint(1, 256, (2, 8))
    lengths = torch.tensor([8, 3])
    out = model.generate(ids, 5, prompt_lengths=lengths)
    for r, n in enumerate(lengths.tolist()):
        alone = model.generate(ids[r : r + 1, :n], 5)
        assert_same_greedy(out[r : r + 1, : n + 5], alone, model, n)
        assert (out[r, n + 5 :] == 0).all()


def test_sampling_is_seeded_and_top_p_restricts() -> None:
    model = MODELS[0][1]
    ids = torch.randint(0, 256, (1, 4))

    def run(seed: int, **kw: float) -> torch.Tensor:
        return model.generate(ids, 12, temperature=1.0, generator=torch.Generator().manual_seed(seed), **kw)

    assert torch.equal(run(1), run(1))
    assert not torch.equal(run(1), run(2))
    # top_p tiny keeps only the most likely token: the same as greedy.
    assert torch.equal(run(3, top_p=1e-6), model.generate(ids, 12))


def test_eos_stops_a_row() -> None:
    model, pad, n = MODELS[0][1], 0, 8
    ids = torch.randint(1, 256, (2, 4))
    new = model.generate(ids, n)[:, 4:].tolist()  # without EOS
    # EOS: a token row 0 generates at step k that it did not generate before (the row would stop
    # at that earlier step instead; random tiny models repeat themselves) and row 1 never
    # generates (row 1 must run on to the end); k < n - 1 leaves padding to check.
    k = next((i for i in range(1, n - 1)
              if new[0][i] not in new[0][:i] and new[0][i] not in new[1] and new[0][i] != pad), None)
    assert k is not None, f"no usable EOS in the greedy generations {new}: change the prompt"
    out = model.generate(ids, n, eos_token_id=new[0][k], pad_token_id=pad)
    assert out[0, 4:].tolist() == new[0][: k + 1] + [pad] * (n - 1 - k)  # up to EOS, then padding
    assert out[1, 4:].tolist() == new[1]  # the other row is not stopped


EXPECTED_VALUES_PER_TOKEN_PER_LAYER = {
    # GQA: 2 * n_kv_heads * head_dim; naive MLA: H * (d_qk + d_v); latent MLA: d_c + d_r.
    "tiny-mha": 2 * 4 * 16,
    "tiny-gqa": 2 * 2 * 16,
    "tiny-mqa": 2 * 1 * 16,
    "tiny-mla/naive": 4 * (24 + 16),
    "tiny-mla/absorb": 32 + 8,
    "tiny-mla/auto": 32 + 8,
}


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize(("name", "values"), EXPECTED_VALUES_PER_TOKEN_PER_LAYER.items())
def test_allocated_cache_bytes_equal_formula(name: str, values: int, dtype: torch.dtype) -> None:
    model = dict(MODELS)[name]
    cache = model.make_cache(3, 50, dtype=dtype)
    per_value = torch.empty(0, dtype=dtype).element_size()
    assert cache.bytes_per_token_per_layer == values * per_value
    assert cache.nbytes == values * per_value * 3 * 50 * model.config.n_layers


@pytest.mark.parametrize(("model_dtype", "cache_dtype"), [(torch.float32, torch.bfloat16),
                                                          (torch.bfloat16, torch.float32)])
@pytest.mark.parametrize("name", ["tiny-gqa", "tiny-mla/naive", "tiny-mla/absorb", "tiny-mla/auto"])
@torch.no_grad()
def test_cache_in_another_dtype(name: str, model_dtype: torch.dtype, cache_dtype: torch.dtype) -> None:
    """What a cache holds is read back in the compute dtype: prefill then greedy decode with a
    cache of another dtype gives the logits of a cache in the model's own (to bf16 rounding)."""
    model = copy.deepcopy(dict(MODELS)[name]).to(model_dtype)
    own, other = model.make_cache(2, 16), model.make_cache(2, 16, dtype=cache_dtype)
    assert other[0].buffers[0].dtype == cache_dtype
    x = torch.randint(0, 256, (2, 7))
    for _ in range(6):  # the prefill, then decode steps fed the same greedy tokens
        want, got = model(x, own)[:, -1], model(x, other)[:, -1]
        assert got.dtype == model_dtype
        assert_close(got, want, dtype=torch.bfloat16)
        x = want.argmax(-1, keepdim=True)


@pytest.mark.parametrize(("name", "model"), [MODELS[0], MODELS[-1]], ids=[IDS[0], IDS[-1]])
@torch.no_grad()
def test_cache_overflow_raises_and_reset_reuses_memory(name: str, model: Transformer) -> None:
    cache = model.make_cache(1, 8)
    ids = torch.randint(0, 256, (1, 6))
    first = model(ids, cache)
    with pytest.raises(CacheOverflowError, match="would hold 9 tokens but the cache was allocated for 8"):
        model(torch.randint(0, 256, (1, 3)), cache)
    assert cache.lengths.tolist() == [6]  # the failed write changed nothing
    ptr = cache[0].buffers[0].data_ptr()
    cache.reset()
    assert cache.lengths.tolist() == [0]
    assert_close(model(ids, cache), first)
    assert cache[0].buffers[0].data_ptr() == ptr


def test_prompt_longer_than_context_is_rejected() -> None:
    model = MODELS[0][1]
    too_long = torch.zeros(1, model.config.max_seq_len - 2, dtype=torch.long)
    with pytest.raises(LatentAttnError, match="exceeds the model's context of 512 tokens"):
        model.generate(too_long, 5)


def test_training_step_reduces_loss_for_every_variant() -> None:
    """Backward works through every form (absorbed included) and the loss goes down."""
    ids = torch.randint(0, 256, (4, 33))
    for name, model in MODELS:
        m = Transformer(model.config).train()
        opt = torch.optim.AdamW(m.parameters(), lr=3e-3)
        losses = []
        for _ in range(8):
            logits = m(ids[:, :-1])
            loss = torch.nn.functional.cross_entropy(logits.flatten(0, 1), ids[:, 1:].flatten())
            opt.zero_grad()
            loss.backward()
            opt.step()
            losses.append(loss.item())
        assert losses[-1] < losses[0] - 0.5, (name, losses)


def test_moe_training_gives_every_expert_a_gradient() -> None:
    """In training an expert no token chose still runs (on zero rows) and gets a zero gradient,
    not None: DDP/FSDP2 ranks must reduce the same gradients whatever their tokens chose
    (``latentattn.model.ffn.MoE``). The output is the one inference computes, which skips it."""
    from latentattn.model.ffn import MoE

    model = Transformer(get_preset("tiny-mla-moe")).train()
    moe = model.blocks[1].mlp
    assert isinstance(moe, MoE)
    ids = torch.randint(0, 256, (1, 2))  # 2 tokens x 2 experts: at least 4 of the 8 unchosen
    logits = model(ids)
    logits.square().sum().backward()
    load = moe.gate.tokens_per_expert
    assert load is not None and int(load.sum()) == 4 and int((load == 0).sum()) >= 4
    for e, expert in enumerate(moe.experts):
        grads = [p.grad for p in expert.parameters()]
        assert all(g is not None for g in grads), e
        assert all(bool((g == 0).all()) == (int(load[e]) == 0) for g in grads if g is not None), e
    with torch.no_grad():
        assert torch.equal(model.eval()(ids), logits.detach())
