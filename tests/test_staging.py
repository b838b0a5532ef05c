"""Host -> device transfers packed into one copy (facebatch.staging), on the CPU."""

from __future__ import annotations

import numpy as np
import torch

from facebatch import staging


def test_one_transfer_carries_arrays_of_any_dtype_shape_and_strides():
    rng = np.random.default_rng(0)
    image = rng.integers(0, 256, (7, 5, 3), dtype=np.uint8)
    arrays = [image[:, ::-1],  # a strided view: read in place, no copy of the caller's first
              np.arange(5, dtype=np.int64), np.zeros(0, np.int64), rng.random((2, 3)).astype(np.float32),
              np.array(3.5), np.array([True, False])]
    counter = staging.UploadCounter()
    before = staging.TRANSFERS.count
    sent = staging.upload_all(arrays, torch.device("cpu"), counter)
    assert counter.count == 1 and staging.TRANSFERS.count == before + 1
    for got, want in zip(sent, arrays):
        assert tuple(got.shape) == want.shape
        np.testing.assert_array_equal(got.numpy(), want)
    assert staging.upload_all([], torch.device("cpu"), counter) == [] and counter.count == 1


def test_large_transfers_reuse_one_grow_only_buffer():
    arena = staging._PinnedArena()
    first = arena.take(1000)
    again = arena.take(500)
    assert again.data_ptr() == first.data_ptr()  # reused, not reallocated
    bigger = arena.take(staging._ARENA_STEP + 1)
    assert bigger.numel() == staging._ARENA_STEP + 1 and arena.array.nbytes == 2 * staging._ARENA_STEP
    assert arena.pinned is torch.cuda.is_available()  # page-locked only where CUDA can register it
