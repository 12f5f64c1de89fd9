"""A child for signal tests: logs, says ``ready <steps>``, then waits for the parent's signal.

Usage: ``signals.py <store> <hosting> <handler> [--no-steplog]``

* hosting: ``with`` (sync context), ``bare`` (``start_run()`` without a context),
  ``asyncio`` / ``trio`` (``async with`` in that event loop), ``interrupt`` (raise
  KeyboardInterrupt inside ``with``), ``error`` (raise RuntimeError inside ``with``).
* handler: ``default``; ``exit42`` (a user handler, installed before steplog, that
  prints and calls ``sys.exit(42)``); ``flag`` (a user handler that only sets a flag: the
  loop then logs one more step and ends normally); ``ignore`` (SIGTERM and SIGINT set to
  SIG_IGN before steplog).

With ``flush_interval=60`` nothing is written between the first write and the signal,
so what the parent finds on disk was written by the signal handling. After ``ready``
the child waits on stdin: a line ``go`` makes it log one more step and finish normally.
"""

from __future__ import annotations

import signal
import sys
import threading
import time
from typing import Any

STEPS = 50
stop = False


def install_user_handler(kind: str) -> None:
    if kind == "exit42":

        def handler(signum: int, frame: object) -> None:
            print("user handler", flush=True)
            sys.exit(42)

        signal.signal(signal.SIGTERM, handler)
    elif kind == "flag":

        def flag(signum: int, frame: object) -> None:
            global stop
            stop = True

        signal.signal(signal.SIGTERM, flag)
    elif kind == "ignore":
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
        signal.signal(signal.SIGINT, signal.SIG_IGN)


def log_steps(run: object, start: int, stop_at: int) -> None:
    for step in range(start, stop_at):
        run.log_metric("loss", step / 10, step=step)  # type: ignore[attr-defined]
        run.log_metric("acc/top1", 1 - step / 100, step=step)  # type: ignore[attr-defined]


def wait_for_parent() -> None:
    print(f"ready {STEPS}", flush=True)
    while not stop:
        line = sys.stdin.readline()
        if line.strip() == "go":
            break
        if not line:  # the parent closed stdin: only the signal (or a flag it sets) ends the wait
            while not stop:
                time.sleep(0.01)


def main() -> None:
    store, hosting, handler = sys.argv[1:4]
    use_steplog = "--no-steplog" not in sys.argv
    install_user_handler(handler)
    if not use_steplog:
        wait_for_parent()
        return
    import steplog

    options: dict[str, Any] = {"tracking_uri": store, "flush_interval": 60.0, "run_name": "sig"}
    if hosting in ("with", "interrupt", "error"):
        with steplog.start_run("signals", **options) as run:
            log_steps(run, 0, STEPS)
            if hosting == "interrupt":
                raise KeyboardInterrupt
            if hosting == "error":
                raise RuntimeError("boom")
            wait_for_parent()
            log_steps(run, STEPS, STEPS + 1)
    elif hosting == "bare":
        run = steplog.start_run("signals", **options)
        log_steps(run, 0, STEPS)
        wait_for_parent()
        log_steps(run, STEPS, STEPS + 1)
    else:
        import anyio

        async def amain() -> None:
            async with steplog.start_run("signals", **options) as run:
                log_steps(run, 0, STEPS)
                # wait on a daemon thread, polled from the loop, so the loop stays free to take the signal
                waiter = threading.Thread(target=wait_for_parent, daemon=True)
                waiter.start()
                while waiter.is_alive():  # noqa: ASYNC110 - the waiter is a thread, no event to await
                    await anyio.sleep(0.01)
                log_steps(run, STEPS, STEPS + 1)

        anyio.run(amain, backend=hosting)
    time.sleep(0)


if __name__ == "__main__":
    main()
