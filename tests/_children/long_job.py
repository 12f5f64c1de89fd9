"""A child for the long-job tests: one training process (one rank) that logs, then ends or waits to be killed.

Usage: ``long_job.py <tracking_uri> <experiment> <mode> <first_step> <last_step> <gate_dir> [run_id] [rewind]``

* mode: ``zero`` / ``each`` / ``off`` (``ranks=``), or ``hang`` (one run, ranks off: after logging
  and a flush it prints ``ready <run_id>`` and sleeps until killed).
* Logs ``x`` = step + rank / 100 for every step in ``[first_step, last_step]`` and the param
  ``lr`` = 0.1 (the same value every time, so a resumed run may log it again).
* gate_dir: when not ``-``, the child writes ``ready-<pid>`` there and waits for ``go`` to
  exist, so that the parent starts every rank at the same instant.
* run_id (or ``-``) and rewind (or ``-``) are passed to ``start_run``.

Prints ``run <run_id> writes=<bool> rank=<r> world=<n>`` when done.
"""

from __future__ import annotations

import os
import sys
import time
from pathlib import Path
from typing import Any

import steplog


def main() -> None:
    uri, experiment, mode, first, last, gate = sys.argv[1:7]
    run_id = sys.argv[7] if len(sys.argv) > 7 and sys.argv[7] != "-" else None
    rewind = int(sys.argv[8]) if len(sys.argv) > 8 and sys.argv[8] != "-" else None
    if gate != "-":
        Path(gate, f"ready-{os.getpid()}").touch()
        while not Path(gate, "go").exists():
            time.sleep(0.005)
    options: dict[str, Any] = {"ranks": "off" if mode == "hang" else mode}
    if run_id is not None:
        options["run_id"] = run_id
    if rewind is not None:
        options["rewind_to_step"] = rewind
    run = steplog.start_run(experiment, tracking_uri=uri, run_name="job", handle_signals=False, **options)
    rank = run.rank
    run.log_params({"lr": 0.1})
    for step in range(int(first), int(last) + 1):
        run.log_metric("x", step + rank / 100, step=step)
    if mode == "hang":
        run.flush()
        print(f"ready {run.run_id}", flush=True)
        while True:
            time.sleep(60)
    run.close()
    print(f"run {run.info.run_id} writes={run.writes} rank={rank} world={run.world_size}", flush=True)


if __name__ == "__main__":
    main()
