"""Schemathesis fuzzes every operation of GET /openapi.json: no input may cause a 5xx.

Valid (positive) and invalid (negative) requests are generated from the served schema, a
bounded number per operation, so the whole run stays short. The fuzzed server only loads
factories from mlcycle.serve.online.examples (``allowed_factories``), so random factory strings
never import arbitrary modules.
"""

from __future__ import annotations

import os

import httpx
import pytest

schemathesis = pytest.importorskip("schemathesis")
from hypothesis import HealthCheck, given, settings  # noqa: E402
from hypothesis.errors import Unsatisfiable  # noqa: E402
from schemathesis import GenerationMode  # noqa: E402

from mlcycle.serve.online import serve_in_thread  # noqa: E402
from mlcycle.serve.online._openapi import openapi_schema  # noqa: E402

EX = "mlcycle.serve.online.examples"
CONFIG = {
    "allowed_factories": [EX],
    "max_body_bytes": 65536,
    "models": [
        {"name": "echo", "factory": f"{EX}:noop"},
        {"name": "shaped", "factory": f"{EX}:noop", "input_shape": [3]},
        {"name": "a", "factory": f"{EX}:constant", "args": {"scores": [0.9, 0.1]}},
        {"name": "b", "factory": f"{EX}:constant", "args": {"scores": [0.2, 0.8]}},
    ],
    "apps": [
        {"name": "echo", "slo_ms": 200, "models": ["echo"]},
        {"name": "shaped", "slo_ms": 200, "models": ["shaped"], "default": [0, 0, 0]},
        {"name": "pick", "slo_ms": 200, "models": ["a", "b"], "policy": "exp3"},
        {"name": "mix", "slo_ms": 200, "models": ["a", "b"], "policy": "exp4"},
        {
            "name": "idk",
            "slo_ms": 200,
            "models": ["a", "b"],
            "policy": "cascade",
            "thresholds": [0.95],
        },
    ],
}
SCHEMA = schemathesis.openapi.from_dict(openapi_schema())
OPERATIONS = [op.ok() for op in SCHEMA.get_all_operations()]
SCALE = int(os.environ.get("MLCYCLE_FUZZ_SCALE", "1"))  # e.g. 10 for a deeper run by hand
EXAMPLES = {GenerationMode.POSITIVE: 12 * SCALE, GenerationMode.NEGATIVE: 8 * SCALE}


@pytest.fixture(scope="module")
def url():
    with serve_in_thread(CONFIG) as base:
        yield base


def test_served_schema_is_the_fuzzed_one(url) -> None:
    assert httpx.get(f"{url}/openapi.json").json() == openapi_schema()


@pytest.mark.parametrize("mode", list(EXAMPLES), ids=lambda m: m.value)
@pytest.mark.parametrize("operation", OPERATIONS, ids=lambda op: op.label)
def test_no_server_errors(url, operation, mode) -> None:
    @given(case=operation.as_strategy(generation_mode=mode))
    @settings(
        max_examples=EXAMPLES[mode],
        deadline=None,
        derandomize=True,
        database=None,
        suppress_health_check=list(HealthCheck),
    )
    def fuzz(case) -> None:
        response = case.call(base_url=url, timeout=30)
        where = f"{case.method} {case.formatted_path} {case.body!r:.300}"
        assert response.status_code < 500, f"{where}: {response.text}"
        if response.status_code >= 400:
            assert "error" in response.json(), where

    try:
        fuzz()
    except Unsatisfiable:  # nothing to make invalid (no parameters, no body)
        pytest.skip(f"{operation.label} takes no input to make invalid")
