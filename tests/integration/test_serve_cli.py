"""`mlcycle serve` as a user runs it: start with a config, change it live, stop with SIGTERM."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import httpx
import pytest

EX = "mlcycle.serve.online.examples"
REPO = Path(__file__).resolve().parents[2]


def cli(*args: str, url: str) -> dict:
    out = subprocess.run(
        [sys.executable, "-m", "mlcycle.cli", "serve", *args, "--url", url],
        capture_output=True,
        text=True,
        timeout=120,
        cwd=REPO,
    )
    assert out.returncode == 0, out.stderr
    return json.loads(out.stdout)


@pytest.mark.slow
def test_start_admin_commands_and_sigterm(tmp_path) -> None:
    config = {
        "models": [{"name": "echo", "factory": f"{EX}:noop", "kind": "process"}],
        "apps": [{"name": "echo", "slo_ms": 500, "models": ["echo"]}],
    }
    path = tmp_path / "serve.json"
    path.write_text(json.dumps(config))
    proc = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "mlcycle.cli",
            "serve",
            "start",
            "--config",
            str(path),
            "--port",
            "0",
        ],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        cwd=REPO,
        start_new_session=True,  # so a failed test can still stop the whole group
    )
    try:
        line = proc.stdout.readline()  # blocks until the models are up
        assert line.startswith("mlcycle serve: listening on http://127.0.0.1:"), line
        url = line.split()[-1]
        worker_pid = httpx.get(f"{url}/admin/models/echo").json()["replicas"][0]["pid"]

        r = cli(
            "model", "deploy", "twice", "--factory", f"{EX}:noop", "--batching", "none", url=url
        )
        assert r["name"] == "twice" and r["batching"]["policy"] == "none"
        r = cli("app", "register", "two", "--slo-ms", "100", "--default", '"none"', url=url)
        assert r["slo_ms"] == 100 and r["default"] == "none" and r["models"] == []
        assert cli("link", "two", "twice", url=url)["models"] == ["twice"]
        assert httpx.post(f"{url}/two/predict", json={"input": 3}).json()["output"] == 3
        assert len(cli("replicas", "twice", "2", url=url)["replicas"]) == 2
        status = cli("status", url=url)
        assert status["health"]["models"]["twice"]["replicas_alive"] == 2
        assert cli("link", "two", "twice", "--unlink", url=url)["models"] == []
        assert cli("app", "remove", "two", url=url) == {"removed": "two"}
        assert cli("model", "undeploy", "twice", url=url) == {"removed": "twice:1"}

        bad = subprocess.run(
            [
                sys.executable,
                "-m",
                "mlcycle.cli",
                "serve",
                "model",
                "undeploy",
                "nope",
                "--url",
                url,
            ],
            capture_output=True,
            text=True,
            timeout=60,
            cwd=REPO,
        )
        assert bad.returncode == 1 and "HTTP 404" in bad.stderr and "unknown model" in bad.stderr

        proc.send_signal(signal.SIGTERM)
        out, _ = proc.communicate(timeout=30)
        assert proc.returncode == 0 and "stopped" in out
        with pytest.raises(ProcessLookupError):  # the worker process went with the server
            os.kill(worker_pid, 0)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()


def test_unreachable_server_is_a_clear_error() -> None:
    out = subprocess.run(
        [sys.executable, "-m", "mlcycle.cli", "serve", "status", "--url", "http://127.0.0.1:9"],
        capture_output=True,
        text=True,
        timeout=60,
        cwd=REPO,
    )
    assert out.returncode == 1 and "cannot reach" in out.stderr


def test_bad_config_is_a_clear_error(tmp_path) -> None:
    path = tmp_path / "bad.json"
    path.write_text(json.dumps({"models": [{"name": "m", "factory": f"{EX}:noop", "kind": "gpu"}]}))
    out = subprocess.run(
        [sys.executable, "-m", "mlcycle.cli", "serve", "start", "--config", str(path)],
        capture_output=True,
        text=True,
        timeout=60,
        cwd=REPO,
    )
    assert out.returncode == 2 and "thread, process, ray" in out.stderr
