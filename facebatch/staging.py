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

from typing import Sequence

import numpy as np
import torch

# Slots start on this boundary, so every slot can be viewed as any dtype up to 16 bytes.
_ALIGN = 16


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
        host = torch.empty(max(self._nbytes, 1), dtype=torch.uint8, pin_memory=cuda)
        host_bytes = host.numpy()
        for offset, array in self._slots:
            if array.nbytes:
                np.copyto(host_bytes[offset : offset + array.nbytes].view(array.dtype).reshape(array.shape), array)
        device_bytes = host.to(self.device, non_blocking=True) if cuda else host
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
