"""Device memory budgets, out-of-memory retries and the errors that must end an actor.

Every call the models make on a GPU (P-Net canvases, R-Net/O-Net crop chunks, embedder
batches) is sized from a byte budget, not from constants tuned for one card:

* the budget is ``memory_budget_bytes`` when the caller passes one, else the environment
  variable ``FACEBATCH_GPU_MEMORY_BYTES`` (bytes; ``K``/``M``/``G`` suffixes accepted), else
  on CUDA :data:`DEFAULT_FRACTION` of what the device can still give this process
  (``torch.cuda.mem_get_info`` free bytes plus what torch's caching allocator holds unused),
  measured at the start of each call; on the CPU without an explicit budget there is no limit
  (the CPU paths keep their cache-sized chunks);
* a stage divides the budget by its bytes-per-pixel (P-Net) or bytes-per-crop (R-Net, O-Net,
  embedder) figure, which :func:`peak_tensor_bytes` measures (tests/test_gpumem.py keeps the
  figures above the measurement);
* when the device still runs out of memory (fragmentation, another process, a wrong
  figure), :func:`run_chunked` halves the chunk and runs that call again, logs it and counts
  it (``oom_retries``), down to one item; an out-of-memory error at one item propagates;
* :func:`is_fatal_device_error` says which errors leave the CUDA context unusable (illegal
  memory access, device-side assert, launch failure, ...): those must end the actor, so Ray
  starts a fresh one, instead of failing every later image in a poisoned process.
"""

from __future__ import annotations

import logging
import os
import re
import weakref
from typing import Callable

import torch

log = logging.getLogger("facebatch")

#: Share of the device's free memory one call may plan for (the rest covers allocator
#: fragmentation, cuDNN/cuBLAS workspaces and the other models of the process).
DEFAULT_FRACTION = 0.6
ENV_BUDGET = "FACEBATCH_GPU_MEMORY_BYTES"

_SUFFIXES = {"": 1, "k": 1 << 10, "m": 1 << 20, "g": 1 << 30, "t": 1 << 40}


def parse_bytes(text) -> int:
    """'2G', '512M', '1048576', 3e9 -> bytes (binary suffixes, optional trailing 'B')."""
    if isinstance(text, (int, float)):
        value = int(text)
    else:
        match = re.fullmatch(r"\s*([0-9]+(?:\.[0-9]*)?(?:e[0-9]+)?)\s*([kmgt]?)(?:i?b)?\s*", str(text), re.IGNORECASE)
        if not match:
            raise ValueError(f"not a byte count: {text!r} (use e.g. 8G, 512M or a number of bytes)")
        value = int(float(match.group(1)) * _SUFFIXES[match.group(2).lower()])
    if value <= 0:
        raise ValueError(f"a memory budget must be positive, got {text!r}")
    return value


def explicit_budget(memory_budget_bytes=None) -> int | None:
    """The caller's budget, else FACEBATCH_GPU_MEMORY_BYTES, else None."""
    if memory_budget_bytes is not None:
        return parse_bytes(memory_budget_bytes)
    env = os.environ.get(ENV_BUDGET)
    return parse_bytes(env) if env else None


def device_free_bytes(device: torch.device) -> int:
    """Bytes this process can still allocate on a CUDA device: the driver's free memory plus
    what torch's caching allocator has reserved but not handed out."""
    free, _total = torch.cuda.mem_get_info(device)
    cached = torch.cuda.memory_reserved(device) - torch.cuda.memory_allocated(device)
    return int(free + max(0, cached))


def shared_budget(total_bytes: int, actors_per_gpu: int, fraction: float = DEFAULT_FRACTION) -> int:
    """The fixed budget of one of ``actors_per_gpu`` actors sharing a GPU of ``total_bytes``."""
    return int(total_bytes * fraction / actors_per_gpu)


def call_budget(device: torch.device, explicit: int | None, fraction: float = DEFAULT_FRACTION) -> int | None:
    """Bytes one call may plan for now: the explicit budget, else (CUDA) a fraction of the free
    memory, else None (no limit)."""
    if explicit is not None:
        return explicit
    if device.type == "cuda":
        return int(device_free_bytes(device) * fraction)
    return None


# --------------------------------------------------------------------------- error classes

_OOM_MESSAGES = ("out of memory", "cudaerrormemoryallocation", "cublas_status_alloc_failed",
                 "cudnn_status_alloc_failed")
# Errors after which the CUDA context is (or may be) corrupted: every later call fails too.
_FATAL_MESSAGES = (
    "cuda error",
    "illegal memory access",
    "illegal instruction",
    "misaligned address",
    "device-side assert",
    "unspecified launch failure",
    "launch failure",
    "cudaerror",
    "cublas_status_",
    "cudnn_status_execution_failed",
    "cudnn_status_internal_error",
    "cufft_",
    "cusolver",
    "nvrtc",
    "uncorrectable ecc",
    "nvlink",
    "device not ready",
    "no cuda gpus are available",
    "cuda driver",
    "gpu has fallen off the bus",
)


def is_oom(exc: BaseException) -> bool:
    """An out-of-memory error worth retrying with a smaller call."""
    if isinstance(exc, torch.OutOfMemoryError):
        return True
    if isinstance(exc, (RuntimeError, MemoryError)):
        message = str(exc).lower()
        return any(m in message for m in _OOM_MESSAGES)
    return False


def is_fatal_device_error(exc: BaseException) -> bool:
    """An error that leaves the device unusable for this process: re-raise it, so that the
    actor dies and Ray restarts it. Out-of-memory is not one of them (it is retried)."""
    if is_oom(exc):
        return False
    accelerator_error = getattr(torch, "AcceleratorError", None)
    if accelerator_error is not None and isinstance(exc, accelerator_error):
        return True
    if isinstance(exc, RuntimeError):
        message = str(exc).lower()
        return any(m in message for m in _FATAL_MESSAGES)
    return False


def release_cached(device: torch.device) -> None:
    """Give cached blocks back after an out-of-memory error so the retry sees them."""
    if device.type == "cuda":
        torch.cuda.empty_cache()


# --------------------------------------------------------------------------- chunked calls


class OomCounter:
    """How often calls were halved after an out-of-memory error (cumulative)."""

    def __init__(self):
        self.retries = 0


def run_chunked(fn: Callable[[int, int], object], n: int, chunk: int, *, counter: OomCounter,
                device: torch.device, what: str, on_call: Callable[[], None] | None = None) -> list:
    """fn(start, stop) over [0, n) in chunks of at most `chunk`; returns the outputs in order.

    On out-of-memory the failing call is retried with half the chunk (and every later call
    keeps the smaller size); logged, counted in `counter`. At chunk 1 the error propagates."""
    outputs = []
    chunk = max(1, int(chunk))
    start = 0
    while start < n:
        stop = min(n, start + chunk)
        try:
            out = fn(start, stop)
        except Exception as exc:
            if not is_oom(exc) or stop - start <= 1:
                raise
            new_chunk = max(1, (stop - start) // 2)
            counter.retries += 1
            log.warning("%s: out of memory on %d items; retrying in calls of %d (%s)", what, stop - start,
                        new_chunk, str(exc).splitlines()[0][:200])
            del exc
            release_cached(device)
            chunk = new_chunk
            continue
        if on_call is not None:
            on_call()
        outputs.append(out)
        start = stop
    return outputs


# --------------------------------------------------------------------------- measurement


def peak_tensor_bytes(fn: Callable[[], object]) -> tuple[object, int]:
    """(fn(), peak bytes of tensor storage alive at once that fn allocated).

    Works on any device (a dispatch mode sees every op's outputs, weak references see them
    die), so the per-pixel and per-crop figures can be measured on the CPU; it does not see
    library workspaces (cuDNN, oneDNN scratch), which the budget's fraction leaves room for.
    On CUDA, torch.cuda.max_memory_allocated is the direct measurement."""
    from torch.utils._python_dispatch import TorchDispatchMode

    live: dict[int, list] = {}  # storage data_ptr -> [nbytes, tensors alive]
    state = {"now": 0, "peak": 0}

    def release(ptr: int) -> None:
        entry = live.get(ptr)
        if entry is None:
            return
        entry[1] -= 1
        if entry[1] == 0:
            state["now"] -= entry[0]
            del live[ptr]

    class Tracker(TorchDispatchMode):
        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            out = func(*args, **(kwargs or {}))
            tensors = out if isinstance(out, (tuple, list)) else (out,)
            for t in tensors:
                if not isinstance(t, torch.Tensor):
                    continue
                try:
                    storage = t.untyped_storage()
                    ptr, nbytes = storage.data_ptr(), storage.nbytes()
                except (RuntimeError, NotImplementedError):
                    continue
                if ptr == 0:
                    continue
                entry = live.get(ptr)
                if entry is None:
                    live[ptr] = [nbytes, 1]
                    state["now"] += nbytes
                    state["peak"] = max(state["peak"], state["now"])
                else:
                    entry[1] += 1
                weakref.finalize(t, release, ptr)
            return out

    with Tracker():
        result = fn()
    return result, state["peak"]
