"""`import mlcycle.serve.online` and `mlcycle serve --help` load no server or model library."""

from __future__ import annotations

import subprocess
import sys

HEAVY = ("torch", "ray", "uvicorn", "starlette", "httpx", "orjson", "sklearn", "numpy")


def test_serve_imports_are_lazy() -> None:
    code = (
        "import sys, mlcycle.cli, mlcycle.serve.online as o;"
        "o.__all__; o.batching; o.selection; o.cascade; o.examples;"
        f"print([m for m in {HEAVY!r} if m in sys.modules])"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]", out.stdout


def test_serve_help_lists_the_commands() -> None:
    out = subprocess.run(
        [sys.executable, "-m", "mlcycle.cli", "serve", "--help"],
        capture_output=True,
        text=True,
        check=True,
    )
    for command in ("start", "status", "link", "replicas", "app", "model"):
        assert command in out.stdout
