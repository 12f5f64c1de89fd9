"""A real ``mlflow server`` (sqlite backend, artifacts served) on 127.0.0.1 for the REST tests.

Started as its own process group so that stopping it ends its workers too;
:meth:`MlflowServer.kill` ends it abruptly (SIGKILL) to simulate an outage, and
:meth:`MlflowServer.start` brings it back on the same port and database.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx


def free_port() -> int:
    """A TCP port nobody listens on right now."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class MlflowServer:
    """One ``mlflow server`` process, restartable on the same port and database."""

    def __init__(self, root: Path, port: int | None = None) -> None:
        self.root = root
        self.port = port or free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self._proc: subprocess.Popen[bytes] | None = None
        root.mkdir(parents=True, exist_ok=True)

    def start(self, timeout: float = 90.0) -> None:
        """Start the server and wait until ``/health`` answers."""
        env = {k: v for k, v in os.environ.items() if not k.startswith("MLFLOW_TRACKING")}
        env["MLFLOW_SERVER_ENABLE_JOB_EXECUTION"] = "false"  # no job runner processes: faster start, less CPU
        log = open(self.root / "server.log", "ab")  # noqa: SIM115 - the process owns it until stop()
        self._proc = subprocess.Popen(
            [
                sys.executable, "-m", "mlflow", "server",
                "--backend-store-uri", f"sqlite:///{self.root / 'mlflow.db'}",
                "--artifacts-destination", str(self.root / "artifacts"),
                "--host", "127.0.0.1", "--port", str(self.port), "--workers", "1",
            ],
            stdout=log,
            stderr=subprocess.STDOUT,
            env=env,
            start_new_session=True,
        )  # fmt: skip
        log.close()
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self._proc.poll() is not None:
                raise RuntimeError(f"mlflow server exited early:\n{self.log_tail()}")
            try:
                if httpx.get(f"{self.url}/health", timeout=2.0).status_code == 200:
                    return
            except httpx.TransportError:
                pass
            time.sleep(0.2)
        self.stop()
        raise RuntimeError(f"mlflow server did not start within {timeout} s:\n{self.log_tail()}")

    def kill(self) -> None:
        """End the server at once (SIGKILL to its process group), as a crash or a network cut would."""
        self._signal(signal.SIGKILL)

    def stop(self) -> None:
        """End the server (SIGTERM, then SIGKILL after 10 s) and wait for it."""
        self._signal(signal.SIGTERM)

    def _signal(self, signum: int) -> None:
        proc = self._proc
        if proc is None:
            return
        try:
            os.killpg(proc.pid, signum)
        except ProcessLookupError:
            pass
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(10)
        self._proc = None
        self._wait_port_free()

    def _wait_port_free(self, timeout: float = 10.0) -> None:
        # the group's workers may outlive the leader for a moment
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            with socket.socket() as s:
                if s.connect_ex(("127.0.0.1", self.port)) != 0:
                    return
            time.sleep(0.1)

    def log_tail(self, n: int = 30) -> str:
        try:
            return "\n".join((self.root / "server.log").read_text(errors="replace").splitlines()[-n:])
        except OSError:
            return ""
