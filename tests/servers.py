"""Real `mlflow server` processes for the tests (tracking over HTTP, the basic-auth team server, the UI)."""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path
from typing import Iterator, Optional

import pytest


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextlib.contextmanager
def mlflow_server(tmp: Path, backend: str, artifacts: Optional[Path] = None, args: tuple = (),
                  env: Optional[dict] = None) -> Iterator[tuple[str, subprocess.Popen]]:
    """`mlflow server` on a free 127.0.0.1 port over `backend` (its artifacts served from `artifacts`, else the
    runs' own locations), up once GET /health answers; the whole process group is stopped at exit."""
    port = free_port()
    log = open(tmp / f"server-{port}.log", "wb")
    server_env = {k: v for k, v in os.environ.items() if not k.startswith("MLFLOW_")}
    server_env["MLFLOW_SERVER_ENABLE_JOB_EXECUTION"] = "false"  # no job-runner process: faster start
    server_env.update(env or {})
    store = ["--artifacts-destination", str(artifacts)] if artifacts else ["--no-serve-artifacts"]
    proc = subprocess.Popen([sys.executable, "-m", "mlflow", "server", "--host", "127.0.0.1", "--port", str(port),
                             "--workers", "1", "--backend-store-uri", backend, *store, *args],
                            stdout=log, stderr=subprocess.STDOUT, env=server_env, start_new_session=True)
    uri = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 90
        while True:
            try:
                with urllib.request.urlopen(uri + "/health", timeout=1):
                    break
            except urllib.error.HTTPError:  # it answers (behind auth, 401)
                break
            except OSError:
                pass
            if proc.poll() is not None or time.monotonic() > deadline:
                log.flush()
                pytest.fail(f"no mlflow server:\n{(tmp / f'server-{port}.log').read_text()}")
            time.sleep(0.25)
        yield uri, proc
    finally:
        stop(proc)
        log.close()


def stop(proc: subprocess.Popen) -> None:
    """Stop the server and its uvicorn / job-runner children (they share its session)."""
    if proc.poll() is None:
        os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(timeout=15)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
    else:
        try:
            os.killpg(proc.pid, signal.SIGKILL)  # children may outlive the parent
        except ProcessLookupError:
            pass
