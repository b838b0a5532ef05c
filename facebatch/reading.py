"""Reading: fetch a batch of objects and decode them, the body of the Ray read task.

Plain Python (no Ray): `fetch_and_decode` runs as a Ray Data task on CPU workers when the actors
hold GPUs, or inside the inference actors on CPU-only clusters (pipeline.py decides). Every object
yields one row of tables.DECODED_SCHEMA, whatever happens to it: `ok` with its pixels, or an
error status with a readable message (a bad photo never stops a run).
"""

from __future__ import annotations

import os
import time
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pyarrow as pa

from . import storage
from .tables import DECODED_SCHEMA

# Objects larger than this are not fetched at all (a 1 GiB "photo" is not one we can decode anyway).
MAX_OBJECT_BYTES = 1 << 30


def _decode_or_error(data: bytes, max_pixels: int, max_side: int | None):
    """(the decoded image, None, None), or (None, status, message) for a file the CPU decoder
    refuses: a bad photo costs its own row, never the run."""
    from .decode import DecodeError, decode_image

    try:
        return decode_image(data, max_pixels=max_pixels, max_side=max_side), None, None
    except DecodeError as exc:
        return None, exc.status, exc.message
    except Exception as exc:  # a decoder bug must cost one row, never the run
        return None, "corrupt", f"decoder failed: {type(exc).__name__}: {exc}"


def _decode_one(row: dict, data: bytes | None, fetch_error: str | None, max_pixels: int, max_side: int,
                jpeg_passthrough: bool = False) -> dict:
    from .decode import plan_jpeg

    out = {k: row.get(k) for k in ("image_id", "uri", "etag")}
    out.update(size_bytes=row.get("size"), width=None, height=None, format=None, error=None, scale=None,
               pix_h=None, pix_w=None, pixels=None, encoded=None, decode_s=0.0)
    if fetch_error is not None:
        out.update(status="fetch_failed", error=fetch_error)
        return out
    out["size_bytes"] = len(data)
    t0 = time.perf_counter()
    try:
        plan = plan_jpeg(data, max_pixels=max_pixels, max_side=max_side) if jpeg_passthrough else None
    except Exception:  # a header the plan cannot read: the CPU decoder below classifies the file
        plan = None
    if plan is not None:
        # The actor decodes it on its GPU (facebatch.device_jpeg); only the header was read here.
        out.update(status="ok", width=plan.width, height=plan.height, format="JPEG", encoded=data,
                   decode_s=time.perf_counter() - t0)
        return out
    img, status, message = _decode_or_error(data, max_pixels, max_side)
    if img is None:
        out.update(status=status, error=message)
    else:
        rgb = np.ascontiguousarray(img.rgb)
        out.update(status="ok", width=img.width, height=img.height, format=img.format, scale=float(img.scale),
                   pix_h=rgb.shape[0], pix_w=rgb.shape[1], pixels=rgb.tobytes())
    out["decode_s"] = time.perf_counter() - t0
    return out


def die_once(variable: str) -> None:
    """Fault-tolerance tests: the first worker to pass here exits hard (as on OOM-kill or a lost node).

    The variable names a marker file; whoever creates it first dies, later calls run normally.
    """
    marker = os.environ.get(variable)
    if not marker:
        return
    try:
        fd = os.open(marker, os.O_CREAT | os.O_EXCL | os.O_WRONLY)
    except FileExistsError:
        return
    os.close(fd)
    os._exit(1)


def fetch_and_decode(batch: pa.Table, *, retries: int, endpoint: str | None, max_pixels: int, max_side: int,
                     jpeg_passthrough: bool = False) -> pa.Table:
    """Ray Data task: fetch a batch of objects concurrently (IO-bound), decode them one by one
    (with ``jpeg_passthrough``, the JPEGs nvJPEG can take are passed on undecoded)."""
    die_once("FACEBATCH_FAULT_KILL_READ_TASK_ONCE")
    rows = batch.to_pylist()

    def fetch(row: dict) -> tuple[bytes | None, str | None, float]:
        t0 = time.perf_counter()
        size = row.get("size")
        if size is not None and size > MAX_OBJECT_BYTES:
            return None, f"object is {size:,} bytes, above the {MAX_OBJECT_BYTES:,}-byte fetch limit", 0.0
        try:
            data = storage.fetch_bytes(row["uri"], retries=retries, endpoint=endpoint)
            return data, None, time.perf_counter() - t0
        except storage.FetchError as exc:
            return None, str(exc), time.perf_counter() - t0
        except Exception as exc:  # unexpected client errors still become a row
            return None, f"{type(exc).__name__}: {exc}", time.perf_counter() - t0

    with ThreadPoolExecutor(max_workers=min(16, max(1, len(rows)))) as pool:
        fetched = list(pool.map(fetch, rows))
    out_rows = []
    for row, (data, error, fetch_s) in zip(rows, fetched):
        decoded = _decode_one(row, data, error, max_pixels, max_side, jpeg_passthrough)
        decoded["fetch_s"] = fetch_s
        out_rows.append(decoded)
    return pa.Table.from_pylist(out_rows, schema=DECODED_SCHEMA)


def decoded_images(batch: pa.Table, ok_idx: np.ndarray) -> list[np.ndarray]:
    """Zero-copy views of the decoded pixels of the ok rows, chunk by chunk (combining the
    column's chunks would copy the whole batch's pixels once more)."""
    pixels = batch.column("pixels")
    hs = batch.column("pix_h").to_numpy(zero_copy_only=False)
    ws = batch.column("pix_w").to_numpy(zero_copy_only=False)
    starts = np.cumsum([0] + [len(chunk) for chunk in pixels.chunks])
    buffers: dict[int, tuple[np.ndarray, np.ndarray]] = {}
    views: list[np.ndarray] = []
    for i in ok_idx:
        k = int(np.searchsorted(starts, i, side="right")) - 1
        if k not in buffers:
            chunk = pixels.chunks[k]
            offsets = np.frombuffer(chunk.buffers()[1], dtype=np.int64)[chunk.offset : chunk.offset + len(chunk) + 1]
            data = chunk.buffers()[2]
            buffers[k] = offsets, (np.frombuffer(data, dtype=np.uint8) if data is not None else np.zeros(0, np.uint8))
        offsets, data = buffers[k]
        j = int(i - starts[k])
        views.append(data[offsets[j] : offsets[j + 1]].reshape(int(hs[i]), int(ws[i]), 3))
    return views


def batch_images(batch: pa.Table, status: list, errors: list, *, max_pixels: int, max_side: int | None,
                 device_decoder=None) -> tuple[np.ndarray, list, list[float], list[int]]:
    """The images of a decoded batch's ok rows, for the models: decoded pixels viewed in place,
    and the JPEG files passed on undecoded (``encoded``) decoded here, on the GPU by
    ``device_decoder`` (facebatch.device_jpeg.DeviceJpegDecoder) and, where it gives None or
    there is none, by the CPU decoder, which also classifies a bad file.

    Returns (ok row indices, images, scales, rows that failed here); ``status`` and ``errors``
    are updated in place for the rows that failed."""
    n = batch.num_rows
    encoded = batch.column("encoded").to_pylist()
    in_place = [i for i in range(n) if status[i] == "ok" and encoded[i] is None]
    passed_on = [i for i in range(n) if status[i] == "ok" and encoded[i] is not None]
    scale_column = batch.column("scale").to_pylist()
    images = dict(zip(in_place, decoded_images(batch, np.array(in_place, np.int64))))
    scales = {i: float(scale_column[i]) for i in in_place}
    failed: list[int] = []
    if passed_on:
        files = [encoded[i] for i in passed_on]
        on_device = device_decoder.decode(files) if device_decoder is not None else [None] * len(files)
        widths = batch.column("width").to_pylist()
        for i, data, image in zip(passed_on, files, on_device):
            if image is None:
                decoded, bad_status, message = _decode_or_error(data, max_pixels, max_side)
                if decoded is None:
                    status[i], errors[i] = bad_status, message
                    failed.append(i)
                    continue
                image = decoded.rgb
            images[i] = image
            scales[i] = widths[i] / int(image.shape[1])
    ok_idx = np.array(sorted(images), np.int64)
    return ok_idx, [images[i] for i in ok_idx], [scales[i] for i in ok_idx], failed
