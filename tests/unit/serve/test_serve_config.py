"""Server config: defaults, and errors that name the field and the fix."""

from __future__ import annotations

import json

import pytest

from mlcycle.serve.online._config import AppConfig, ConfigError, ModelConfig, ServerConfig

NOOP = "mlcycle.serve.online.examples:noop"


def test_defaults_and_round_trip(tmp_path) -> None:
    data = {
        "models": [{"name": "m", "factory": NOOP, "batching": {"policy": "latency"}}],
        "apps": [{"name": "a", "slo_ms": 20, "models": ["m"], "default": [0]}],
    }
    path = tmp_path / "c.json"
    path.write_text(json.dumps(data))
    cfg = ServerConfig.load(path)
    assert cfg.host == "127.0.0.1"  # loopback by default
    m, a = cfg.models[0], cfg.apps[0]
    assert (m.kind, m.replicas, m.version, m.key) == ("thread", 1, "1", "m:1")
    assert m.batching.policy == "latency" and m.batching.max_batch_size == 64
    assert a.policy == "single" and a.cache is True and a.margin_ms == pytest.approx(3.0)
    assert ServerConfig.from_dict(cfg.to_dict()).models[0] == m


@pytest.mark.parametrize(
    ("data", "message"),
    [
        ({"models": [{"name": "m"}]}, "needs field(s) 'factory'"),
        ({"models": [{"name": "m", "factory": "no colon"}]}, "package.module:attr"),
        ({"models": [{"name": "m", "factory": NOOP, "kind": "gpu"}]}, "thread, process, ray"),
        (
            {"models": [{"name": "m", "factory": NOOP, "replicas": 0}]},
            r"replicas must be .* \[1, 64\]",
        ),
        ({"models": [{"name": "m", "factory": NOOP, "colour": 1}]}, "unknown field(s) 'colour'"),
        ({"apps": [{"name": "a", "models": ["ghost"]}]}, "unknown model(s) ['ghost']"),
        ({"apps": [{"name": "a", "slo_ms": 0}]}, "slo_ms must be a number in (0"),
        ({"apps": [{"name": "metrics"}]}, "reserved"),
        ({"apps": [{"name": "a b"}]}, "letters, digits"),
        ({"apps": [{"name": "a", "policy": "best"}]}, "single, exp3, exp4, cascade"),
        ({"port": 70000}, r"port must be an integer in \[0, 65535\]"),
    ],
)
def test_errors_say_what_is_valid(data, message) -> None:
    with pytest.raises(ConfigError) as info:
        ServerConfig.from_dict(data)
    assert message in str(info.value) or __import__("re").search(message, str(info.value))


def test_file_errors(tmp_path) -> None:
    with pytest.raises(ConfigError, match="cannot read config file"):
        ServerConfig.load(tmp_path / "missing.json")
    bad = tmp_path / "bad.json"
    bad.write_text("{nope")
    with pytest.raises(ConfigError, match="not valid JSON"):
        ServerConfig.load(bad)


def test_margin_and_factory_allowlist() -> None:
    assert AppConfig.from_dict({"name": "a", "slo_ms": 1}).margin_ms == 0.5  # at most half
    assert AppConfig.from_dict({"name": "a", "slo_ms": 10, "slo_margin_ms": 2}).margin_ms == 2
    cfg = ServerConfig.from_dict({"allowed_factories": ["mlcycle.serve"]})
    assert cfg.factory_allowed(NOOP)
    assert not cfg.factory_allowed("os:system")
    assert not cfg.factory_allowed("mlcycle.servex:f")
    assert ModelConfig.from_dict({"name": "m", "factory": NOOP, "version": 3}).version == "3"
