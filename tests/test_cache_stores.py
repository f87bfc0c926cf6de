"""Caches as compositions of stores: the builder makes one layer cache per attention spec, the
stores say what they hold (fp8, paged) and count what torch allocated, a format round-trips in
either layout, padded tokens are never written, the old class names still build and recognise
caches, and a store of a new shape (a sliding-window ring, as DeepSeek-V4 needs) plugs in as a
layout."""

from __future__ import annotations

import pytest
import torch

from latentattn import load
from latentattn.cache import (
    E4M3,
    DenseSpec,
    FP8LatentKV,
    IndexedLatentKV,
    KVCache,
    LatentKV,
    LatentSpec,
    LayerCache,
    PagedKVCache,
    PagedLatentKV,
    PagePool,
    Pages,
    Plain,
    Record,
    Rows,
    Step,
    TokenStore,
    build_cache,
)
from latentattn.cache.store import Part, step_rows


def test_the_builder_makes_one_layer_cache_per_spec_with_named_stores() -> None:
    specs = [DenseSpec(2, 8, 6), LatentSpec(32, 8), LatentSpec(32, 8, 16, "fp8")]
    cache = build_cache(specs, 3, 10, torch.bfloat16)
    dense, latent, dsa = cache.layers
    assert list(dense.stores) == ["keys", "values"] and dense.keys.buffers[0].shape == (3, 10, 2, 8)
    assert list(latent.stores) == ["latent"] and not latent.latent.fp8 and not latent.latent.paged
    assert list(dsa.stores) == ["latent", "index_keys"] and dsa.index_keys.fp8
    assert cache.nbytes == sum(b.numel() * b.element_size() for layer in cache.layers
                               for b in layer.buffers)
    assert dsa.nbytes == 3 * 10 * ((32 + 8) * 2 + 16 + 4)  # bf16 latent, e4m3 key + one fp32 scale
    with pytest.raises(AttributeError, match="holds latent, index_keys, not 'window'"):
        _ = dsa.window


def test_fp8_and_pages_change_the_latent_only() -> None:
    cache = build_cache([LatentSpec(128, 16)], 2, 12, torch.float32, latent_format="fp8",
                        page_size=4, num_pages=5)
    assert isinstance(cache, PagedKVCache)
    latent = cache[0].latent
    assert latent.fp8 and latent.paged and latent.block_table is cache.pool.table
    assert latent.buffers[0].shape == (5, 4, 128 + 4 + 2 * 16) and latent.buffers[0].dtype == torch.uint8


@pytest.mark.parametrize(("fmt", "width"), [(Plain((6,), torch.float32), 6), (E4M3(128), 128),
                                             (Record(128, 8), 136)], ids=["plain", "e4m3", "record"])
def test_a_format_reads_back_the_same_from_rows_and_from_pages(fmt: Plain | E4M3 | Record,
                                                               width: int) -> None:
    pool = PagePool(6, 3, 2, 9)
    rows, pages = TokenStore(fmt, Rows(2, 9)), TokenStore(fmt, Pages(pool))
    step = PagedKVCache([], pool, 2, 9).step(7, torch.tensor([7, 4]))  # takes 3 + 2 pages
    values = torch.randn(2, 7, width, generator=torch.Generator().manual_seed(0))
    for store in (rows, pages):
        store.write(step, values)
    a, b = rows.read(step, torch.float32), pages.read(step, torch.float32)
    torch.testing.assert_close(b[0], a[0], rtol=0, atol=0)
    torch.testing.assert_close(b[1, :4], a[1, :4], rtol=0, atol=0)  # row 1 holds 4 real tokens
    assert pages.used_bytes == 5 * pages.nbytes // 6 and rows.used_bytes == rows.nbytes


def test_padded_tokens_are_never_written() -> None:
    store = TokenStore(Plain((1,), torch.float32), Rows(2, 4))
    store.buffers[0].fill_(-1)
    positions = torch.tensor([[0, 1, 2], [0, 1, 2]])
    valid = torch.tensor([[True, True, True], [True, False, False]])
    store.write(Step(positions, valid, 3, None), torch.ones(2, 3, 1))
    assert store.buffers[0][..., 0].tolist() == [[1, 1, 1, -1], [1, -1, -1, -1]]


def test_the_old_names_build_and_recognise_caches() -> None:
    assert isinstance(LatentKV(1, 4, 32, 8, torch.float32), LatentKV)
    fp8 = FP8LatentKV(1, 4, 128, 8)
    assert isinstance(fp8, FP8LatentKV) and not isinstance(fp8, IndexedLatentKV)
    model = load("tiny-dsa", seed=0)
    layer = model.make_cache(1, 8, latent_fp8=True)[0]
    assert isinstance(layer, IndexedLatentKV) and isinstance(layer, LatentKV)
    assert isinstance(layer, FP8LatentKV)  # a DSA cache of fp8 records holds fp8 records in rows
    paged = load("tiny-mla", seed=0).make_cache(1, 8, page_size=4)[0]
    assert isinstance(paged, PagedLatentKV) and not isinstance(paged, FP8LatentKV)
    assert not isinstance(model.blocks[0], LatentKV)  # not a cache at all


class Ring:
    """A sliding window of ``window`` tokens per row: token n at slot n % window (the shape of
    DeepSeek-V4's window store), written as a layout so any format can use it."""

    block_table = None

    def __init__(self, batch: int, window: int) -> None:
        self.batch, self.window = batch, window

    def allocate(self, part: Part, device: torch.device | str | None) -> torch.Tensor:
        shape, dtype = part
        return torch.zeros(self.batch, self.window, *shape, dtype=dtype, device=device)

    def put(self, buf: torch.Tensor, step: Step, values: torch.Tensor) -> None:
        rows, positions = step_rows(step)
        buf[rows, positions % self.window] = values if step.valid is None else values[step.valid]

    def take(self, buf: torch.Tensor, step: Step) -> torch.Tensor:
        return buf

    def used_bytes(self, buf: torch.Tensor) -> int:
        return buf.numel() * buf.element_size()


def test_a_new_layout_plugs_into_a_store_and_a_model_cache() -> None:
    fmt = E4M3(128)
    window = TokenStore(fmt, Ring(1, 3))
    cache = KVCache([LayerCache(window=window)], 1, 100)
    values = torch.randn(1, 5, 128, generator=torch.Generator().manual_seed(0))
    for t in range(5):  # five decode steps through a three-token window
        step = cache.step(1)
        cache[0].write(step, values[:, t : t + 1])
        cache.advance(1)
    want = fmt.decode(fmt.encode(values[:, [3, 4, 2]]), None)  # slots 0, 1, 2: tokens 3, 4, 2
    torch.testing.assert_close(window.read(step), want, rtol=0, atol=0)
    assert cache.nbytes == 3 * (128 + 4) and window.fp8 and not window.paged
