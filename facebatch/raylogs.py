"""Messages Ray prints on every facebatch run that are expected here and read like failures.

A user who sees an error-level line on every run takes it for a failure, and stops reading the
lines that matter. Three are known and harmless for facebatch on Ray 2.60:

- "Token authentication is enabled for this Ray cluster": the local instance facebatch starts is
  token-protected by default (what we want); Ray warns because RAY_AUTH_MODE was not set by hand.
- "Progress bars disabled": facebatch turns Ray Data's bars off when stderr is not a terminal.
- "Actor with class name: 'MapWorker(...)' ... has constructor arguments in the object store and
  max_restarts > 0" (an error-level line from the driver's C++ core worker): Ray Data always
  passes its DataContext and map function to the pool's actors as object references
  (ray-project/ray#57733), whatever the actor's own arguments are. The driver owns and holds those
  objects for the whole run, so a restarted actor finds them unless the driver's node is lost,
  and then the run is lost anyway. (Our own constructor arguments are a few small values.)

The first two are Python log records and get a logging filter. The third is written by C++
straight to file descriptor 2, so while a run executes, fd 2 goes through a pipe that drops that
one line and passes everything else on unchanged. Nothing else is hidden.
"""

from __future__ import annotations

import logging
import os
import sys
import threading

EXPECTED_LOG_MESSAGES = {
    "ray._private.authentication.authentication_token_setup": "Token authentication is enabled for this Ray cluster",
    "ray.data._internal.progress": "Progress bars disabled.",
}
EXPECTED_STDERR_LINES = (b"has constructor arguments in the object store and max_restarts > 0",)


class _DropMessage(logging.Filter):
    def __init__(self, prefix: str):
        super().__init__()
        self.prefix = prefix

    def filter(self, record: logging.LogRecord) -> bool:
        return not record.getMessage().startswith(self.prefix)


def quiet_expected_log_messages() -> None:
    """Filter the expected Python-level Ray warnings (idempotent)."""
    for name, prefix in EXPECTED_LOG_MESSAGES.items():
        logger = logging.getLogger(name)
        if not any(isinstance(f, _DropMessage) and f.prefix == prefix for f in logger.filters):
            logger.addFilter(_DropMessage(prefix))


class StderrLineFilter:
    """Route file descriptor 2 through a pipe that drops lines containing one of ``patterns``.

    Install it after Ray has started its own processes (they must not inherit the pipe); lines
    are passed on as soon as they are complete. ``close()`` restores fd 2 and flushes the rest.
    """

    def __init__(self, patterns: tuple[bytes, ...] = EXPECTED_STDERR_LINES):
        self.patterns = patterns
        self.dropped = 0
        sys.stderr.flush()
        self._saved = os.dup(2)
        read_end, write_end = os.pipe()
        os.dup2(write_end, 2)
        os.close(write_end)
        self._thread = threading.Thread(target=self._pump, args=(read_end,), name="stderr-filter", daemon=True)
        self._thread.start()
        self._closed = False

    def _pump(self, read_end: int) -> None:
        pending = b""
        try:
            while True:
                chunk = os.read(read_end, 65536)
                if not chunk:
                    break
                *lines, pending = (pending + chunk).split(b"\n")
                kept = [line + b"\n" for line in lines if not self._expected(line)]
                if kept:
                    os.write(self._saved, b"".join(kept))
            if pending and not self._expected(pending):
                os.write(self._saved, pending)
        except OSError:
            # The original stderr is gone (a closed terminal): nothing can be shown anyway, but
            # writers to fd 2 must never block on a full pipe, so keep draining it.
            try:
                while os.read(read_end, 65536):
                    pass
            except OSError:
                pass
        finally:
            os.close(read_end)

    def _expected(self, line: bytes) -> bool:
        if any(p in line for p in self.patterns):
            self.dropped += 1
            return True
        return False

    def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        sys.stderr.flush()
        os.dup2(self._saved, 2)  # closes the pipe's write end: the pump reads to the end and stops
        self._thread.join(timeout=5)
        os.close(self._saved)
