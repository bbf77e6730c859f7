"""`mlcycle tune`'s argument handling (the command is registered in mlcycle.cli by the lead)."""

from __future__ import annotations

import pytest
import typer
from typer.testing import CliRunner

from mlcycle.develop._cli import parse_duration_s, tune

app = typer.Typer()
app.command()(tune)
app.command("noop")(lambda: None)  # two commands: typer keeps `tune` as a subcommand


@pytest.mark.parametrize(
    ("text", "seconds"), [("120s", 120.0), ("2m", 120.0), ("1.5h", 5400.0), ("90", 90.0)]
)
def test_deadlines_take_units(text: str, seconds: float) -> None:
    assert parse_duration_s(text) == seconds


@pytest.mark.parametrize("text", ["soon", "0s", "-5", "10d"])
def test_a_bad_deadline_says_what_is_valid(text: str) -> None:
    with pytest.raises(ValueError, match="e.g. 120s, 2m, 1h or 90"):
        parse_duration_s(text)


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--deadline", "soon"], "positive duration"),
        (["--scheduler", "fifo"], "choose one of hypersched, asha, rcs"),
        (["--workload", "mnist"], "choose one of synthetic, digits"),
        (["--atoms", "0"], "--atoms must be >= 1"),
    ],
)
def test_bad_options_fail_before_ray_starts(args: list[str], message: str) -> None:
    result = CliRunner().invoke(app, ["tune", *args])
    assert result.exit_code == 2
    assert message in result.output
