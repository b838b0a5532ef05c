"""The actor's view of a decoded batch: the pixels of the ok rows, read where Arrow holds them."""

from __future__ import annotations

import numpy as np
import pyarrow as pa

from facebatch.reading import decoded_images
from facebatch.tables import DECODED_SCHEMA


def _rows(images: list[np.ndarray | None]) -> list[dict]:
    rows = []
    for n, im in enumerate(images):
        row = {name: None for name in DECODED_SCHEMA.names}
        row.update(image_id=f"id{n}", uri=f"s3://b/{n}.jpg", status="ok" if im is not None else "corrupt")
        if im is not None:
            row.update(pix_h=im.shape[0], pix_w=im.shape[1], pixels=im.tobytes())
        rows.append(row)
    return rows


def test_pixels_of_a_many_chunk_batch_are_viewed_in_place():
    rng = np.random.default_rng(0)
    images = [rng.integers(0, 256, (h, w, 3), dtype=np.uint8) for h, w in ((5, 7), (3, 4), (6, 2), (2, 9))]
    images.insert(2, None)  # an error row between ok rows
    rows = _rows(images)
    # Ray Data hands actors tables of several chunks (one per block it concatenated).
    table = pa.concat_tables([pa.Table.from_pylist(rows[:2], schema=DECODED_SCHEMA),
                              pa.Table.from_pylist(rows[2:3], schema=DECODED_SCHEMA),
                              pa.Table.from_pylist(rows[3:], schema=DECODED_SCHEMA).slice(0)])
    table = pa.concat_tables([table.slice(0, 4), table.slice(4)])  # a sliced chunk has an offset
    assert table.column("pixels").num_chunks > 1
    ok_idx = np.array([0, 1, 3, 4], np.int64)
    views = decoded_images(table, ok_idx)
    for view, i in zip(views, ok_idx):
        np.testing.assert_array_equal(view, images[i])
    # No copy: every view lies inside one of the column's own buffers.
    buffers = [np.frombuffer(chunk.buffers()[2], np.uint8) for chunk in table.column("pixels").chunks]
    assert all(any(np.shares_memory(view, b) for b in buffers) for view in views)
