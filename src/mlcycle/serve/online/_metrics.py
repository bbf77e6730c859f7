"""Counters and histograms for ``GET /metrics`` in the Prometheus text format (version 0.0.4).

Kept in plain attributes and lists, so the hot path pays an attribute increment or a bisect,
and rendered only when scraped. Names follow Prometheus conventions: ``_total`` counters,
``_seconds`` histograms, labels ``app`` and ``model`` (``name:version``).
"""

from __future__ import annotations

from bisect import bisect_left
from collections.abc import Iterable
from typing import Any

LATENCY_BUCKETS_S = (
    0.0005,
    0.001,
    0.002,
    0.005,
    0.01,
    0.02,
    0.05,
    0.1,
    0.2,
    0.5,
    1.0,
    2.5,
    5.0,
)
BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024, 4096)


class Histogram:
    """A fixed-bucket histogram (counts per bucket, cumulated when rendered)."""

    __slots__ = ("bounds", "counts", "sum", "count")

    def __init__(self, bounds: Iterable[float]) -> None:
        self.bounds = tuple(bounds)
        self.counts = [0] * (len(self.bounds) + 1)
        self.sum = 0.0
        self.count = 0

    def observe(self, value: float) -> None:
        self.counts[bisect_left(self.bounds, value)] += 1
        self.sum += value
        self.count += 1

    def render(self, name: str, labels: str, out: list[str]) -> None:
        total = 0
        for bound, n in zip(self.bounds, self.counts, strict=False):
            total += n
            out.append(f'{name}_bucket{{{labels},le="{bound:g}"}} {total}')
        out.append(f'{name}_bucket{{{labels},le="+Inf"}} {self.count}')
        out.append(f"{name}_sum{{{labels}}} {self.sum:.9g}")
        out.append(f"{name}_count{{{labels}}} {self.count}")


def _esc(value: str) -> str:
    return value.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n")


class AppMetrics:
    """Per-application counters."""

    def __init__(self) -> None:
        self.requests = 0  # queries (an {"inputs": [...]} request counts each input)
        self.answers = 0  # answered by a model (or the cache)
        self.cache_hits = 0
        self.defaults: dict[str, int] = {}  # reason -> count
        self.slo_misses = 0  # answered after the SLO (should stay 0)
        self.client_errors = 0  # 4xx
        self.feedback = 0
        self.feedback_correct = 0
        self.latency = Histogram(LATENCY_BUCKETS_S)

    def default(self, reason: str) -> None:
        self.defaults[reason] = self.defaults.get(reason, 0) + 1


class ModelMetrics:
    """Per-model-version counters."""

    def __init__(self) -> None:
        self.queries = 0  # queued for a model call
        self.cache_hits = 0
        self.cache_misses = 0
        self.batches = 0
        self.model_errors = 0
        self.late = 0  # dropped before the model ran: could not finish by the deadline
        self.restarts = 0
        self.replicas = 0
        self.batch_size = Histogram(BATCH_BUCKETS)
        self.batch_latency = Histogram(LATENCY_BUCKETS_S)

    def observe_batch(self, size: int, latency_s: float) -> None:
        self.batches += 1
        self.batch_size.observe(size)
        self.batch_latency.observe(latency_s)


def render(
    apps: dict[str, AppMetrics], models: dict[str, tuple[ModelMetrics, int]], extra: dict[str, Any]
) -> str:
    """The Prometheus text exposition of all counters.

    Args:
        apps: app name -> its metrics.
        models: model key -> (its metrics, current queue length).
        extra: gauges without labels, e.g. {"cache_entries": 12}.
    """
    out: list[str] = []

    def head(name: str, kind: str, text: str) -> None:
        out.append(f"# HELP {name} {text}")
        out.append(f"# TYPE {name} {kind}")

    app_items = [(f'app="{_esc(n)}"', m) for n, m in sorted(apps.items())]
    model_items = [(f'model="{_esc(k)}"', m, q) for k, (m, q) in sorted(models.items())]

    head("mlcycle_app_requests_total", "counter", "Queries received per app.")
    out += [f"mlcycle_app_requests_total{{{lab}}} {m.requests}" for lab, m in app_items]
    head("mlcycle_app_answers_total", "counter", "Queries answered by a model or the cache.")
    out += [f"mlcycle_app_answers_total{{{lab}}} {m.answers}" for lab, m in app_items]
    head("mlcycle_app_cache_hits_total", "counter", "Queries answered from the cache.")
    out += [f"mlcycle_app_cache_hits_total{{{lab}}} {m.cache_hits}" for lab, m in app_items]
    head(
        "mlcycle_app_defaults_total",
        "counter",
        "Queries given the app's default (SLO could not be met), by reason.",
    )
    for lab, m in app_items:
        for reason, n in sorted(m.defaults.items()):
            out.append(f'mlcycle_app_defaults_total{{{lab},reason="{reason}"}} {n}')
    head("mlcycle_app_slo_misses_total", "counter", "Responses sent after the SLO.")
    out += [f"mlcycle_app_slo_misses_total{{{lab}}} {m.slo_misses}" for lab, m in app_items]
    head("mlcycle_app_client_errors_total", "counter", "Queries refused with a 4xx.")
    out += [f"mlcycle_app_client_errors_total{{{lab}}} {m.client_errors}" for lab, m in app_items]
    head("mlcycle_app_feedback_total", "counter", "Feedback received.")
    out += [f"mlcycle_app_feedback_total{{{lab}}} {m.feedback}" for lab, m in app_items]
    head("mlcycle_app_feedback_correct_total", "counter", "Feedback that matched the answer.")
    out += [
        f"mlcycle_app_feedback_correct_total{{{lab}}} {m.feedback_correct}" for lab, m in app_items
    ]
    head("mlcycle_app_latency_seconds", "histogram", "Server-side latency per query.")
    for lab, m in app_items:
        m.latency.render("mlcycle_app_latency_seconds", lab, out)

    head("mlcycle_model_queries_total", "counter", "Queries queued for a model call.")
    out += [f"mlcycle_model_queries_total{{{lab}}} {m.queries}" for lab, m, _ in model_items]
    head("mlcycle_model_cache_hits_total", "counter", "Prediction cache hits.")
    out += [f"mlcycle_model_cache_hits_total{{{lab}}} {m.cache_hits}" for lab, m, _ in model_items]
    head("mlcycle_model_cache_misses_total", "counter", "Prediction cache misses.")
    out += [
        f"mlcycle_model_cache_misses_total{{{lab}}} {m.cache_misses}" for lab, m, _ in model_items
    ]
    head("mlcycle_model_errors_total", "counter", "Batches on which the model raised.")
    out += [f"mlcycle_model_errors_total{{{lab}}} {m.model_errors}" for lab, m, _ in model_items]
    head(
        "mlcycle_model_late_total",
        "counter",
        "Queries left out of a batch (default answer): they could not finish by the deadline.",
    )
    out += [f"mlcycle_model_late_total{{{lab}}} {m.late}" for lab, m, _ in model_items]
    head("mlcycle_model_restarts_total", "counter", "Replica restarts after a crash.")
    out += [f"mlcycle_model_restarts_total{{{lab}}} {m.restarts}" for lab, m, _ in model_items]
    head("mlcycle_model_replicas", "gauge", "Replicas running.")
    out += [f"mlcycle_model_replicas{{{lab}}} {m.replicas}" for lab, m, _ in model_items]
    head("mlcycle_model_queue_length", "gauge", "Queries waiting for a batch.")
    out += [f"mlcycle_model_queue_length{{{lab}}} {q}" for lab, _, q in model_items]
    head("mlcycle_model_batch_size", "histogram", "Queries per model call.")
    for lab, m, _ in model_items:
        m.batch_size.render("mlcycle_model_batch_size", lab, out)
    head("mlcycle_model_batch_latency_seconds", "histogram", "Model call latency per batch.")
    for lab, m, _ in model_items:
        m.batch_latency.render("mlcycle_model_batch_latency_seconds", lab, out)

    for name, value in sorted(extra.items()):
        head(f"mlcycle_{name}", "gauge", name.replace("_", " ") + ".")
        out.append(f"mlcycle_{name} {value}")
    return "\n".join(out) + "\n"
