"""Applications: an SLO, a default, and a policy over the linked models (Clipper Sec. 5).

Policies:

- ``single``: the first linked model answers.
- ``exp3``: :class:`~mlcycle.serve.online.selection.Exp3` picks one model per query; feedback
  rewards it (Clipper Sec. 5.2.1).
- ``exp4``: every linked model is queried; :class:`~mlcycle.serve.online.ensemble.Exp4`
  combines the outputs that arrived by the deadline, so a straggler costs confidence, not time
  (Clipper Sec. 5.2.2-5.2.3); feedback updates each model's weight.
- ``cascade``: :class:`~mlcycle.serve.online.cascade.IDKCascade` asks the cheapest model
  first and defers while its confidence is below the stage's threshold (Wang et al., "IDK
  Cascades", UAI 2018); at the deadline the last output in hand answers.

Every query gets an answer by its deadline (SLO less a margin for sending): a model's output,
a cached one, or the app's default marked ``"default": true``.
"""

from __future__ import annotations

import asyncio
from collections import OrderedDict
from typing import TYPE_CHECKING, Any

from mlcycle.serve.online._config import AppConfig, ConfigError
from mlcycle.serve.online._metrics import AppMetrics
from mlcycle.serve.online._runtime import InputRejected, ModelRuntime, _Reason
from mlcycle.serve.online.cache import PredictionCache, input_digest

if TYPE_CHECKING:
    from collections.abc import Callable

NO_MODEL = _Reason("no_model")
_MISS = object()


class InputError(ValueError):
    """The query is malformed for its model (a 422 for the client)."""


def _shape_of(x: Any) -> list[int]:
    shape = []
    while isinstance(x, list):
        shape.append(len(x))
        if not x:
            break
        x = x[0]
    return shape


def check_shape(x: Any, shape: list[int], model: str) -> None:
    """Raise :class:`InputError` unless ``x`` is a nested list of ``shape`` (first entries)."""
    y = x
    for d in shape:
        if type(y) is not list or len(y) != d:
            raise InputError(
                f"input has shape {_shape_of(x)} but model {model!r} takes {shape}; send a "
                f"nested list of numbers of that shape"
            )
        y = y[0]


def build_policy(config: AppConfig) -> Any:
    """The selection or cascade object an app's policy needs (None for ``single``)."""
    models = config.models
    policy = config.policy
    if policy == "single" or not models:
        return None
    try:
        if policy == "exp3":
            from mlcycle.serve.online.selection import Exp3

            if config.policy_state:
                return Exp3.from_dict(config.policy_state)
            return Exp3(models, **config.policy_args)
        if policy == "exp4":
            from mlcycle.serve.online.ensemble import Exp4

            if config.policy_state:
                return Exp4.from_dict(config.policy_state)
            return Exp4(models, **config.policy_args)
        from mlcycle.serve.online.cascade import IDKCascade

        thresholds = config.thresholds
        if thresholds is None:
            raise ConfigError(
                f"app {config.name!r}: policy 'cascade' needs 'thresholds', one confidence in "
                f"[0, 1] per stage but the last, e.g. [0.9] for two models"
            )
        return IDKCascade(models, thresholds, **config.policy_args)
    except ConfigError:
        raise
    except Exception as exc:  # the policy classes validate their own arguments and state
        raise ConfigError(f"app {config.name!r}: policy {policy!r}: {exc}") from None


def _correct(output: Any, label: Any) -> bool | None:
    from mlcycle.serve.online.selection import zero_one_loss

    try:
        return zero_one_loss(output, label) == 0.0
    except (TypeError, ValueError):
        return None


class AppRuntime:
    """One registered application.

    Args:
        config: the app's configuration.
        models: the server's current model runtimes by name (shared, read at query time).
        cache: the server's prediction cache.
        log: the server's recent-query log for /feedback.
        next_id: makes the next query id.
    """

    def __init__(
        self,
        config: AppConfig,
        models: dict[str, ModelRuntime],
        cache: PredictionCache,
        log: QueryLog,
        next_id: Callable[[], str],
    ) -> None:
        self.metrics = AppMetrics()
        self._models = models
        self._cache = cache
        self._log = log
        self._next_id = next_id
        self.configure(config)

    def configure(self, config: AppConfig) -> None:
        """(Re)build from a config: validates the policy first, so a bad one changes nothing."""
        policy = build_policy(config)
        self.config = config
        self.name = config.name
        self.policy = policy
        self.slo_s = config.slo_ms / 1e3
        self.budget_s = (config.slo_ms - config.margin_ms) / 1e3
        self.default = config.default
        self.use_cache = config.cache
        self.keep_digest = config.cache or config.policy in ("exp3", "exp4")
        self.shed_json: dict[str, bytes] = {}  # reason -> pre-encoded default (server's door)

    # ---- answering -------------------------------------------------------------------------

    async def _ask(self, name: str, x: Any, deadline: float, digest: bytes | None) -> Any:
        """(output or a :class:`_Reason`, whether it came from the cache) for ``x``."""
        rt = self._models.get(name)
        if rt is None:
            return NO_MODEL, False
        shape = rt.input_shape
        if shape is not None:
            check_shape(x, shape, name)
        if digest is not None and self.use_cache:
            hit = self._cache.get(rt.name, rt.version, digest, _MISS)
            if hit is not _MISS:
                rt.metrics.cache_hits += 1
                return hit, True
            rt.metrics.cache_misses += 1
        try:
            out = await rt.submit(x, deadline, digest if self.use_cache else None)
        except InputRejected as exc:
            raise InputError(f"model {rt.key!r} could not process the input: {exc}") from None
        return out, False

    async def answer(self, x: Any, t0: float) -> dict[str, Any]:
        """Answer one input that arrived at loop time ``t0``; the response fields."""
        deadline = t0 + self.budget_s
        m = self.metrics
        m.requests += 1
        digest = input_digest(x) if self.keep_digest else None
        policy = self.config.policy
        models = self.config.models
        confidence = None
        record: tuple[Any, ...]
        if policy == "single" or self.policy is None:
            name = models[0] if models else ""
            out, cached = await self._ask(name, x, deadline, digest)
            record = ("single", name)
        elif policy == "exp3":
            name = self.policy.select()
            prob = self.policy.probability(name)
            out, cached = await self._ask(name, x, deadline, digest)
            record = ("exp3", name, prob)
        elif policy == "exp4":
            out, cached, name, confidence, record = await self._ensemble(x, deadline, digest)
        else:
            out, cached, name, confidence = await self._cascade(x, deadline, digest)
            record = ("cascade", name)
        qid = self._next_id()
        if isinstance(out, _Reason):
            m.default(out.why)
            self._log.add(qid, self.name, ("default",), None, digest)
            return self.default_answer(qid, out)
        m.answers += 1
        if cached:
            m.cache_hits += 1
        self._log.add(qid, self.name, record, out, digest)
        rt = self._models.get(name)
        return {
            "query_id": qid,
            "output": out,
            "default": False,
            "model": rt.key if rt is not None else name,
            "cached": cached,
            "confidence": confidence,
        }

    def default_answer(self, qid: str, reason: _Reason) -> dict[str, Any]:
        """The response fields of a query answered with the app's default."""
        return {
            "query_id": qid,
            "output": self.default,
            "default": True,
            "model": None,
            "cached": False,
            "confidence": None,
            "reason": reason.why,
        }

    def refused(self, reason: _Reason) -> str:
        """Count and log a query given the default before it was parsed; its id."""
        m = self.metrics
        m.requests += 1
        m.default(reason.why)
        qid = self._next_id()
        self._log.add(qid, self.name, ("default",), None, None)
        return qid

    async def _ensemble(self, x: Any, deadline: float, digest: bytes | None) -> tuple[Any, ...]:
        names = list(self.config.models)
        asks = [asyncio.ensure_future(self._ask(n, x, deadline, digest)) for n in names]
        results = await asyncio.gather(*asks, return_exceptions=True)
        outputs: dict[str, Any] = {}
        all_cached = True
        for n, res in zip(names, results, strict=True):
            if isinstance(res, InputError):
                raise res
            if isinstance(res, BaseException):
                raise res
            out, cached = res
            if not isinstance(out, _Reason):
                outputs[n] = out
                all_cached = all_cached and cached
        if not outputs:
            return NO_ANSWER, False, "", None, ("exp4",)
        try:
            combined, confidence = self.policy.combine(outputs)
        except (TypeError, ValueError) as exc:
            raise OutputError(
                f"app {self.name!r}: cannot combine the model outputs: {exc}"
            ) from None
        if combined is None:
            return NO_ANSWER, False, "", None, ("exp4",)
        return combined, all_cached, "ensemble", confidence, ("exp4", outputs)

    async def _cascade(self, x: Any, deadline: float, digest: bytes | None) -> tuple[Any, ...]:
        cascade = self.policy
        stage = 0
        name = cascade.first()
        last: tuple[Any, bool, str, float] | None = None
        while True:
            out, cached = await self._ask(name, x, deadline, digest)
            value = None if isinstance(out, _Reason) else out
            try:
                d = cascade.decide(stage, value)
            except (TypeError, ValueError) as exc:
                raise OutputError(f"app {self.name!r}: stage {name!r}: {exc}") from None
            if value is not None:
                last = (value, cached, name, d.confidence)
            if d.answered or isinstance(out, _Reason):
                if last is None:
                    return out if isinstance(out, _Reason) else NO_ANSWER, False, "", None
                return last
            stage += 1
            name = d.next_model

    # ---- feedback --------------------------------------------------------------------------

    def feedback(self, qid: str | None, x: Any, label: Any) -> dict[str, Any]:
        """Record the true label of an earlier query (by id, or by its input)."""
        if qid is None:
            qid = self._log.by_digest(input_digest(x), self.name)
            if qid is None:
                raise LookupError(
                    f"no recent query to app {self.name!r} had this input; send the "
                    f"'query_id' from the predict response instead"
                )
        entry = self._log.get(qid)
        if entry is None or entry[0] != self.name:
            raise LookupError(
                f"query {qid!r} is not a recent query of app {self.name!r} (the server keeps "
                f"the last {self._log.capacity} queries); check the app name and query_id"
            )
        _, record, output = entry
        m = self.metrics
        m.feedback += 1
        kind = record[0]
        correct = None if kind == "default" else _correct(output, label)
        if correct:
            m.feedback_correct += 1
        updated = False
        try:
            if kind == "exp3" and self.config.policy == "exp3" and record[1] in self.policy:
                self.policy.update(record[1], 1.0 if correct else 0.0, probability=record[2])
                updated = True
            elif kind == "exp4" and self.config.policy == "exp4":
                known = {k: v for k, v in record[1].items() if k in self.policy}
                if known:
                    self.policy.update(known, label)
                    updated = True
        except (TypeError, ValueError) as exc:
            raise InputError(f"feedback label {label!r} does not fit the outputs: {exc}") from None
        result: dict[str, Any] = {"query_id": qid, "correct": correct, "updated": updated}
        if self.config.policy in ("exp3", "exp4") and self.policy is not None:
            result["weights"] = self.policy.weights()
        return result

    def info(self) -> dict[str, Any]:
        """The app's config, counters and learned state for the admin API."""
        cfg = self.config.to_dict()
        cfg.pop("policy_state", None)
        m = self.metrics
        info: dict[str, Any] = {
            **cfg,
            "requests": m.requests,
            "answers": m.answers,
            "defaults": dict(m.defaults),
            "cache_hits": m.cache_hits,
        }
        if self.policy is not None and hasattr(self.policy, "to_dict"):
            info["policy_state"] = self.policy.to_dict()
            info["weights"] = self.policy.weights()
        return info


NO_ANSWER = _Reason("no_answer")  # an ensemble or cascade had no output in time


class OutputError(RuntimeError):
    """A policy could not use the models' outputs (a server-side configuration error)."""


def _atomic(x: Any) -> Any:
    """Lists (nested too) as tuples, so that a log entry of numbers holds no list.

    The garbage collector stops tracking a tuple of numbers and strings at its first young
    collection; a list it tracks for ever. Tens of thousands of logged outputs as lists would
    sit in the oldest generation, and every full collection would walk them all, pausing the
    server for tens of milliseconds at a time.
    """
    if type(x) is list:
        return tuple([_atomic(v) for v in x])
    return x


class QueryLog:
    """The last ``capacity`` queries: id -> (app, how it was answered, output).

    Outputs are kept with lists turned into tuples (see :func:`_atomic`), which the feedback
    path reads alike.
    """

    def __init__(self, capacity: int = 65536) -> None:
        self.capacity = capacity
        self._entries: OrderedDict[str, tuple[str, tuple[Any, ...], Any]] = OrderedDict()
        self._digests: OrderedDict[tuple[str, bytes], str] = OrderedDict()

    def add(
        self, qid: str, app: str, record: tuple[Any, ...], output: Any, digest: bytes | None
    ) -> None:
        if self.capacity == 0:
            return
        entries = self._entries
        entries[qid] = (app, record, _atomic(output))
        if len(entries) > self.capacity:
            entries.popitem(last=False)
        if digest is not None:
            digests = self._digests
            key = (app, digest)
            digests[key] = qid
            digests.move_to_end(key)
            if len(digests) > self.capacity:
                digests.popitem(last=False)

    def get(self, qid: str) -> tuple[str, tuple[Any, ...], Any] | None:
        return self._entries.get(qid)

    def by_digest(self, digest: bytes, app: str) -> str | None:
        return self._digests.get((app, digest))
