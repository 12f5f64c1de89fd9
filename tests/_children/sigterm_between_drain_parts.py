"""A child for test_signals: SIGTERM while an asyncio-hosted writer is between two drain parts.

Usage: ``sigterm_between_drain_parts.py <store> <yields>``. Logs 4 keys x 20,000 points, lets the loop run
``yields`` times (the writer wakes and drains its first part), then a training step computes and
SIGTERM arrives during it. Every logged point must be on disk when the process has died.
"""

from __future__ import annotations

import asyncio
import os
import signal
import sys
import time

import steplog


async def main(store: str, yields: int) -> None:
    async with steplog.start_run("sig", tracking_uri=store, flush_interval=60.0, run_name="r") as run:
        for k in range(4):
            for i in range(20_000):
                run.log_metric(f"k{k}", float(i), step=i)
        for _ in range(yields):
            await asyncio.sleep(0)
        time.sleep(0.05)  # noqa: ASYNC251 - a training step's compute, blocking the loop as real compute does
        os.kill(os.getpid(), signal.SIGTERM)  # `kill <pid>` arrives during it
        await asyncio.sleep(30)


if __name__ == "__main__":
    asyncio.run(main(sys.argv[1], int(sys.argv[2])))
