"""Shared helpers for the scripts in ``benchmarks/``.

Every benchmark script takes the same three options (:func:`make_parser`):

- ``--quick``: a reduced run that finishes in a couple of minutes on a 2-core machine (what
  ``make bench`` runs);
- ``--json``: the last line of stdout is one JSON object with the results
  (:func:`print_json_last`); progress and tables then go to stderr (:func:`make_console`);
- ``--out DIR``: where figures and other files go, ``out/bench/<script>/`` under the repo root
  by default (``out/`` is git-ignored).

Scripts import this module as ``from _common import ...``: running ``python benchmarks/x.py``
puts ``benchmarks/`` first on ``sys.path``. Running this file itself does nothing (``make
bench`` runs every ``benchmarks/*.py``, this one included).
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    SpinnerColumn,
    TextColumn,
    TimeElapsedColumn,
    TimeRemainingColumn,
)

__all__ = [
    "default_out_dir",
    "jsonable",
    "make_console",
    "make_parser",
    "print_json_last",
    "progress_bar",
    "pyplot",
    "repo_root",
    "shared_dir",
]


def repo_root() -> Path:
    """The repository root: the folder above ``benchmarks/`` that holds ``pyproject.toml``."""
    here = Path(__file__).resolve().parent
    for candidate in (here.parent, *here.parents):
        if (candidate / "pyproject.toml").is_file():
            return candidate
    return here.parent


def shared_dir(*parts: str) -> Path | None:
    """A path inside the shared data folder, or None when it is not there.

    The shared folder is ``<repo root>/shared`` when the checkout has one (as on a copied
    working tree), else ``<repo root>/../shared`` (beside the checkout). ``parts`` are joined
    onto it, e.g. ``shared_dir("remat-graphs")``; the joined path must exist.
    """
    root = repo_root()
    for base in (root / "shared", root.parent / "shared"):
        path = base.joinpath(*parts)
        if base.is_dir() and path.exists():
            return path
    return None


def default_out_dir(name: str) -> Path:
    """``<repo root>/out/bench/<name>``: where a benchmark writes its files by default."""
    return repo_root() / "out" / "bench" / name


def make_parser(name: str, description: str) -> argparse.ArgumentParser:
    """An argument parser with the common ``--quick``, ``--json`` and ``--out`` options.

    Args:
        name: the script's name without ``.py``; sets the default ``--out`` folder.
        description: shown by ``--help`` (the script's docstring, typically).

    Scripts add their own options to the returned parser before ``parse_args()``.
    """
    parser = argparse.ArgumentParser(
        prog=f"benchmarks/{name}.py",
        description=description,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument(
        "--quick",
        action="store_true",
        help="a reduced run, a couple of minutes on 2 cores (what `make bench` runs)",
    )
    parser.add_argument(
        "--json",
        action="store_true",
        help="print the results as one JSON object on the last line of stdout "
        "(progress and tables go to stderr)",
    )
    parser.add_argument(
        "--out",
        type=Path,
        default=default_out_dir(name),
        help="folder for figures and other files (default: %(default)s)",
    )
    return parser


def make_console(json_mode: bool, width: int = 160) -> Console:
    """The console for progress, notes and tables: stderr under ``--json``, else stdout.

    When that stream is not a terminal (a pipe, a log file), tables are laid out ``width``
    columns wide instead of rich's default of 80, which would truncate them.
    """
    console = Console(stderr=json_mode)
    if not console.is_terminal:
        console = Console(stderr=json_mode, width=max(width, console.width))
    return console


@contextmanager
def progress_bar(console: Console, total: int, description: str = "") -> Iterator[Any]:
    """One rich progress bar over ``total`` steps; yields an ``update`` function.

    ``update(advance=1, description=None, add_total=0)`` moves the bar, and optionally changes
    its text or grows its total (when steps are added on the way)::

        with progress_bar(console, len(jobs), "solving") as update:
            for job in jobs:
                update(0, f"solving {job}")
                run(job)
                update()
    """
    progress = Progress(
        SpinnerColumn(),
        TextColumn("[progress.description]{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TimeElapsedColumn(),
        TextColumn("eta"),
        TimeRemainingColumn(),
        console=console,
    )
    with progress:
        task = progress.add_task(description, total=total)

        def update(
            advance: float = 1, description: str | None = None, add_total: float = 0
        ) -> None:
            total = None
            if add_total:
                current = next(t for t in progress.tasks if t.id == task)
                total = (current.total or 0) + add_total
            progress.update(task, advance=advance, description=description, total=total)

        yield update


def jsonable(value: Any) -> Any:
    """``value`` with non-finite floats as None and paths, tuples and numpy scalars converted,
    so that ``json.dumps(..., allow_nan=False)`` accepts it."""
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, dict):
        return {str(k): jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple, set)):
        return [jsonable(v) for v in value]
    if isinstance(value, Path):
        return str(value)
    if hasattr(value, "item") and callable(value.item):  # numpy / torch scalars
        try:
            return jsonable(value.item())
        except (TypeError, ValueError):
            return str(value)
    return value


def print_json_last(obj: Any) -> None:
    """Print ``obj`` as one line of JSON on stdout, after flushing everything printed before,
    so that it is the last line (``--json``). Non-finite floats become null."""
    sys.stderr.flush()
    sys.stdout.flush()
    sys.stdout.write(json.dumps(jsonable(obj), allow_nan=False, separators=(",", ":")) + "\n")
    sys.stdout.flush()


def pyplot() -> Any:
    """``matplotlib.pyplot`` on the non-interactive Agg backend (no display needed)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


if __name__ == "__main__":
    print("benchmarks/_common.py holds shared helpers; nothing to run.")
