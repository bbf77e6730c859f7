"""Server, model and app configuration: plain dataclasses read from JSON with clear errors.

The same shapes arrive whole (``mlcycle serve start --config FILE``) or piecewise through the
admin API, so every check raises :class:`ConfigError` (a ValueError) that names the field,
what is valid and how to fix it; the admin API turns it into a 4xx JSON answer.
"""

from __future__ import annotations

import json
import math
import re
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.\-]{0,63}$")
FACTORY_RE = re.compile(r"^[A-Za-z_][\w]*(\.[A-Za-z_][\w]*)*:[A-Za-z_][\w]*(\.[A-Za-z_][\w]*)*$")
RESERVED_APPS = frozenset({"admin", "health", "metrics", "openapi.json", "docs"})
KINDS = ("thread", "process", "ray")
APP_POLICIES = ("single", "exp3", "exp4", "cascade")
BATCH_POLICIES = ("aimd", "latency", "fixed", "none")
METHODS = ("auto", "predict", "predict_proba")
MAX_REPLICAS = 64
MAX_BATCH = 4096


class ConfigError(ValueError):
    """A configuration value is missing or invalid; the message says how to fix it."""


def _fields(obj: Any, where: str, allowed: set[str], required: set[str]) -> dict[str, Any]:
    if not isinstance(obj, dict):
        raise ConfigError(f"{where} must be a JSON object, got {type(obj).__name__}")
    unknown = sorted(set(obj) - allowed)
    if unknown:
        raise ConfigError(
            f"unknown field(s) {', '.join(map(repr, unknown))} in {where}; "
            f"valid fields: {', '.join(sorted(allowed))}"
        )
    missing = sorted(required - set(obj))
    if missing:
        raise ConfigError(f"{where} needs field(s) {', '.join(map(repr, missing))}")
    return obj


def check_name(value: Any, what: str) -> str:
    """A model or app name: 1-64 of letters, digits, '_', '.', '-', starting alphanumeric."""
    if not isinstance(value, str) or not NAME_RE.match(value):
        raise ConfigError(
            f"{what} must be 1-64 characters of letters, digits, '_', '.', '-' starting with a "
            f"letter or digit, got {value!r}"
        )
    return value


def _int(value: Any, what: str, lo: int, hi: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or not lo <= value <= hi:
        raise ConfigError(f"{what} must be an integer in [{lo}, {hi}], got {value!r}")
    return value


def _num(value: Any, what: str, lo: float, hi: float, *, lo_open: bool = False) -> float:
    ok = isinstance(value, int | float) and not isinstance(value, bool)
    if ok:
        value = float(value)
        ok = math.isfinite(value) and (value > lo if lo_open else value >= lo) and value <= hi
    if not ok:
        bound = "(" if lo_open else "["
        raise ConfigError(f"{what} must be a number in {bound}{lo:g}, {hi:g}], got {value!r}")
    return value


def _choice(value: Any, what: str, choices: tuple[str, ...]) -> str:
    if value not in choices:
        raise ConfigError(f"{what} must be one of {', '.join(choices)}; got {value!r}")
    return value


def _obj(value: Any, what: str) -> dict[str, Any]:
    if not isinstance(value, dict):
        raise ConfigError(f"{what} must be a JSON object, got {type(value).__name__}")
    return dict(value)


@dataclass
class BatchingConfig:
    """How a model's replicas batch queries (Clipper Sec. 4.3)."""

    policy: str = "aimd"  # aimd | latency | fixed | none
    max_batch_size: int = 64  # the largest batch any controller may choose
    wait_ms: float = 0.0  # delayed batching: wait this long for more queries when thin

    @classmethod
    def from_dict(cls, data: Any, where: str = "batching") -> BatchingConfig:
        d = _fields(data, where, {"policy", "max_batch_size", "wait_ms"}, set())
        return cls(
            policy=_choice(d.get("policy", "aimd"), f"{where}.policy", BATCH_POLICIES),
            max_batch_size=_int(
                d.get("max_batch_size", 64), f"{where}.max_batch_size", 1, MAX_BATCH
            ),
            wait_ms=_num(d.get("wait_ms", 0.0), f"{where}.wait_ms", 0.0, 1000.0),
        )


@dataclass
class ModelConfig:
    """One deployed model version and how it runs."""

    name: str
    factory: str  # "package.module:attr", a callable returning the model
    version: str = "1"
    args: dict[str, Any] = field(default_factory=dict)  # keyword arguments for the factory
    replicas: int = 1
    kind: str = "thread"  # thread | process | ray
    batching: BatchingConfig = field(default_factory=BatchingConfig)
    method: str = "auto"  # scikit-learn: auto (predict_proba if any) | predict | predict_proba
    threads: int | None = 1  # torch intra-op threads in each replica (None: leave as is)
    input_shape: list[int] | None = None  # checked at the frontend when given
    ray_options: dict[str, Any] = field(default_factory=dict)  # e.g. {"num_cpus": 1}

    FIELDS = frozenset(
        {
            "name",
            "factory",
            "version",
            "args",
            "replicas",
            "kind",
            "batching",
            "method",
            "threads",
            "input_shape",
            "ray_options",
        }
    )

    @property
    def key(self) -> str:
        """``name:version``, as responses and metrics name the model."""
        return f"{self.name}:{self.version}"

    @classmethod
    def from_dict(cls, data: Any, where: str = "model") -> ModelConfig:
        d = _fields(data, where, set(cls.FIELDS), {"name", "factory"})
        name = check_name(d["name"], f"{where}.name")
        where = f"model {name!r}"
        factory = d["factory"]
        if not isinstance(factory, str) or not FACTORY_RE.match(factory):
            raise ConfigError(
                f"{where}: factory must be 'package.module:attr' naming a callable that returns "
                f"the model, e.g. 'mlcycle.serve.online.examples:mlp'; got {factory!r}"
            )
        version = d.get("version", "1")
        if isinstance(version, int) and not isinstance(version, bool):
            version = str(version)
        version = check_name(version, f"{where}: version")
        threads = d.get("threads", 1)
        if threads is not None:
            threads = _int(threads, f"{where}: threads", 1, 256)
        shape = d.get("input_shape")
        if shape is not None:
            if not isinstance(shape, list) or not 1 <= len(shape) <= 8:
                raise ConfigError(
                    f"{where}: input_shape must be a list of 1-8 positive ints, e.g. [256]"
                )
            shape = [_int(s, f"{where}: input_shape entries", 1, 1 << 24) for s in shape]
        return cls(
            name=name,
            factory=factory,
            version=version,
            args=_obj(d.get("args", {}), f"{where}: args"),
            replicas=_int(d.get("replicas", 1), f"{where}: replicas", 1, MAX_REPLICAS),
            kind=_choice(d.get("kind", "thread"), f"{where}: kind", KINDS),
            batching=BatchingConfig.from_dict(d.get("batching", {}), f"{where}: batching"),
            method=_choice(d.get("method", "auto"), f"{where}: method", METHODS),
            threads=threads,
            input_shape=shape,
            ray_options=_obj(d.get("ray_options", {}), f"{where}: ray_options"),
        )

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass
class AppConfig:
    """An application: a latency SLO, a default answer and the models behind it."""

    name: str
    slo_ms: float = 50.0  # every query is answered within this, the default if need be
    default: Any = None  # the answer when no model can answer in time
    models: list[str] = field(default_factory=list)
    policy: str = "single"  # single | exp3 | exp4 | cascade
    thresholds: list[float] | None = None  # cascade: confidence a stage needs to answer
    cache: bool = True  # consult the prediction cache
    slo_margin_ms: float | None = None  # time kept for sending the answer; default below
    policy_args: dict[str, Any] = field(default_factory=dict)  # e.g. {"gamma": 0.1}
    policy_state: dict[str, Any] | None = None  # a policy's to_dict(), to resume learning

    FIELDS = frozenset(
        {
            "name",
            "slo_ms",
            "default",
            "models",
            "policy",
            "thresholds",
            "cache",
            "slo_margin_ms",
            "policy_args",
            "policy_state",
        }
    )

    @property
    def margin_ms(self) -> float:
        """Time reserved between the answer deadline and the SLO (1 ms + 10%, at most half)."""
        if self.slo_margin_ms is not None:
            return self.slo_margin_ms
        return min(1.0 + 0.1 * self.slo_ms, 0.5 * self.slo_ms)

    @classmethod
    def from_dict(cls, data: Any, where: str = "app") -> AppConfig:
        d = _fields(data, where, set(cls.FIELDS), {"name"})
        name = check_name(d["name"], f"{where}.name")
        if name in RESERVED_APPS:
            raise ConfigError(
                f"app name {name!r} is reserved for the server's own endpoints; "
                f"pick another (reserved: {', '.join(sorted(RESERVED_APPS))})"
            )
        where = f"app {name!r}"
        models = d.get("models", [])
        if not isinstance(models, list):
            raise ConfigError(f"{where}: models must be a list of model names, e.g. ['mlp']")
        models = [check_name(m, f"{where}: models entries") for m in models]
        if len(set(models)) != len(models):
            raise ConfigError(f"{where}: models lists a model twice: {models}")
        thresholds = d.get("thresholds")
        if thresholds is not None:
            if not isinstance(thresholds, list):
                raise ConfigError(f"{where}: thresholds must be a list of numbers in [0, 1]")
            thresholds = [_num(t, f"{where}: thresholds entries", 0.0, 1.0) for t in thresholds]
        slo_ms = _num(d.get("slo_ms", 50.0), f"{where}: slo_ms", 0.0, 600_000.0, lo_open=True)
        margin = d.get("slo_margin_ms")
        if margin is not None:
            margin = _num(margin, f"{where}: slo_margin_ms", 0.0, slo_ms)
        cache = d.get("cache", True)
        if not isinstance(cache, bool):
            raise ConfigError(f"{where}: cache must be true or false, got {cache!r}")
        state = d.get("policy_state")
        if state is not None:
            state = _obj(state, f"{where}: policy_state")
        return cls(
            name=name,
            slo_ms=slo_ms,
            default=d.get("default"),
            models=models,
            policy=_choice(d.get("policy", "single"), f"{where}: policy", APP_POLICIES),
            thresholds=thresholds,
            cache=cache,
            slo_margin_ms=margin,
            policy_args=_obj(d.get("policy_args", {}), f"{where}: policy_args"),
            policy_state=state,
        )

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass
class ServerConfig:
    """The whole server: models, apps and limits."""

    models: list[ModelConfig] = field(default_factory=list)
    apps: list[AppConfig] = field(default_factory=list)
    host: str = "127.0.0.1"  # loopback by default; the admin API loads code
    port: int = 8000
    max_body_bytes: int = 1 << 20  # larger request bodies get 413
    max_inputs: int = 1024  # the most inputs one {"inputs": [...]} request may carry
    cache_size: int = 65536  # prediction cache entries (0 disables)
    query_log_size: int = 65536  # recent queries kept for /feedback
    ray_address: str | None = None  # a Ray cluster for kind "ray"; local ray.init otherwise
    ray_num_cpus: int | None = None  # CPUs for a local Ray (default: Ray's own)
    admin_token: str | None = None  # when set, /admin needs "Authorization: Bearer <token>"
    allowed_factories: list[str] | None = None  # module prefixes the admin API may load
    # Python's GIL switch interval while `run()` serves (None: leave Python's 5 ms). Short
    # intervals keep a thread replica's model from waiting ~5 ms for the GIL at each op while
    # the event loop is busy (the convoy effect); measured here, the fitted p99 margin of MLP
    # batches fell from ~12 ms to 1-6 ms at 0.5 ms.
    switch_interval_ms: float | None = 0.5

    def factory_allowed(self, factory: str) -> bool:
        """Whether the admin API may deploy ``factory`` (config-file models always may)."""
        if self.allowed_factories is None:
            return True
        module = factory.partition(":")[0]
        return any(
            module == p or module.startswith(p.rstrip(".") + ".") for p in self.allowed_factories
        )

    @classmethod
    def from_dict(cls, data: Any) -> ServerConfig:
        allowed = {
            "models",
            "apps",
            "host",
            "port",
            "max_body_bytes",
            "max_inputs",
            "cache_size",
            "query_log_size",
            "ray_address",
            "ray_num_cpus",
            "admin_token",
            "allowed_factories",
            "switch_interval_ms",
        }
        d = _fields(data, "server config", allowed, set())
        models_raw = d.get("models", [])
        apps_raw = d.get("apps", [])
        if not isinstance(models_raw, list) or not isinstance(apps_raw, list):
            raise ConfigError("config 'models' and 'apps' must be lists of objects")
        models = [ModelConfig.from_dict(m, f"models[{i}]") for i, m in enumerate(models_raw)]
        apps = [AppConfig.from_dict(a, f"apps[{i}]") for i, a in enumerate(apps_raw)]
        for what, names in (("model", [m.name for m in models]), ("app", [a.name for a in apps])):
            dup = sorted({n for n in names if names.count(n) > 1})
            if dup:
                raise ConfigError(f"{what} name(s) {dup} appear twice in the config; rename one")
        known = {m.name for m in models}
        for a in apps:
            missing = [m for m in a.models if m not in known]
            if missing:
                raise ConfigError(
                    f"app {a.name!r} links unknown model(s) {missing}; add them under 'models' "
                    f"(known: {sorted(known) or 'none'})"
                )
        host = d.get("host", "127.0.0.1")
        if not isinstance(host, str) or not host:
            raise ConfigError(f"host must be an address string such as '127.0.0.1', got {host!r}")
        ray_address = d.get("ray_address")
        if ray_address is not None and not isinstance(ray_address, str):
            raise ConfigError("ray_address must be a string such as 'ray://host:10001'")
        token = d.get("admin_token")
        if token is not None and (not isinstance(token, str) or not token):
            raise ConfigError("admin_token must be a non-empty string")
        prefixes = d.get("allowed_factories")
        if prefixes is not None and (
            not isinstance(prefixes, list) or not all(isinstance(p, str) and p for p in prefixes)
        ):
            raise ConfigError(
                "allowed_factories must be a list of module prefixes, e.g. ['mlcycle', 'myapp']"
            )
        switch = d.get("switch_interval_ms", 0.5)
        if switch is not None:
            switch = _num(switch, "switch_interval_ms", 0.01, 100.0)
        ray_cpus = d.get("ray_num_cpus")
        if ray_cpus is not None:
            ray_cpus = _int(ray_cpus, "ray_num_cpus", 1, 4096)
        return cls(
            models=models,
            apps=apps,
            host=host,
            port=_int(d.get("port", 8000), "port", 0, 65535),
            max_body_bytes=_int(d.get("max_body_bytes", 1 << 20), "max_body_bytes", 64, 1 << 31),
            max_inputs=_int(d.get("max_inputs", 1024), "max_inputs", 1, 1 << 20),
            cache_size=_int(d.get("cache_size", 65536), "cache_size", 0, 1 << 26),
            query_log_size=_int(d.get("query_log_size", 65536), "query_log_size", 0, 1 << 26),
            ray_address=ray_address,
            ray_num_cpus=ray_cpus,
            admin_token=token,
            allowed_factories=prefixes,
            switch_interval_ms=switch,
        )

    @classmethod
    def load(cls, source: str | Path | dict[str, Any] | ServerConfig | None) -> ServerConfig:
        """A config from a dict, a JSON file path, an existing config, or None (empty)."""
        if source is None:
            return cls()
        if isinstance(source, ServerConfig):
            return source
        if isinstance(source, dict):
            return cls.from_dict(source)
        path = Path(source)
        try:
            text = path.read_text()
        except OSError as exc:
            raise ConfigError(f"cannot read config file {str(path)!r}: {exc.strerror}") from None
        try:
            data = json.loads(text)
        except json.JSONDecodeError as exc:
            raise ConfigError(f"config file {str(path)!r} is not valid JSON: {exc}") from None
        return cls.from_dict(data)

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["models"] = [m.to_dict() for m in self.models]
        d["apps"] = [a.to_dict() for a in self.apps]
        if d.get("admin_token"):
            d["admin_token"] = "***"
        return d
