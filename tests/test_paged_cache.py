"""The paged latent cache: ragged generation over pages equals the contiguous cache's, pages come
from the pool as rows grow and go back on release, an exhausted pool is a clear error, nbytes is
the pool, and the Triton decode kernel reads the pages in place (interpreter)."""

from __future__ import annotations

import pytest
import torch

from latentattn import load
from latentattn.cache.paged import PagedKVCache, PagedLatentKV
from latentattn.errors import CacheOverflowError, ConfigError

PROMPT = torch.randint(0, 256, (3, 11), generator=torch.Generator().manual_seed(0))
LENGTHS = torch.tensor([11, 4, 7])


@pytest.mark.parametrize("page", [4, 16, 64])
def test_ragged_generation_over_pages_equals_contiguous(page: int) -> None:
    model = load("tiny-mla", seed=0)
    want = model.generate(PROMPT, 9, prompt_lengths=LENGTHS)
    got = model.generate(PROMPT, 9, prompt_lengths=LENGTHS, page_size=page)
    torch.testing.assert_close(got, want, rtol=0, atol=0)


def test_pages_come_from_the_pool_and_go_back() -> None:
    model = load("tiny-mla", seed=0)
    cache = model.make_cache(3, 20, page_size=4, num_pages=8)
    assert isinstance(cache, PagedKVCache) and isinstance(cache[0], PagedLatentKV)
    layer = cache[0]
    assert isinstance(layer, PagedLatentKV)
    page_bytes = 4 * (32 + 8) * 4  # 4 tokens x (R 32 + rope 8) x fp32
    assert cache.nbytes == model.config.n_layers * 8 * page_bytes and cache.used_bytes == 0
    model(PROMPT, cache, LENGTHS)  # the forward advances the cache
    assert cache.pool.held == [3, 1, 2] and cache.pool.pages_in_use == 6  # ceil(11/4), 4/4, 7/4
    assert cache.used_bytes == model.config.n_layers * 6 * page_bytes
    cache.release(0)
    assert cache.pool.pages_in_use == 3 and int(cache.lengths[0]) == 0
    assert (cache.pool.table[0] == -1).all()
    model(PROMPT[:, :1], cache)  # one more token per row: row 1 needs a second page
    assert cache.pool.held == [1, 2, 2]
    with pytest.raises(CacheOverflowError, match="page pool is exhausted: all 8 pages"):
        model(PROMPT, cache)  # 11 more tokens per row cannot fit in 8 pages
    with pytest.raises(ConfigError, match="paged latent cache holds dense MLA's latent"):
        load("tiny-gqa").make_cache(1, 8, page_size=4)


def test_the_kernel_reads_the_pages_in_place(monkeypatch: pytest.MonkeyPatch) -> None:
    pytest.importorskip("triton")
    import os

    if os.environ.get("TRITON_INTERPRET") != "1":
        pytest.skip("the kernels on CPU tensors run only in the interpreter (TRITON_INTERPRET=1)")
    from latentattn.kernels import triton_mla
    from latentattn.kernels.backend import use_backend

    tables = []
    launch = triton_mla.launch_decode
    monkeypatch.setattr(triton_mla, "launch_decode",
                        lambda *a: tables.append(a[5] is not None) or launch(*a))
    model = load("tiny-mla", seed=0)
    want = model.generate(PROMPT, 5, prompt_lengths=LENGTHS)
    with use_backend("triton"):
        got = model.generate(PROMPT, 5, prompt_lengths=LENGTHS, page_size=4)
    torch.testing.assert_close(got, want, rtol=0, atol=0)
    assert tables and all(tables)  # every decode step went through the block table
