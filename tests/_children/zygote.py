"""A fork server for crash tests: imports steplog once, then forks one logging child per request.

Protocol on stdin/stdout, one line each way:
  parent -> ``<store> <ackfile> <keys> <per_step> <flush_every> <flush_interval>``
  zygote -> ``pid <pid>`` once the child is forked, then ``exit <pid> <waitstatus>`` when it is gone.
The child logs ``<keys>`` metrics step after step (values derived from key and step, so
the parent can check every line), calls ``run.flush()`` every ``flush_every`` steps and
appends ``<step>\\n`` to the ack file once the flush returned: every step listed there was
acknowledged before the parent's SIGKILL arrived.
"""

from __future__ import annotations

import os
import sys

import steplog
import steplog._run  # pre-load the writer before forking: import steplog is lazy (PEP 562)


def value(key_index: int, step: int, i: int) -> float:
    return step * 1000.0 + key_index + i / 64


def child(store: str, ackfile: str, keys: int, per_step: int, flush_every: int, flush_interval: float) -> None:
    ack = os.open(ackfile, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
    names = [f"k{i}" if i % 2 else f"group/k{i}" for i in range(keys)]
    run = steplog.start_run("crash", tracking_uri=store, flush_interval=flush_interval, handle_signals=False)
    os.write(ack, b"started\n")
    step = 0
    while True:
        for i, name in enumerate(names):
            for j in range(per_step):
                run.log_metric(name, value(i, step, j), step=step)
        step += 1
        if step % flush_every == 0:
            run.flush()
            os.write(ack, b"%d\n" % (step - 1))


def main() -> None:
    for line in sys.stdin:
        store, ackfile, keys, per_step, flush_every, flush_interval = line.split()
        pid = os.fork()
        if pid == 0:
            try:
                child(store, ackfile, int(keys), int(per_step), int(flush_every), float(flush_interval))
            finally:
                os._exit(3)
        print(f"pid {pid}", flush=True)
        _, status = os.waitpid(pid, 0)
        print(f"exit {pid} {status}", flush=True)


if __name__ == "__main__":
    main()
