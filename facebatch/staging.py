"""Host -> device transfers as few, large, asynchronous copies.

On CUDA a copy from pageable host memory (``torch.as_tensor(numpy_array, device="cuda")``)
waits for the stream: the host stops until every kernel queued before it has run. A loop of
small uploads (index tables, bins, image after image) therefore leaves the GPU idle between
them and the host idle while the GPU works. :class:`Upload` packs any number of host arrays
(any dtypes and shapes, images included) into one pinned buffer and sends it with one
non-blocking copy; the device tensors it returns are views of the one device buffer. The
caching host allocator keeps the pinned block for reuse and does not hand it out again before
the copy has finished, so the host may go on and fill the next one.

The same code runs on the CPU (no pinning; the "upload" is the packed buffer itself), so the
tests exercise every step but the copy; ``uploads`` counters let them check that the number of
transfers per batch does not grow with the batch.
"""

from __future__ import annotations

import threading
from typing import Sequence

import numpy as np
import torch

# Slots start on this boundary, so every slot can be viewed as any dtype up to 16 bytes.
_ALIGN = 16
#: Transfers at least this big (a batch's images) go through one grow-only page-locked buffer
#: per device, registered with cudaHostRegister, instead of torch's caching host allocator,
#: which rounds every pinned block up to a power of two and keeps it (a 2.3 GB batch would pin
#: 4 GiB for the actor's life).
LARGE_TRANSFER_BYTES = 64 << 20
_ARENA_STEP = 64 << 20


class _PinnedArena:
    """One reusable page-locked host buffer for a device's large transfers. Before it is
    refilled, the previous copy out of it must have finished (an event recorded after the copy;
    by the next batch it has long finished, so the wait is free). Where the registration fails
    the buffer stays pageable: the copy is then synchronous, still one per batch."""

    def __init__(self):
        self.array: np.ndarray | None = None
        self.pinned = False
        self.copied = None  # torch.cuda.Event of the last copy out of the buffer
        self.lock = threading.Lock()

    def take(self, nbytes: int) -> torch.Tensor:
        if self.copied is not None:
            self.copied.synchronize()
            self.copied = None
        if self.array is None or self.array.nbytes < nbytes:
            self._release()
            self.array = np.empty(-(-nbytes // _ARENA_STEP) * _ARENA_STEP, np.uint8)
            try:
                torch.cuda.check_error(torch.cuda.cudart().cudaHostRegister(self.array.ctypes.data, self.array.nbytes, 0))
                self.pinned = True
            except Exception:  # no page-locking allowed (ulimit -l, containers): pageable copies
                self.pinned = False
        return torch.from_numpy(self.array[:nbytes])

    def copied_on(self, device: torch.device) -> None:
        self.copied = torch.cuda.Event()
        self.copied.record(torch.cuda.current_stream(device))

    def _release(self) -> None:
        if self.array is not None and self.pinned:
            torch.cuda.cudart().cudaHostUnregister(self.array.ctypes.data)
        self.array, self.pinned = None, False


_ARENAS: dict[torch.device, _PinnedArena] = {}
_ARENAS_LOCK = threading.Lock()


def _arena(device: torch.device) -> _PinnedArena:
    with _ARENAS_LOCK:
        return _ARENAS.setdefault(device, _PinnedArena())


class UploadCounter:
    """Counts host -> device transfers (one per :meth:`Upload.send`)."""

    def __init__(self):
        self.count = 0


#: Every transfer of this process (benchmarks and tests read it around a call).
TRANSFERS = UploadCounter()


class Upload:
    """Collects host arrays with :meth:`add`; :meth:`send` moves them all in one copy."""

    def __init__(self, device: torch.device, counter: UploadCounter | None = None):
        self.device = torch.device(device)
        self.counter = counter
        self._slots: list[tuple[int, np.ndarray]] = []
        self._nbytes = 0

    def add(self, array) -> int:
        """Queue a host array (any strides; it is read once, in send). Returns its slot."""
        array = np.asarray(array)
        offset = -(-self._nbytes // _ALIGN) * _ALIGN
        self._slots.append((offset, array))
        self._nbytes = offset + array.nbytes
        return len(self._slots) - 1

    def send(self) -> list[torch.Tensor]:
        """Device tensors of the queued arrays, in slot order (one transfer for all of them)."""
        if not self._slots:
            return []
        cuda = self.device.type == "cuda"
        nbytes = max(self._nbytes, 1)
        arena = _arena(self.device) if cuda and nbytes >= LARGE_TRANSFER_BYTES else None
        if arena is not None:
            arena.lock.acquire()
        try:
            host = arena.take(nbytes) if arena is not None else torch.empty(nbytes, dtype=torch.uint8, pin_memory=cuda)
            host_bytes = host.numpy()
            for offset, array in self._slots:
                if array.nbytes:
                    np.copyto(host_bytes[offset : offset + array.nbytes].view(array.dtype).reshape(array.shape), array)
            pinned = arena.pinned if arena is not None else cuda
            device_bytes = host.to(self.device, non_blocking=pinned) if cuda else host
            if arena is not None:
                arena.copied_on(self.device)
        finally:
            if arena is not None:
                arena.lock.release()
        TRANSFERS.count += 1
        if self.counter is not None:
            self.counter.count += 1
        out = []
        for offset, array in self._slots:
            flat = device_bytes[offset : offset + array.nbytes].view(torch.from_numpy(np.zeros(0, array.dtype)).dtype)
            out.append(flat.view(array.shape))
        self._slots = []
        self._nbytes = 0
        return out


def upload_all(arrays: Sequence, device: torch.device, counter: UploadCounter | None = None) -> list[torch.Tensor]:
    """``arrays`` on ``device`` in one transfer (see :class:`Upload`)."""
    upload = Upload(device, counter)
    for array in arrays:
        upload.add(array)
    return upload.send()
