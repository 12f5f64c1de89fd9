"""Sinks for fault injection at the Sink seam, shared by the writer and backpressure tests."""

from __future__ import annotations

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
