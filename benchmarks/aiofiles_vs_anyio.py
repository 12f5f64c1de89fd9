"""Why the writer uses anyio's worker threads and not aiofiles: the writer's file work per cycle, measured.

Each writer cycle appends a batch of lines to each metric file it drained (20 keys per step in
the suite's workloads). This script does that same work, ``--files`` metric files (20) with
``--lines`` lines each (10), for ``--cycles`` cycles (100), in one event loop, and times it
several ways, interleaved round by round in one process (the order rotates each round):

* **anyio, one hop per cycle**: the steplog way. One ``anyio.to_thread.run_sync`` per cycle
  runs every append (``os.write`` on descriptors kept open) in a worker thread; on asyncio
  and on trio.
* **aiofiles, files kept open**: ``await f.write(data)`` per file (unbuffered, so each write
  reaches the OS as steplog's do); every call is one hop to the loop's executor. asyncio only:
  aiofiles has no trio support.
* **aiofiles, open/write/close per file**: ``async with aiofiles.open(path, "ab") as f:
  await f.write(data)``, three executor hops per file; against **anyio, one hop per cycle,
  open/append/close per file**, the same work in one hop.
* **trio.wrap_file, files kept open**: trio's own async file objects, one hop per call
  (trio's counterpart of aiofiles).
* **direct (blocks the loop)**: every ``os.write`` in the event loop's thread, the floor of
  what the appends cost; an async writer must not do this.

Per cycle it reports the wall time, the CPU time of the whole process (every thread) and of
the event loop's own thread (the time the loop cannot spend on the caller's tasks), and the
hops to a worker thread: counted at ``loop.run_in_executor`` for aiofiles (so they are
measured, not assumed), and the code's own count for the others.

aiofiles is not a dependency of steplog: without it the script says so and exits 0, so
``make bench`` never breaks on it. Run it in a private environment::

    python3 -m venv /tmp/v && /tmp/v/bin/pip install aiofiles anyio trio orjson
    /tmp/v/bin/python benchmarks/aiofiles_vs_anyio.py [--quick | --smoke] [--out DIR]
"""

from __future__ import annotations

import argparse
import asyncio
import functools
import os
import sys
import tempfile
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

import _common as c

NAME = "aiofiles_vs_anyio"
TITLE = "The writer's file work per cycle: anyio worker threads (one hop per cycle) vs aiofiles (one hop per call)"
WARMUP = 5
"""Untimed cycles first in each run, so worker threads and executors exist before the clock starts."""


def _batch(lines: int, file_index: int) -> bytes:
    """One file's lines for a cycle, formatted as an mlruns metric line (timestamp, value, step)."""
    return b"".join(b"%d %r %d\n" % (1_764_000_000_000 + i, 0.1 * i + file_index, i) for i in range(lines))


def _open_all(paths: list[Path]) -> list[int]:
    return [os.open(p, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644) for p in paths]


def _write_all(fds: list[int], data: list[bytes]) -> None:
    for fd, chunk in zip(fds, data, strict=True):
        os.write(fd, chunk)


def _append_all(paths: list[Path], data: list[bytes]) -> None:
    for path, chunk in zip(paths, data, strict=True):
        with open(path, "ab") as f:
            f.write(chunk)


class Work:
    """The files of one run and each file's batch; ``hops`` counts the hops to a worker thread."""

    def __init__(self, folder: Path, files: int, lines: int) -> None:
        self.paths = [folder / f"m{i:02d}" for i in range(files)]
        self.data = [_batch(lines, i) for i in range(len(self.paths))]
        self.hops = 0


# Each contender: (name, backend, setup, cycle, teardown). setup returns the state a cycle uses.
Setup = Callable[[Work], Awaitable[Any]]
Cycle = Callable[[Work, Any], Awaitable[None]]


async def _fds(work: Work) -> list[int]:
    return _open_all(work.paths)


async def _close_fds(work: Work, fds: list[int]) -> None:
    for fd in fds:
        os.close(fd)


async def _anyio_one_hop(work: Work, fds: list[int]) -> None:
    import anyio

    work.hops += 1
    await anyio.to_thread.run_sync(_write_all, fds, work.data)


async def _anyio_one_hop_reopen(work: Work, _state: None) -> None:
    import anyio

    work.hops += 1
    await anyio.to_thread.run_sync(_append_all, work.paths, work.data)


async def _direct(work: Work, fds: list[int]) -> None:
    _write_all(fds, work.data)  # blocks the loop: the floor, not a way to write


async def _aiofiles_open_all(work: Work) -> list[Any]:
    import aiofiles

    return [await aiofiles.open(p, "ab", buffering=0) for p in work.paths]


async def _aiofiles_kept_open(work: Work, files: list[Any]) -> None:
    for f, chunk in zip(files, work.data, strict=True):
        await f.write(chunk)


async def _aiofiles_close_all(work: Work, files: list[Any]) -> None:
    for f in files:
        await f.close()


async def _aiofiles_reopen(work: Work, _state: None) -> None:
    import aiofiles

    for path, chunk in zip(work.paths, work.data, strict=True):
        async with aiofiles.open(path, "ab") as f:
            await f.write(chunk)


async def _trio_open_all(work: Work) -> list[Any]:
    import trio

    return [trio.wrap_file(open(p, "ab", buffering=0)) for p in work.paths]  # noqa: ASYNC230 (setup, untimed)


async def _trio_kept_open(work: Work, files: list[Any]) -> None:
    for f, chunk in zip(files, work.data, strict=True):
        work.hops += 1
        await f.write(chunk)


async def _trio_close_all(work: Work, files: list[Any]) -> None:
    for f in files:
        await f.aclose()


async def _none(work: Work) -> None:
    return None


async def _nothing(work: Work, state: Any) -> None:
    return None


CONTENDERS: list[tuple[str, str, Setup, Cycle, Callable[[Work, Any], Awaitable[None]]]] = [
    ("anyio, one hop per cycle (asyncio)", "asyncio", _fds, _anyio_one_hop, _close_fds),
    ("anyio, one hop per cycle (trio)", "trio", _fds, _anyio_one_hop, _close_fds),
    ("aiofiles, files kept open (asyncio)", "asyncio", _aiofiles_open_all, _aiofiles_kept_open, _aiofiles_close_all),
    ("trio.wrap_file, files kept open (trio)", "trio", _trio_open_all, _trio_kept_open, _trio_close_all),
    (
        "anyio, one hop per cycle, open/append/close per file (asyncio)",
        "asyncio",
        _none,
        _anyio_one_hop_reopen,
        _nothing,
    ),
    ("aiofiles, open/write/close per file (asyncio)", "asyncio", _none, _aiofiles_reopen, _nothing),
    ("direct (blocks the loop; asyncio)", "asyncio", _fds, _direct, _close_fds),
]


async def _timed(
    setup: Setup, cycle: Cycle, teardown: Callable[[Work, Any], Awaitable[None]], work: Work, cycles: int
) -> dict[str, float]:
    counting = "aiofiles" in cycle.__name__
    if counting:  # count aiofiles' executor hops where they happen
        loop = asyncio.get_running_loop()
        original = loop.run_in_executor

        @functools.wraps(original)
        def run_in_executor(*args: Any, **kwargs: Any) -> Any:
            work.hops += 1
            return original(*args, **kwargs)

        loop.run_in_executor = run_in_executor  # type: ignore[method-assign]
    state = await setup(work)
    for _ in range(WARMUP):
        await cycle(work, state)
    work.hops = 0
    t0, cpu0, loop0 = time.perf_counter(), time.process_time(), time.thread_time()
    for _ in range(cycles):
        await cycle(work, state)
    wall, cpu, loop_cpu = time.perf_counter() - t0, time.process_time() - cpu0, time.thread_time() - loop0
    hops = work.hops
    await teardown(work, state)
    return {"wall": wall / cycles, "cpu": cpu / cycles, "loop_cpu": loop_cpu / cycles, "hops": hops / cycles}


def _one(
    contender: tuple[str, str, Setup, Cycle, Any], folder: Path, files: int, lines: int, cycles: int
) -> dict[str, float]:
    import anyio

    _name, backend, setup, cycle, teardown = contender
    folder.mkdir()
    work = Work(folder, files, lines)
    figures: dict[str, float] = anyio.run(_timed, setup, cycle, teardown, work, cycles, backend=backend)
    for path, chunk in zip(work.paths, work.data, strict=True):  # every contender did the whole work
        if path.stat().st_size != (WARMUP + cycles) * len(chunk):
            raise RuntimeError(f"{_name}: {path.name} holds {path.stat().st_size} bytes, not every append")
    return figures


def run(
    mode: str, out: Path | None, *, files: int = 20, lines: int = 10, cycles: int | None = None, chart: bool = False
) -> dict[str, Any] | None:
    try:
        import aiofiles  # noqa: F401
    except ImportError:
        print(
            f"{NAME}: skipped: aiofiles is not installed (it is not a steplog dependency; "
            "pip install aiofiles in a private environment to run this comparison)"
        )
        return None
    contenders = list(CONTENDERS)
    notes = ["aiofiles has no trio support; trio's own counterpart (trio.wrap_file) is measured instead"]
    try:
        import trio  # noqa: F401
    except ImportError:
        contenders = [x for x in contenders if x[1] != "trio"]
        notes.append("trio is not installed: its rows are left out")
    cycles = cycles if cycles is not None else c.pick(mode, 10, 100, 100)
    rounds = c.pick(mode, 1, 5, 9)
    samples: dict[str, list[dict[str, float]]] = {x[0]: [] for x in contenders}
    with tempfile.TemporaryDirectory(prefix="steplog-aiofiles-") as tmp:
        for r in range(rounds):
            for contender in c.rotate(contenders, r):
                folder = Path(tmp) / f"r{r}-{contenders.index(contender)}"
                samples[contender[0]].append(_one(contender, folder, files, lines, cycles))
    rows = []
    for name, backend, *_ in contenders:
        runs = samples[name]
        rows.append(
            {
                "name": name,
                "backend": backend,
                **{k: c.summary([s[k] for s in runs]) for k in ("wall", "cpu", "loop_cpu", "hops")},
            }
        )
    fields = {"files": files, "lines": lines, "cycles": cycles, "rounds": rounds, "rows": rows}
    result = c.result_of(TITLE, mode, fields, targets=[], notes=notes, packages=("anyio", "aiofiles", "trio"))
    return c.report(NAME, result, out, _print, None)


def _print(result: dict[str, Any]) -> None:
    print(
        f"{result['files']} files x {result['lines']} lines per cycle, {result['cycles']} cycles, "
        f"{result['rounds']} interleaved rounds; per cycle, median (min-max) over rounds:"
    )

    def us(s: dict[str, float]) -> str:
        return f"{c.fmt(s['median'] * 1e6)} ({c.fmt(s['min'] * 1e6)}-{c.fmt(s['max'] * 1e6)})"

    rows = [
        (r["name"], c.fmt(r["hops"]["median"]), us(r["wall"]), us(r["cpu"]), us(r["loop_cpu"])) for r in result["rows"]
    ]
    print(c.table(["contender", "hops per cycle", "wall µs", "CPU µs (process)", "CPU µs (loop thread)"], rows))
    c.print_footer(result)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    group = parser.add_mutually_exclusive_group()
    group.add_argument("--quick", action="store_true", help="fewer rounds")
    group.add_argument("--smoke", action="store_true", help="tiny sizes: checks that everything runs")
    parser.add_argument("--out", type=Path, default=None, help="where to write the JSON (default: results/)")
    parser.add_argument("--no-chart", action="store_true", help="accepted for the suite's sake (no chart is drawn)")
    parser.add_argument("--files", type=int, default=20, help="metric files appended to per cycle (default 20)")
    parser.add_argument("--lines", type=int, default=10, help="lines per file per cycle (default 10)")
    parser.add_argument("--cycles", type=int, default=None, help="timed cycles per run (default 100)")
    args = parser.parse_args(argv)
    mode = "smoke" if args.smoke else "quick" if args.quick else "full"
    out = args.out if args.out is not None else c.default_out(mode)
    run(mode, out, files=args.files, lines=args.lines, cycles=args.cycles)
    return 0


if __name__ == "__main__":
    sys.exit(main())
