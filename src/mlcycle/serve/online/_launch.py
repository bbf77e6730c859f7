"""Running ``mlcycle serve start`` in a child process, for benchmarks, demos and tests."""

from __future__ import annotations

import contextlib
import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from mlcycle.serve.online._config import ServerConfig

__all__ = ["serve_in_process"]


@contextlib.contextmanager
def serve_in_process(
    config: ServerConfig | dict[str, Any] | str | Path,
    *,
    host: str = "127.0.0.1",
    port: int = 0,
    startup_timeout_s: float = 300.0,
    cpus: list[int] | None = None,
) -> Iterator[str]:
    """Run ``mlcycle serve start`` in a child process and yield its base URL.

    The server gets an interpreter (and GIL) of its own, as in production; the child and its
    worker processes are stopped with SIGTERM (then SIGKILL to the group) on exit.

    Args:
        config: a config, a dict, or a JSON file path.
        host, port: where to bind (port 0: a free one).
        startup_timeout_s: how long the models may take to load.
        cpus: pin the server (and its workers) to these cores, e.g. [0].
    """
    import os
    import signal
    import subprocess
    import sys
    import tempfile
    import time

    cfg = ServerConfig.load(config)
    with tempfile.NamedTemporaryFile("w", suffix=".json", delete=False) as f:
        data = cfg.to_dict()
        data["admin_token"] = cfg.admin_token
        json.dump(data, f)
        path = f.name
    cmd = [sys.executable, "-m", "mlcycle.cli", "serve", "start", "--config", path]
    cmd += ["--host", host, "--port", str(port)]
    errors = tempfile.TemporaryFile("w+")  # a pipe nobody reads could fill up and block it
    proc = subprocess.Popen(
        cmd,
        stdout=subprocess.PIPE,
        stderr=errors,
        text=True,
        start_new_session=True,  # its own process group, so cleanup reaches every worker
        preexec_fn=(lambda: os.sched_setaffinity(0, cpus)) if cpus else None,
    )
    try:
        deadline = time.monotonic() + startup_timeout_s
        line = ""
        while time.monotonic() < deadline:
            line = proc.stdout.readline()  # type: ignore[union-attr]
            if not line or line.startswith("mlcycle serve: listening on "):
                break
        if not line.startswith("mlcycle serve: listening on "):
            proc.kill()
            proc.wait(30)
            errors.seek(0)
            raise RuntimeError(f"the server failed to start: {errors.read().strip()[-2000:]}")
        yield line.split()[-1]
    finally:
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(30)
            except subprocess.TimeoutExpired:
                pass
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
        errors.close()
        os.unlink(path)
