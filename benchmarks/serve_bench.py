"""Claim (issue 5): mlcycle's online server adds <= 1.0 ms p50 over a bare ASGI handler; its
adaptive batching sustains >= 3x the throughput of no batching at the same p99 SLO; under
Poisson arrivals at 90% of its peak it answers >= 1.0x LitServe's and >= 2.0x Ray Serve's
queries within the SLO per second; under bursty load (gamma, CV 4) >= 99% of queries get an
answer or the marked default within the SLO.

What runs. Every server is its own process group pinned to core 0; this script, which is also
the load generator (``mlcycle.serve.online.loadgen``: a minimal keep-alive HTTP/1.1 client on
uvloop, ~0.05 ms of client CPU per query; ``--client aiohttp`` to cross-check), pins itself to
core 1, as the anchors in ``shared/anchors/serve_peers_2026-11-27.md`` did (they used aiohttp).
One worker or replica each:

- ``mlcycle``: ``mlcycle serve start --config FILE`` with apps ``noop`` (no batching),
  ``noop_aimd``, ``mlp`` (adaptive AIMD batching, max batch 64), ``mlp_nb`` (no batching),
  ``wide`` and ``wide_nb`` (the batch-friendly MLP, AIMD and none), each one ``--mlcycle-kind``
  replica (thread by default), cache off (the load repeats inputs), SLO ``--slo-ms``, default
  answer uniform class scores;
- ``bare``: a Starlette handler on uvicorn calling the model inline (the floor);
- ``litserve``: one CPU worker, batched (max batch 16, 5 ms timeout, as the anchors) and, in the
  full run, unbatched;
- ``ray``: Ray Serve, one replica, ``@serve.batch`` at its defaults (10, 10 ms) with
  ``max_ongoing_requests=64``; in the full run also the unbatched no-op at Ray's defaults.

(see ``benchmarks/_serve_peers.py``). Models: ``noop`` echoes its input; ``mlp`` is the anchors'
Linear(256,1024)-ReLU-Linear(1024,1024)-ReLU-Linear(1024,10), softmax, seed 0, one thread;
every server's answer to the same input is checked against the bare server's. ``wide`` is
``examples.wide_mlp`` with ``--ratio-hidden`` (2048) hidden units, the batching ratio's model:
one query costs ~1.5 ms, a batch of 64 ~8 ms (the anchors' MLP costs ~0.4 ms alone and
~0.035 ms per query at batch 64, less than the HTTP frontend's ~0.1-0.15 ms per query, so no
batching can triple its throughput on one core; the issue asks for "a batch-friendly MLP or
CNN"). Each request posts ``{"input": [256 floats]}`` (64 seeded inputs in turn).

Loads (latency from each query's scheduled time; percentiles over all queries, failures
included): closed-loop concurrency sweeps; open-loop Poisson at a fraction of mlcycle's peak;
open-loop bursts (gamma inter-arrivals, CV ``--burst-cv``) at several mean rates.

The JSON fields (last stdout line under ``--json``):

- ``overhead_p50_ms``: median over alternating 1-client rounds of p50(mlcycle ``noop``) minus
  p50(bare no-op) (``overhead_p50_ms_rounds`` every round); ``overhead_p50_ms_aimd`` the same
  with AIMD batching on the no-op.
- ``batching_throughput_ratio``: ``wide`` over ``wide_nb``, each at its peak: the highest
  closed-loop throughput whose p99 is within the SLO with >= 99% real (non-default) answers
  within it (``loadgen.max_throughput_within_slo``). The two sweeps run interleaved, point by
  point, in ``ratio_rounds`` rounds (2 quick, 3 full); the field is the median of the rounds'
  ratios, ``batching_throughput_ratio_range`` their min and max, ``batching_rounds`` each
  round's peaks, and ``batching_model`` names the model.
- ``goodput_vs_litserve`` / ``goodput_vs_rayserve``: real answers within the SLO per second
  under Poisson arrivals at ``--load-fraction`` (0.9) of our peak on the anchors' ``mlp``
  (``reference_peak_rps``, AIMD), mlcycle over the peer's best set-up (the median of
  ``poisson_rounds`` rounds for mlcycle). A peer with no answer within the SLO is credited with
  one, so the ratio stays finite (a lower bound). ``batching_ratio_vs_bare`` (full run): our
  ``mlp`` peak over the bare inline server's.
- ``burst_within_slo_or_default``: under gamma arrivals (CV 4) at a mean rate of
  ``--burst-fraction`` (0.5) of our peak (``burst_load_fraction``, ``burst_offered_rps``), the
  fraction of queries answered (real or marked default) within the SLO, measured at the
  client, pooled over ``burst_rounds`` rounds of different arrival times (``burst_rounds`` in
  the JSON: each round, with the client's own lag). Why half the peak: the issue fixes 90% for
  the goodput comparison but no load for bursts; at CV 4 most queries come in clumps a few ms
  long at many times the mean rate, so at half the peak the clumps are still far beyond what
  one core can answer while the mean is a load the server can carry. At 90% the mean itself
  nearly saturates the HTTP frontend and the backlog of one clump runs into the next.
  ``burst_by_load`` holds the same figures at each of ``plan.burst_fractions`` (25-90% of our
  peak; one round each but the headline's), so no single load hides the others; the printed
  table shows them too.

In ``--quick`` the peers run only what the claims need (their Poisson point at the reference
rate, after a short warm-up), and Ray Serve, whose start-up takes 15-45 s here, starts during
mlcycle's throughput points on the client core at nice 19 (the client, at nice 0, preempts it;
the 1-client latency rounds come before it) and is moved to the server core at nice 0 before
it is measured (a note says so if the move fails, e.g. without the right to lower niceness).

``rows`` holds every load point (server, model, set-up, load, throughput, goodput, p50/p99, SLO
fractions, defaults, mlcycle's mean batch size from ``/metrics``, and the client's own lag and
SLO attainment timed from the send: when those two differ much, the client core was busy and
the point is noisy). Figures in ``--out``: ``serve_latency_cdf.png`` and
``serve_throughput_vs_load.png``; ``rows.jsonl`` and the mlcycle config go there too.

Usage::

    python benchmarks/serve_bench.py --quick --json   # < 2 min on 2 cores
    python benchmarks/serve_bench.py                  # ~10 min: longer points, more rounds
    python benchmarks/serve_bench.py --servers bare,litserve  # develop against some servers

Without a working ``mlcycle serve start`` the peers still run, the mlcycle fields are null,
and the reference load is the bare server's peak instead (a note says so). Exit code 0 unless
the harness itself failed.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import random
import shutil
import signal
import socket
import statistics
import sys
import time
import urllib.request
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
sys.path.insert(0, str(HERE.parent / "src"))  # a checkout without `pip install -e`

from _common import make_console, make_parser, print_json_last  # noqa: E402
from _serve_peers import ServerProcess, peer_command, post_json  # noqa: E402
from mlcycle.serve.online import loadgen  # noqa: E402

NAME = "serve_bench"
CLAIM = (
    "mlcycle's online server adds <= 1.0 ms p50 over a bare ASGI handler; adaptive batching gives "
    ">= 3x the throughput of no batching at the same p99 SLO; at 90% of its peak under Poisson "
    "load its goodput is >= 1.0x LitServe's and >= 2.0x Ray Serve's; >= 99% of bursty queries "
    "get an answer or the marked default within the SLO."
)
TARGETS = {
    "overhead_p50_ms": ("<=", 1.0),
    "batching_throughput_ratio": (">=", 3.0),
    "goodput_vs_litserve": (">=", 1.0),
    "goodput_vs_rayserve": (">=", 2.0),
    "burst_within_slo_or_default": (">=", 0.99),
}
SERVER_CORES, CLIENT_CORES = [0], [1]
IN_FEATURES, CLASSES = 256, 10
ALL_SERVERS = ("mlcycle", "bare", "litserve", "ray")
RAY_SETUPS: list[tuple[str, str, dict[str, Any]]] = [
    ("mlp", "batch (10, 10 ms), cap 64", {"batch": True})
]


@dataclass
class Plan:
    """Durations and load points of a run (``--quick`` or full)."""

    quick: bool
    overhead_rounds: int  # alternating 1-client rounds, bare vs mlcycle no-op
    overhead_s: float  # seconds per round and server
    point_s: float  # seconds per closed-loop point
    warmup_s: float  # closed-loop warm-up per point (left out)
    sweep: tuple[int, ...]  # closed-loop concurrencies for our peak on the anchors' MLP
    ratio_rounds: int  # interleaved rounds of the batching-ratio sweeps (median reported)
    ratio_sweep_batched: tuple[int, ...]  # concurrencies, batch-friendly MLP with AIMD
    ratio_sweep_unbatched: tuple[int, ...]  # the same model without batching
    open_s: float  # arrival window of each open-loop point
    drain_s: float  # wait for stragglers after the last arrival
    poisson_rounds: int  # Poisson points at the reference rate (median goodput reported)
    burst_rounds: int  # gamma bursts at --burst-fraction of our peak (pooled: the headline)
    burst_fractions: tuple[float, ...]  # mean burst loads reported in burst_by_load
    burst_other_rounds: int  # rounds at each of those other than --burst-fraction
    offered_fractions: tuple[float, ...]  # open-loop sweep for the load plot (mlcycle, bare)
    peer_offered_fractions: tuple[float, ...]  # the same for LitServe and Ray
    extra_peers: bool  # peers' closed-loop points, LitServe unbatched, Ray no-op, bare sweeps
    budget_s: float  # optional points (load sweep, extra peer set-ups) are skipped past this


QUICK = Plan(
    quick=True,
    overhead_rounds=3,
    overhead_s=0.8,
    point_s=1.0,
    warmup_s=0.25,
    sweep=(8, 16, 32, 64),
    ratio_rounds=2,
    ratio_sweep_batched=(16, 32, 64, 96),
    ratio_sweep_unbatched=(4, 8, 16, 24),
    open_s=3.0,
    drain_s=1.0,
    poisson_rounds=1,
    burst_rounds=2,
    burst_fractions=(0.25, 0.5, 0.75, 0.9),
    burst_other_rounds=1,
    offered_fractions=(0.9,),
    peer_offered_fractions=(0.9,),
    extra_peers=False,
    budget_s=100.0,
)
FULL = Plan(
    quick=False,
    overhead_rounds=5,
    overhead_s=2.0,
    point_s=2.5,
    warmup_s=0.5,
    sweep=(1, 2, 4, 8, 16, 32, 64, 128),
    ratio_rounds=3,
    ratio_sweep_batched=(4, 8, 16, 32, 48, 64, 96, 128),
    ratio_sweep_unbatched=(1, 2, 4, 8, 12, 16, 24, 32),
    open_s=8.0,
    drain_s=5.0,
    poisson_rounds=3,
    burst_rounds=3,
    burst_fractions=(0.25, 0.5, 0.75, 0.9),
    burst_other_rounds=2,
    offered_fractions=(0.25, 0.5, 0.75, 0.9, 1.1, 1.4),
    peer_offered_fractions=(0.25, 0.5, 0.9),
    extra_peers=True,
    budget_s=540.0,
)


@dataclass
class Row:
    """One load point against one server."""

    server: str  # mlcycle / bare / litserve / ray
    model: str  # noop / mlp
    setup: str  # e.g. "aimd", "none", "batch 16 / 5 ms"
    load: str  # e.g. "c=32", "poisson 900/s", "gamma cv4 900/s"
    stats: loadgen.LoadSummary
    role: str = ""  # "reference" (Poisson at the reference rate) or "burst": in the CDF plot
    mean_batch: float | None = None  # mlcycle: mean queries per model call (from /metrics)
    latencies_ms: list[float] = field(default_factory=list, repr=False)  # for the CDF plot

    def to_dict(self) -> dict[str, Any]:
        head = {"server": self.server, "model": self.model, "setup": self.setup}
        extra = {"role": self.role, "mean_batch": self.mean_batch}
        return head | {"load": self.load} | self.stats.to_dict() | extra


# ------------------------------------------------------------------------------------------
# Helpers


def free_port() -> int:
    """A TCP port free on loopback right now."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def make_bodies(n: int = 64, seed: int = 0) -> list[bytes]:
    """``n`` request bodies ``{"input": [256 floats]}`` (4 decimals), seeded."""
    rng = random.Random(seed)
    return [
        json.dumps({"input": [round(rng.uniform(-1, 1), 4) for _ in range(IN_FEATURES)]}).encode()
        for _ in range(n)
    ]


def mlcycle_command(config_path: Path, port: int) -> list[str]:
    """``mlcycle serve start`` from this interpreter's environment."""
    exe = Path(sys.executable).parent / "mlcycle"
    head = [str(exe)] if exe.exists() else [sys.executable, "-m", "mlcycle.cli"]
    if not exe.exists() and shutil.which("mlcycle"):
        head = [str(shutil.which("mlcycle"))]
    return [*head, "serve", "start", "--config", str(config_path)] + [
        "--host",
        "127.0.0.1",
        "--port",
        str(port),
    ]


def mlcycle_config(slo_ms: float, kind: str, hidden: int, wide_hidden: int) -> dict[str, Any]:
    """The mlcycle server config: a no-op, the anchors' MLP and the batch-friendly MLP, each
    with and without batching (apps of the same names)."""
    examples = "mlcycle.serve.online.examples"
    mlp_args = {"in_features": IN_FEATURES, "hidden": hidden, "classes": CLASSES, "seed": 0}
    wide_args = mlp_args | {"hidden": wide_hidden}

    def model(name: str, factory: str, policy: str, args: dict[str, Any]) -> dict[str, Any]:
        batching: dict[str, Any] = {"policy": policy}
        if policy != "none":
            batching |= {"max_batch_size": 64, "wait_ms": 0.0}
        return {
            "name": name,
            "version": "1",
            "factory": f"{examples}:{factory}",
            "args": args,
            "replicas": 1,
            "kind": kind,
            "batching": batching,
        }

    def app(name: str, default: Any) -> dict[str, Any]:
        return {
            "name": name,
            "slo_ms": slo_ms,
            "default": default,
            "models": [name],
            "policy": "single",
            "cache": False,  # the load repeats 64 inputs: a cache would answer for the model
        }

    uniform = [1.0 / CLASSES] * CLASSES
    models = [
        model("noop", "noop", "none", {}),
        model("noop_aimd", "noop", "aimd", {}),
        model("mlp", "mlp", "aimd", mlp_args),
        model("mlp_nb", "mlp", "none", mlp_args),
        model("wide", "wide_mlp", "aimd", wide_args),
        model("wide_nb", "wide_mlp", "none", wide_args),
    ]
    apps = [app(m["name"], None if m["name"].startswith("noop") else uniform) for m in models]
    return {"models": models, "apps": apps}


def batch_counts(base_url: str, model: str) -> tuple[float, float] | None:
    """(sum, count) of mlcycle's ``mlcycle_model_batch_size`` histogram for ``model``, read
    from ``/metrics``; None when the server does not export it."""
    try:
        with urllib.request.urlopen(f"{base_url}/metrics", timeout=5) as resp:
            text = resp.read().decode()
    except (OSError, ValueError):
        return None
    found: dict[str, float] = {}
    for line in text.splitlines():
        for part in ("sum", "count"):
            head = f"mlcycle_model_batch_size_{part}{{"
            if line.startswith(head) and (f'model="{model}"' in line or f'model="{model}:' in line):
                found[part] = found.get(part, 0.0) + float(line.rsplit(" ", 1)[1])
    if set(found) != {"sum", "count"}:
        return None
    return found["sum"], found["count"]


def output_of(answer: Any) -> Any:
    """The model output in a server's JSON answer (``{"output": ...}``)."""
    return answer.get("output") if isinstance(answer, dict) else None


def real_answer(url: str, body: bytes, timeout_s: float) -> Any:
    """POST ``body`` until the answer is not a marked default (a model still warming up);
    raises TimeoutError after ``timeout_s``."""
    t0 = time.monotonic()
    while True:
        answer = post_json(url, body)
        if not (isinstance(answer, dict) and answer.get("default")):
            return answer
        if time.monotonic() - t0 > timeout_s:
            raise TimeoutError(f"only default answers from {url} for {timeout_s:.0f} s")
        time.sleep(0.1)


def max_abs_diff(a: Any, b: Any) -> float:
    """Largest absolute difference between two equal-shaped nested lists; inf if shapes differ."""
    if isinstance(a, (int, float)) and isinstance(b, (int, float)):
        return abs(float(a) - float(b))
    if isinstance(a, list) and isinstance(b, list) and len(a) == len(b):
        return max((max_abs_diff(x, y) for x, y in zip(a, b, strict=True)), default=0.0)
    return math.inf


def ratio(ours: float | None, theirs: float | None, floor: float = 0.0) -> float | None:
    """``ours / max(theirs, floor)``; None when either is missing."""
    if ours is None or theirs is None:
        return None
    den = max(theirs, floor)
    return ours / den if den > 0 else None


def settle(url: str, body: bytes, max_s: float, fast_ms: float) -> float:
    """Wait until the server answers 3 queries in a row within ``fast_ms`` (it has worked off
    an earlier overload), at most ``max_s``; the seconds waited."""
    t0, good = time.monotonic(), 0
    while good < 3 and time.monotonic() - t0 < max_s:
        t = time.perf_counter()
        try:
            req = urllib.request.Request(url, body, {"Content-Type": "application/json"})
            with urllib.request.urlopen(req, timeout=max_s) as resp:
                resp.read()
            good = good + 1 if (time.perf_counter() - t) * 1000 <= fast_ms else 0
        except OSError:
            good = 0
            time.sleep(0.1)
    return time.monotonic() - t0


# ------------------------------------------------------------------------------------------
# The run


class Bench:
    """Starts servers, runs load points against them, and keeps the rows."""

    def __init__(self, args: Any, console: Any, plan: Plan) -> None:
        self.args, self.console, self.plan = args, console, plan
        self.slo_ms: float = args.slo_ms
        self.bodies = make_bodies(seed=args.seed)
        self.rows: list[Row] = []
        self.notes: list[str] = []
        self.t0 = time.monotonic()
        self.out: Path = args.out
        self.out.mkdir(parents=True, exist_ok=True)

    # -- bookkeeping
    def elapsed(self) -> float:
        return time.monotonic() - self.t0

    def over_budget(self) -> bool:
        return self.elapsed() > self.plan.budget_s

    def note(self, text: str) -> None:
        self.notes.append(text)
        self.console.print(f"[yellow]note[/]: {text}")

    def add(self, row: Row) -> Row:
        self.rows.append(row)
        s = row.stats
        lag = f" lag p99 {s.client_lag_p99_ms:.1f}" if s.client_lag_p99_ms > 2 else ""
        self.console.print(
            f"[{self.elapsed():5.0f}s] {row.server:8} {row.model:4} {row.setup:16} {row.load:18} "
            f"{s.throughput_rps:7.0f}/s good {s.goodput_rps:7.0f}/s p50 {s.p50_ms:7.2f} "
            f"p99 {s.p99_ms:8.2f} ms in-SLO {s.within_slo:.3f} default {s.default_share:.3f}"
            f" failed {s.failed}{lag}" + (f" batch {row.mean_batch:.1f}" if row.mean_batch else "")
        )
        return row

    # -- servers
    def start(
        self, name: str, cmd: Sequence[str], url: str, *, background: bool = False
    ) -> ServerProcess:
        """Start a server on the server core; ``background``: on the client core at the lowest
        priority instead (moved with :meth:`ServerProcess.move` before it is measured)."""
        log = self.out / f"{name}.log"
        server = ServerProcess(
            name,
            cmd,
            url=url,
            probe_body=self.bodies[0],
            cores=(CLIENT_CORES if background else SERVER_CORES) if self.args.pinned else None,
            log_path=log,
            nice=19 if background else 0,
        )
        return server

    def ready(self, server: ServerProcess, timeout_s: float) -> ServerProcess | None:
        """Wait for ``server``; on failure note it, stop it and return None."""
        try:
            took = server.wait_ready(timeout_s)
        except RuntimeError as exc:
            self.note(f"{server.name} did not start: {str(exc)[-600:]}")
            server.stop()
            return None
        self.console.print(f"{server.name} ready in {took:.1f} s")
        return server

    def stop(self, server: ServerProcess | None) -> None:
        if server is None:
            return
        server.stop()
        left = server.leftovers()
        if left:
            self.note(f"{server.name}: processes {left} outlived stop()")

    # -- loads
    def _batches(self, server: str, url: str) -> tuple[str, tuple[float, float] | None] | None:
        """Before a point on mlcycle: its base URL and model's batch counters."""
        if server != "mlcycle":
            return None
        base, app = url.rsplit("/", 2)[:2]
        return base, batch_counts(base, app)

    def _mean_batch(self, before: tuple[str, Any] | None, url: str) -> float | None:
        if not before or before[1] is None:
            return None
        after = batch_counts(before[0], url.rsplit("/", 2)[1])
        if after is None or after[1] <= before[1][1]:
            return None
        return (after[0] - before[1][0]) / (after[1] - before[1][1])

    def closed(
        self,
        server: str,
        model: str,
        setup: str,
        url: str,
        concurrency: int,
        seconds: float,
        warmup_s: float | None = None,
    ) -> Row:
        """One closed-loop point (its first ``warmup_s`` left out)."""
        before = self._batches(server, url)
        samples, span = loadgen.closed_loop(
            url,
            self.bodies,
            concurrency,
            seconds,
            warmup_s=self.plan.warmup_s if warmup_s is None else warmup_s,
            timeout_s=self.args.timeout_s,
            client=self.args.client,
        )
        stats = loadgen.summarize(samples, slo_ms=self.slo_ms, span_s=span, concurrency=concurrency)
        row = Row(server, model, setup, f"c={concurrency}", stats)
        row.mean_batch = self._mean_batch(before, url)
        return self.add(row)

    def open(
        self,
        server: str,
        model: str,
        setup: str,
        url: str,
        rate_rps: float,
        pattern: str,
        role: str = "",
        settle_after: bool = True,
        round_: int = 0,
    ) -> Row:
        """One open-loop point. Every server gets the same arrival times at the same rate (and
        round: rounds draw new arrival times)."""
        seed = self.args.seed + (1 if pattern == "gamma" else 0) + 100 * round_
        if pattern == "poisson":
            arrivals = loadgen.poisson_arrivals(rate_rps, self.plan.open_s, seed=seed)
            label = f"poisson {rate_rps:.0f}/s"
        else:
            arrivals = loadgen.gamma_arrivals(
                rate_rps, self.plan.open_s, cv=self.args.burst_cv, seed=seed
            )
            label = f"gamma cv{self.args.burst_cv:g} {rate_rps:.0f}/s"
        before = self._batches(server, url)
        samples, window = loadgen.open_loop(
            url,
            self.bodies,
            arrivals,
            timeout_s=self.args.timeout_s,
            drain_s=self.plan.drain_s,
            client=self.args.client,
        )
        stats = loadgen.summarize(
            samples, slo_ms=self.slo_ms, span_s=window, offered_rps=len(arrivals) / window
        )
        row = Row(server, model, setup, label, stats, role)
        row.mean_batch = self._mean_batch(before, url)
        self.add(row)
        row.latencies_ms = [s.latency_s * 1000 for s in samples]
        if not settle_after:  # the server is stopped next
            return row
        waited = settle(url, self.bodies[0], max(4.0, self.plan.drain_s * 2), self.slo_ms / 2)
        if waited > 1:
            self.console.print(f"  ({server} took {waited:.1f} s to settle)")
        return row

    def warm(self, url: str) -> None:
        seconds = 0.3 if self.plan.quick else 1.0
        loadgen.closed_loop(url, self.bodies, 8, seconds, client=self.args.client)

    def overhead_rounds(self, bare_url: str, ours: dict[str, str]) -> dict[str, list[float]]:
        """Alternate 1-client rounds on the bare no-op and each of ``ours`` (name -> url);
        p50(ours) - p50(bare) per round and name."""
        diffs: dict[str, list[float]] = {name: [] for name in ours}
        seconds, warm = self.plan.overhead_s, 0.1
        for _ in range(self.plan.overhead_rounds):
            bare = self.closed("bare", "noop", "inline", bare_url, 1, seconds, warm)
            for name, url in ours.items():
                mine = self.closed("mlcycle", "noop", name, url, 1, seconds, warm)
                diffs[name].append(mine.stats.p50_ms - bare.stats.p50_ms)
        return diffs

    def ratio_rounds(self, batched_url: str, unbatched_url: str, model: str) -> dict[str, Any]:
        """The batching ratio from interleaved closed-loop sweeps of one model with AIMD and
        without batching: point by point, alternating which goes first, for
        ``plan.ratio_rounds`` rounds. Each round gives a peak per set-up (the highest
        throughput whose p99 is within the SLO with >= 99% real answers in it) and their ratio;
        the claim is the median over rounds. A sweep stops early in a round once a point is
        past the set-up's peak and gives under half of its queries a real answer in time (the
        larger concurrencies would only be worse)."""
        plan = self.plan
        sweeps = {"aimd": plan.ratio_sweep_batched, "none": plan.ratio_sweep_unbatched}
        urls = {"aimd": batched_url, "none": unbatched_url}
        per_round: list[dict[str, Any]] = []
        for url in urls.values():
            self.warm(url)
        for r in range(plan.ratio_rounds):
            rows: dict[str, list[Row]] = {"aimd": [], "none": []}
            done = {"aimd": False, "none": False}
            order = ("aimd", "none") if r % 2 == 0 else ("none", "aimd")
            for i in range(max(len(v) for v in sweeps.values())):
                for setup in order:
                    if done[setup] or i >= len(sweeps[setup]):
                        continue
                    c = sweeps[setup][i]
                    row = self.closed("mlcycle", model, setup, urls[setup], c, plan.point_s)
                    rows[setup].append(row)
                    best = loadgen.max_throughput_within_slo([x.stats for x in rows[setup]])
                    if best is not None and row.stats.real_within_slo < 0.5:
                        done[setup] = True
            best = {
                k: loadgen.max_throughput_within_slo([x.stats for x in v]) for k, v in rows.items()
            }
            peaks = {k: (b.throughput_rps if b else None) for k, b in best.items()}
            per_round.append(
                {
                    "peak_rps": peaks,
                    "at_clients": {k: (b.concurrency if b else None) for k, b in best.items()},
                    "ratio": ratio(peaks["aimd"], peaks["none"]),
                }
            )
        ratios = [x["ratio"] for x in per_round if x["ratio"] is not None]
        return {
            "ratio": statistics.median(ratios) if ratios else None,
            "ratio_min": min(ratios, default=None),
            "ratio_max": max(ratios, default=None),
            "rounds": per_round,
        }


def pooled(rows: Sequence[Row]) -> dict[str, Any]:
    """Burst figures pooled over rounds (weighted by queries), and each round's."""
    n = sum(r.stats.n for r in rows)

    def mean(key: str) -> float | None:
        return sum(getattr(r.stats, key) * r.stats.n for r in rows) / n if n else None

    return {
        "within_slo_or_default": mean("within_slo"),
        "within_slo_from_send": mean("within_slo_from_send"),
        "default_share": mean("default_share"),
        "n": n,
        "rounds": [
            {
                "within_slo_or_default": r.stats.within_slo,
                "within_slo_from_send": r.stats.within_slo_from_send,
                "default_share": r.stats.default_share,
                "client_lag_p99_ms": r.stats.client_lag_p99_ms,
            }
            for r in rows
        ],
    }


def burst_loads(bench: Bench, url: str, ref_peak: float) -> dict[str, Any]:
    """Gamma bursts on our MLP at each mean load of ``plan.burst_fractions`` (of our peak),
    lowest first; the headline is the one at ``--burst-fraction``, over ``plan.burst_rounds``
    rounds, the others over ``plan.burst_other_rounds``. Returns the JSON fields."""
    plan, headline = bench.plan, bench.args.burst_fraction
    fractions = sorted(set(plan.burst_fractions) | {headline})
    by_load: list[dict[str, Any]] = []
    out: dict[str, Any] = {"burst_load_fraction": headline}
    for fraction in fractions:
        main = math.isclose(fraction, headline)
        rate = fraction * ref_peak
        n_rounds = plan.burst_rounds if main else plan.burst_other_rounds
        rows = [
            bench.open(
                "mlcycle", "mlp", "aimd", url, rate, "gamma", "burst" if main else "", round_=r
            )
            for r in range(n_rounds)
        ]
        figures = pooled(rows)
        by_load.append({"fraction": fraction, "offered_rps": rate} | figures)
        if main:
            out["burst_within_slo_or_default"] = figures["within_slo_or_default"]
            out["burst_default_share"] = figures["default_share"]
            out["burst_offered_rps"] = rate
            out["burst_rounds"] = figures["rounds"]
    out["burst_by_load"] = by_load
    return out


def check_same(bench: Bench, name: str, server: ServerProcess, reference: Any) -> None:
    """Note when ``server``'s MLP answer to body 0 differs from the bare server's."""
    if reference is None:
        return
    try:
        got = output_of(real_answer(server.url, bench.bodies[0], 30.0))
    except (OSError, ValueError, TimeoutError) as exc:
        bench.note(f"{name}: could not probe its MLP answer ({exc})")
        return
    diff = max_abs_diff(got, reference)
    if diff > 1e-5:
        bench.note(f"{name}'s MLP answers differ from the bare server's (max |diff| {diff:.3g})")


def run_peer(
    bench: Bench,
    kind: str,
    model: str,
    setup: str,
    kw: dict[str, Any],
    reference: Any,
    rate: float,
    ref_peak: float,
    started: ServerProcess | None = None,
) -> Row | None:
    """Start one peer set-up alone on the server core (or take ``started``, one started in
    the background, and move it there), run its points, stop it. Returns its Poisson row at
    the reference rate (MLP only; measured first, on a settled server)."""
    plan = bench.plan
    if started is not None:
        server, url = started, started.url
        problem = server.move(SERVER_CORES if bench.args.pinned else None, nice=0)
        if problem:
            bench.note(f"{kind} started in the background could not be moved back ({problem})")
    else:
        port = free_port()
        url = f"http://127.0.0.1:{port}/predict"
        cmd = peer_command(kind, model, port, hidden=bench.args.mlp_hidden, **kw)
        server = bench.start(f"{kind}-{model}", cmd, url)
    try:
        if not bench.ready(server, 180 if kind == "ray" else 120):
            return None
        if model == "mlp":
            check_same(bench, kind, server, reference)
        bench.warm(url)
        if plan.extra_peers:  # the claims need only the Poisson point at the reference rate
            for c in (1, 32) if model == "mlp" or kind != "ray" else (1,):
                bench.closed(kind, model, setup, url, c, plan.point_s)
        if model != "mlp":
            return None
        jobs: list[tuple[float, str, str]] = [(rate, "poisson", "reference")]
        if not plan.quick:
            jobs.append((bench.args.burst_fraction * ref_peak, "gamma", "burst"))
            jobs += [
                (f * ref_peak, "poisson", "")
                for f in plan.peer_offered_fractions
                if f != bench.args.load_fraction
            ]
        rows = []
        for j, (rps, pattern, role) in enumerate(jobs):
            if j > 1 and bench.over_budget():
                break
            last = j == len(jobs) - 1
            rows.append(bench.open(kind, model, setup, url, rps, pattern, role, not last))
        return rows[0]
    finally:
        bench.stop(server)


def run(bench: Bench) -> dict[str, Any]:
    """The whole measurement; returns the JSON result."""
    args, plan, slo = bench.args, bench.plan, bench.slo_ms
    wanted = set(args.servers)
    hidden = args.mlp_hidden
    result: dict[str, Any] = {k: None for k in TARGETS}
    peak: dict[str, float | None] = {}
    poisson: dict[str, Row] = {}
    early_ray: ServerProcess | None = None

    # ---------------- phase 1: bare servers and mlcycle (all on core 0, queried in turn)
    port = {k: free_port() for k in ("bare_noop", "bare_mlp", "mlcycle")}
    bare_noop_url = f"http://127.0.0.1:{port['bare_noop']}/predict"
    bare_mlp_url = f"http://127.0.0.1:{port['bare_mlp']}/predict"
    ml_base = f"http://127.0.0.1:{port['mlcycle']}"
    servers: list[ServerProcess | None] = []
    try:
        bare_noop = bare_mlp = ours = None
        if "bare" in wanted or "mlcycle" in wanted:
            cmd = peer_command("bare", "noop", port["bare_noop"])
            bare_noop = bench.start("bare-noop", cmd, bare_noop_url)
            cmd = peer_command("bare", "mlp", port["bare_mlp"], hidden=hidden)
            bare_mlp = bench.start("bare-mlp", cmd, bare_mlp_url)
            servers += [bare_noop, bare_mlp]
        if "mlcycle" in wanted:
            cfg_path = bench.out / "mlcycle_config.json"
            config = mlcycle_config(slo, args.mlcycle_kind, hidden, args.ratio_hidden)
            cfg_path.write_text(json.dumps(config, indent=1))
            cmd = mlcycle_command(cfg_path, port["mlcycle"])
            ours = bench.start("mlcycle", cmd, f"{ml_base}/noop/predict")
            servers.append(ours)
        bare_noop = bare_noop and bench.ready(bare_noop, 60)
        bare_mlp = bare_mlp and bench.ready(bare_mlp, 60)
        ours = ours and bench.ready(ours, args.start_timeout_s)
        reference = None
        if bare_mlp:
            reference = output_of(bare_mlp.probe(bench.bodies[0]))
        if ours:
            for app in ("noop", "noop_aimd", "mlp", "mlp_nb", "wide", "wide_nb"):
                url = f"{ml_base}/{app}/predict"
                try:
                    first = post_json(url, bench.bodies[0])
                    if isinstance(first, dict) and first.get("default"):
                        bench.note(f"mlcycle app {app}: the first answer was the default")
                    answer = real_answer(url, bench.bodies[0], 30.0)
                except (OSError, ValueError, TimeoutError) as exc:
                    bench.note(f"mlcycle app {app} gives no real answer ({exc}); mlcycle skipped")
                    bench.stop(ours)
                    ours = None
                    break
                if app.startswith("mlp") and reference is not None:
                    diff = max_abs_diff(output_of(answer), reference)
                    if diff > 1e-5:
                        bench.note(f"mlcycle {app} differs from the bare MLP (|diff| {diff:.3g})")
        if "mlcycle" in wanted and not ours:
            bench.note("mlcycle did not run: its fields are null")

        # overhead: alternating 1-client rounds
        if bare_noop and ours:
            bench.warm(bare_noop_url)
            bench.warm(f"{ml_base}/noop/predict")
            over = bench.overhead_rounds(
                bare_noop_url,
                {"none": f"{ml_base}/noop/predict", "aimd": f"{ml_base}/noop_aimd/predict"},
            )
            result["overhead_p50_ms"] = statistics.median(over["none"])
            result["overhead_p50_ms_aimd"] = statistics.median(over["aimd"])
            result["overhead_p50_ms_rounds"] = over
        elif bare_noop:
            bench.closed("bare", "noop", "inline", bare_noop_url, 1, plan.overhead_s)
        # --quick: Ray Serve's start-up (15-40 s) overlaps the throughput points, on the
        # client core at nice 19 (the client, at 0, preempts it); it moves to the server core
        # at nice 0 before it is measured. After the 1-client latency rounds, which it would
        # disturb most.
        if plan.quick and "ray" in wanted:
            ray_port = free_port()
            ray_kind, _, ray_kw = RAY_SETUPS[0]
            early_ray = bench.start(
                f"ray-{ray_kind}",
                peer_command("ray", ray_kind, ray_port, hidden=hidden, **ray_kw),
                f"http://127.0.0.1:{ray_port}/predict",
                background=True,
            )
        if plan.extra_peers and bare_noop:
            bench.closed("bare", "noop", "inline", bare_noop_url, 32, plan.point_s)
        if plan.extra_peers and ours:
            bench.closed("mlcycle", "noop", "none", f"{ml_base}/noop/predict", 32, plan.point_s)

        # batching ratio: interleaved sweeps of the batch-friendly MLP, AIMD and none
        if ours:
            got = bench.ratio_rounds(
                f"{ml_base}/wide/predict", f"{ml_base}/wide_nb/predict", "wide"
            )
            result["batching_throughput_ratio"] = got["ratio"]
            result["batching_throughput_ratio_range"] = [got["ratio_min"], got["ratio_max"]]
            result["batching_rounds"] = got["rounds"]
            result["batching_model"] = (
                f"mlcycle.serve.online.examples:wide_mlp(hidden={args.ratio_hidden}), "
                f"max batch 64, SLO {slo:g} ms"
            )

        # our peak on the anchors' MLP (AIMD): the reference load for the open-loop points
        ours_within_slo: float | None = None
        if ours:
            url = f"{ml_base}/mlp/predict"
            bench.warm(url)
            sweep = [
                bench.closed("mlcycle", "mlp", "aimd", url, c, plan.point_s) for c in plan.sweep
            ]
            best = loadgen.max_throughput_within_slo([r.stats for r in sweep])
            peak["mlcycle"] = ours_within_slo = best.throughput_rps if best else None
            if plan.extra_peers:  # the same model unbatched, for context
                url_nb = f"{ml_base}/mlp_nb/predict"
                bench.warm(url_nb)
                nb = [
                    bench.closed("mlcycle", "mlp", "none", url_nb, c, plan.point_s)
                    for c in plan.sweep
                ]
                best_nb = loadgen.max_throughput_within_slo([r.stats for r in nb])
                peak["mlcycle_nobatch"] = best_nb.throughput_rps if best_nb else None
                result["batching_throughput_ratio_mlp"] = ratio(
                    peak["mlcycle"], peak["mlcycle_nobatch"]
                )
            if peak["mlcycle"] is None:
                bench.note("mlcycle mlp (aimd): no sweep point met the SLO; peak = max throughput")
                peak["mlcycle"] = max(r.stats.throughput_rps for r in sweep)
        if bare_mlp and (plan.extra_peers or not ours):
            bench.warm(bare_mlp_url)
            bare_sweep = [
                bench.closed("bare", "mlp", "inline", bare_mlp_url, c, plan.point_s)
                for c in plan.sweep
            ]
            best_bare = loadgen.max_throughput_within_slo([r.stats for r in bare_sweep])
            peak["bare"] = best_bare.throughput_rps if best_bare else None
            # the same peak against the bare inline server's (context)
            result["batching_ratio_vs_bare"] = ratio(ours_within_slo, peak.get("bare"))
        ref_peak = peak.get("mlcycle") or peak.get("bare")
        if ref_peak is None:
            ref_peak = args.fallback_peak_rps
            bench.note(f"no peak measured (mlcycle and bare missing): using {ref_peak:.0f}/s")
        elif not peak.get("mlcycle"):
            bench.note(f"reference load from the bare server's peak ({ref_peak:.0f}/s)")
        rate = args.load_fraction * ref_peak
        result["reference_peak_rps"] = ref_peak
        result["offered_rps"] = rate

        # open loop: Poisson at the reference rate, then the bursts, then the load sweep
        if ours:
            url = f"{ml_base}/mlp/predict"
            rounds = [
                bench.open("mlcycle", "mlp", "aimd", url, rate, "poisson", "reference", round_=r)
                for r in range(plan.poisson_rounds)
            ]
            goodputs = [r.stats.goodput_rps for r in rounds]
            poisson["mlcycle"] = sorted(rounds, key=lambda r: r.stats.goodput_rps)[len(rounds) // 2]
            result["goodput_rps_rounds"] = {"mlcycle": goodputs}
            result |= burst_loads(bench, url, ref_peak)
            if not plan.quick:
                bench.open("mlcycle", "mlp", "none", f"{ml_base}/mlp_nb/predict", rate, "poisson")
        if bare_mlp and not plan.quick:
            poisson["bare"] = bench.open(
                "bare", "mlp", "inline", bare_mlp_url, rate, "poisson", "reference"
            )
            burst_rate = args.burst_fraction * ref_peak
            bench.open("bare", "mlp", "inline", bare_mlp_url, burst_rate, "gamma", "burst")
        for fraction in plan.offered_fractions:
            if fraction == args.load_fraction or bench.over_budget():
                continue
            if ours:
                bench.open(
                    "mlcycle",
                    "mlp",
                    "aimd",
                    f"{ml_base}/mlp/predict",
                    fraction * ref_peak,
                    "poisson",
                )
            if bare_mlp:
                bench.open("bare", "mlp", "inline", bare_mlp_url, fraction * ref_peak, "poisson")
    finally:
        for server in servers:
            bench.stop(server)

    # ---------------- phases 2 and 3: LitServe, then Ray Serve, each alone on core 0
    lit_setups: list[tuple[str, str, dict[str, Any]]] = [
        ("mlp", "batch 16 / 5 ms", {"max_batch_size": 16, "batch_timeout_s": 0.005})
    ]
    ray_setups = list(RAY_SETUPS)
    if plan.extra_peers:
        lit_setups += [("mlp", "unbatched", {}), ("noop", "unbatched", {})]
        ray_setups.append(("noop", "unbatched, cap 5", {}))
    peer_goodput: dict[str, list[float]] = {"litserve": [], "ray": []}
    for kind, setups in (("litserve", lit_setups), ("ray", ray_setups)):
        if kind not in wanted:
            continue
        for i, (model, setup, kw) in enumerate(setups):
            if i and bench.over_budget():
                bench.note(f"{kind} {model} {setup} skipped (time budget)")
                continue
            started = early_ray if (kind == "ray" and i == 0) else None
            row = run_peer(bench, kind, model, setup, kw, reference, rate, ref_peak, started)
            if row is not None:
                peer_goodput[kind].append(row.stats.goodput_rps)
                if row.stats.goodput_rps >= max(peer_goodput[kind]):
                    poisson[kind] = row
    lit_goodput, ray_goodput = peer_goodput["litserve"], peer_goodput["ray"]

    # ---------------- the claims
    ours_good = poisson["mlcycle"].stats.goodput_rps if "mlcycle" in poisson else None
    floor = 1.0 / plan.open_s  # one answer in the window
    result["goodput_vs_litserve"] = ratio(ours_good, max(lit_goodput, default=None), floor)
    result["goodput_vs_rayserve"] = ratio(ours_good, max(ray_goodput, default=None), floor)
    result["goodput_rps"] = {k: r.stats.goodput_rps for k, r in poisson.items()}
    result["peak_rps"] = peak
    return result


# ------------------------------------------------------------------------------------------
# Report


def print_table(bench: Bench) -> None:
    """All rows as a rich table."""
    from rich.table import Table

    table = Table(title=f"serve_bench (SLO {bench.slo_ms:g} ms)")
    cols = ("server", "model / set-up", "load", "req/s", "goodput/s", "p50 ms", "p99 ms")
    for col in (*cols, "within SLO", "defaults", "failed"):
        table.add_column(col, justify="right" if col not in cols[:3] else "left")
    for row in bench.rows:
        s = row.stats
        table.add_row(
            row.server,
            f"{row.model} / {row.setup}",
            row.load,
            f"{s.throughput_rps:.0f}",
            f"{s.goodput_rps:.0f}",
            f"{s.p50_ms:.2f}",
            f"{s.p99_ms:.1f}",
            f"{s.within_slo:.3f}",
            f"{s.default_share:.3f}",
            str(s.failed),
        )
    bench.console.print(table)


def print_bursts(bench: Bench, result: dict[str, Any]) -> None:
    """The burst figures at each mean load, the headline marked."""
    from rich.table import Table

    by_load = result.get("burst_by_load")
    if not by_load:
        return
    table = Table(title=f"bursts (gamma, CV {bench.args.burst_cv:g}): mlcycle mlp / aimd")
    for col in ("mean load", "req/s", "rounds", "within SLO or default", "from send", "defaults"):
        table.add_column(col, justify="right")
    for b in by_load:
        mark = " (headline)" if math.isclose(b["fraction"], result["burst_load_fraction"]) else ""
        table.add_row(
            f"{b['fraction']:.0%} of peak{mark}",
            f"{b['offered_rps']:.0f}",
            str(len(b["rounds"])),
            f"{b['within_slo_or_default']:.3f}" if b["within_slo_or_default"] is not None else "-",
            f"{b['within_slo_from_send']:.3f}" if b["within_slo_from_send"] is not None else "-",
            f"{b['default_share']:.3f}" if b["default_share"] is not None else "-",
        )
    bench.console.print(table)


FAMILIES = {  # one hue per server, shades for its set-ups
    "mlcycle": ("#1f77b4", "#6baed6", "#08306b"),
    "bare": ("#636363", "#a8a8a8", "#252525"),
    "litserve": ("#ff7f0e", "#fdae6b", "#a63603"),
    "ray": ("#d62728", "#fc9272", "#67000d"),
}


def series_colors(rows: Sequence[Row]) -> dict[tuple[str, str], str]:
    """A color per (server, set-up): the server's hue, a shade per set-up in order seen."""
    out: dict[tuple[str, str], str] = {}
    for row in rows:
        key = (row.server, row.setup)
        if key not in out:
            shades = FAMILIES.get(row.server, ("#9467bd", "#c5b0d5", "#3f007d"))
            used = sum(1 for k in out if k[0] == row.server)
            out[key] = shades[used % len(shades)]
    return out


def plot(bench: Bench) -> list[Path]:
    """The latency CDF (Poisson and burst points) and throughput against offered load."""
    from _common import pyplot

    plt = pyplot()
    paths: list[Path] = []
    colors = series_colors([r for r in bench.rows if r.model == "mlp"])

    fig, ax = plt.subplots(figsize=(7, 4.5))
    for row in bench.rows:
        if not row.latencies_ms or row.model != "mlp":
            continue
        if row.role not in ("reference", "burst"):
            continue
        xs = sorted(row.latencies_ms)
        ys = [(i + 1) / len(xs) for i in range(len(xs))]
        style = "--" if row.load.startswith("gamma") else ("-" if row.setup != "none" else ":")
        ax.plot(
            xs,
            ys,
            style,
            color=colors[(row.server, row.setup)],
            label=f"{row.server} {row.setup}, {row.load}",
        )
    ax.axvline(bench.slo_ms, color="k", lw=0.8, ls=":", label=f"SLO {bench.slo_ms:g} ms")
    ax.set_xscale("log")
    ax.set_xlabel("latency from scheduled arrival (ms)")
    ax.set_ylabel("fraction of queries")
    ax.set_title("MLP latency CDF, open loop (Poisson: reference rate; bursts: headline rate)")
    ax.legend(fontsize=7, loc="lower right")
    ax.grid(alpha=0.3)
    path = bench.out / "serve_latency_cdf.png"
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    paths.append(path)

    fig, (left, right) = plt.subplots(1, 2, figsize=(11, 4.5))
    series: dict[str, list[Row]] = {}
    for row in bench.rows:
        if row.model == "mlp" and row.load.startswith("poisson"):
            series.setdefault(f"{row.server} {row.setup}", []).append(row)
    for i, (label, rows) in enumerate(series.items()):
        rows.sort(key=lambda r: r.stats.offered_rps or 0)
        xs = [r.stats.offered_rps for r in rows]
        color = colors[(rows[0].server, rows[0].setup)]
        marker = "os^v"[i % 4]
        left.plot(
            xs, [r.stats.throughput_rps for r in rows], f"{marker}-", color=color, label=label
        )
        left.plot(xs, [r.stats.goodput_rps for r in rows], f"{marker}--", color=color, mfc="none")
    hi = max((r.stats.offered_rps or 0 for rs in series.values() for r in rs), default=1)
    left.plot([0, hi], [0, hi], color="k", lw=0.6, ls=":")
    left.set_xlabel("offered load, Poisson (queries/s)")
    left.set_ylabel("answers/s (solid), goodput within SLO (dashed)")
    left.set_title("MLP, open loop")
    left.legend(fontsize=7)
    left.grid(alpha=0.3)
    closed: dict[str, list[Row]] = {}
    for row in bench.rows:
        if row.model in ("mlp", "wide") and row.load.startswith("c="):
            closed.setdefault(f"{row.server} {row.model} {row.setup}", []).append(row)
    for i, (label, rows) in enumerate(closed.items()):
        by_c: dict[int, list[Row]] = {}
        for r in rows:  # rounds of the batching ratio repeat points: the median per point
            by_c.setdefault(r.stats.concurrency or 0, []).append(r)
        points = sorted(
            (c, sorted(rs, key=lambda r: r.stats.goodput_rps)[len(rs) // 2])
            for c, rs in by_c.items()
        )
        style = ("o-", "s--", "^-.", "v:")[i % 4]
        color = colors.get((rows[0].server, rows[0].setup), "#9467bd")
        if rows[0].model == "wide":
            color = {"aimd": "#2ca02c", "none": "#98df8a"}.get(rows[0].setup, color)
        xs = [c for c, _ in points]
        right.plot(xs, [r.stats.goodput_rps for _, r in points], style, color=color, label=label)
        for c, r in points:
            if loadgen.max_throughput_within_slo([r.stats]) is None:
                right.plot(c, r.stats.goodput_rps, "kx", ms=9)
    right.plot([], [], "kx", ls="", label="misses the SLO (p99, or < 99% real answers in it)")
    right.set_xscale("log", base=2)
    right.set_xlabel("closed-loop clients")
    right.set_ylabel("real answers within the SLO per second")
    right.set_title("MLPs, closed loop (wide: the batching ratio's model)")
    right.legend(fontsize=7)
    right.grid(alpha=0.3)
    path = bench.out / "serve_throughput_vs_load.png"
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    paths.append(path)
    return paths


def verdicts(result: dict[str, Any]) -> dict[str, bool | None]:
    """Each acceptance target: met, missed, or None when not measured."""
    out: dict[str, bool | None] = {}
    for key, (op, bound) in TARGETS.items():
        value = result.get(key)
        out[key] = None if value is None else (value <= bound if op == "<=" else value >= bound)
    return out


@contextlib.contextmanager
def signals_stop_servers() -> Iterator[None]:
    """SIGTERM/SIGHUP end the run through SystemExit, so every finally block stops servers."""

    def _exit(signum: int, frame: Any) -> None:
        raise SystemExit(128 + signum)

    old = {sig: signal.signal(sig, _exit) for sig in (signal.SIGTERM, signal.SIGHUP)}
    try:
        yield
    finally:
        for sig, handler in old.items():
            signal.signal(sig, handler)
        ServerProcess.stop_all()


def main(argv: Sequence[str] | None = None) -> int:
    """Parse options, run, print the table, draw the figures, print the JSON."""
    parser = make_parser(NAME, __doc__ or "")
    parser.add_argument("--slo-ms", type=float, default=50.0, help="latency SLO (ms)")
    parser.add_argument("--load-fraction", type=float, default=0.9, help="of our peak")
    parser.add_argument("--burst-cv", type=float, default=4.0, help="CV of burst gaps")
    parser.add_argument(
        "--burst-fraction",
        type=float,
        default=0.5,
        help="mean burst load, of our peak, of burst_within_slo_or_default (all of "
        "0.25/0.5/0.75/0.9 are in burst_by_load)",
    )
    parser.add_argument(
        "--servers",
        default=",".join(ALL_SERVERS),
        help="comma-separated subset of %(default)s",
    )
    parser.add_argument("--mlcycle-kind", choices=("thread", "process", "ray"), default="thread")
    parser.add_argument("--mlp-hidden", type=int, default=1024, help="MLP hidden width")
    parser.add_argument(
        "--ratio-hidden",
        type=int,
        default=2048,
        help="hidden width of the batch-friendly MLP (examples.wide_mlp) of the batching ratio",
    )
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument(
        "--client",
        choices=loadgen.CLIENTS,
        default="raw",
        help="load generator's HTTP client (raw: cheapest per query; aiohttp to cross-check)",
    )
    parser.add_argument("--timeout-s", type=float, default=10.0, help="per-query client timeout")
    parser.add_argument("--start-timeout-s", type=float, default=90.0, help="mlcycle start")
    parser.add_argument(
        "--fallback-peak-rps",
        type=float,
        default=1000.0,
        help="reference peak when neither mlcycle nor bare runs",
    )
    args = parser.parse_args(argv)
    args.servers = [s.strip() for s in args.servers.split(",") if s.strip()]
    bad = sorted(set(args.servers) - set(ALL_SERVERS))
    if bad:
        parser.error(f"--servers: unknown {bad}; choose from {', '.join(ALL_SERVERS)}")
    console = make_console(args.json)
    plan = QUICK if args.quick else FULL
    args.pinned = loadgen.pin_to_cores(CLIENT_CORES)
    bench = Bench(args, console, plan)
    console.print(f"[bold]{NAME}[/]: {CLAIM}")
    if not args.pinned:
        bench.note(f"not pinned (cores available: {sorted(os.sched_getaffinity(0))})")
    with signals_stop_servers():
        result = run(bench)
    print_table(bench)
    print_bursts(bench, result)
    figures: list[Path] = []
    try:
        figures = plot(bench)
    except Exception as exc:  # noqa: BLE001 - a figure is not worth losing the numbers
        bench.note(f"plots failed: {exc!r}")
    with open(bench.out / "rows.jsonl", "w") as f:
        for row in bench.rows:
            f.write(json.dumps(row.to_dict()) + "\n")
    result |= {
        "claim": CLAIM,
        "slo_ms": args.slo_ms,
        "quick": args.quick,
        "targets": {k: f"{op} {v:g}" for k, (op, v) in TARGETS.items()},
        "met": verdicts(result),
        "pinned": args.pinned,
        "servers": args.servers,
        "mlcycle_kind": args.mlcycle_kind,
        "client": args.client,
        "notes": bench.notes,
        "figures": [str(p) for p in figures],
        "seconds": round(bench.elapsed(), 1),
        "rows": [row.to_dict() for row in bench.rows],
    }
    summary = {k: result.get(k) for k in TARGETS}
    console.print(f"result: {json.dumps(summary)} in {result['seconds']} s")
    if args.json:
        print_json_last(result)
    return 0


if __name__ == "__main__":
    sys.exit(main())
