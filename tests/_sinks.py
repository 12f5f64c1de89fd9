"""Sinks for fault injection at the Sink seam, shared by the writer and backpressure tests."""

from __future__ import annotations

import errno
import os
import threading

import anyio

from steplog.testing import MemorySink
from steplog.typing import Batch

WAIT = 30.0  # generous bound for waits on events (a stuck writer fails the test instead of hanging it)


class GateSink(MemorySink):
    """A MemorySink whose writes wait until the test sets ``gate``; ``entered`` is set when a write starts."""

    def __init__(self) -> None:
        super().__init__()
        self.gate = threading.Event()
        self.entered = threading.Event()

    async def write(self, batch: Batch) -> None:
        self.entered.set()
        await anyio.to_thread.run_sync(self.gate.wait, WAIT, abandon_on_cancel=True)
        self.write_sync(batch)


class FlakySink(MemorySink):
    """A MemorySink whose writes fail with a transient OS error (``code``) while ``failing`` is set."""

    def __init__(self, code: int = errno.ENOSPC) -> None:
        super().__init__()
        self.code = code
        self.failing = True
        self.attempts = 0

    def write_sync(self, batch: Batch) -> None:
        self.attempts += 1
        if self.failing:
            raise OSError(self.code, f"{os.strerror(self.code)} (injected)")
        super().write_sync(batch)
