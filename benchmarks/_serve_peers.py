"""Peer servers for ``serve_bench.py``, each run as its own process, and their process control.

Claim: the peers are set up as the anchors in ``shared/anchors/serve_peers_2026-11-27.md`` were
(one worker or replica each, the same model, the same request and response JSON), so that their
figures can be compared with mlcycle's and with the anchors'.

Run one server in the foreground (the benchmark does this in a child process)::

    python benchmarks/_serve_peers.py bare --model noop --port 8101
    python benchmarks/_serve_peers.py litserve --model mlp --port 8102 --max-batch-size 16
    python benchmarks/_serve_peers.py ray --model mlp --port 8103 --batch

Every server answers ``POST /predict`` with body ``{"input": x}`` by ``{"output": y}`` and binds
127.0.0.1 only. Set-ups:

- ``bare``: a Starlette app on uvicorn (uvloop, httptools, no access log) that calls the model
  inline in its async handler: the floor any Python ASGI server can reach.
- ``litserve``: ``LitServer(api, accelerator="cpu", workers_per_device=1)``; unbatched
  (``max_batch_size=1``) or batched (``--max-batch-size 16 --batch-timeout-s 0.005`` as the
  anchors). LitServe starts an API server process and a worker process beside its main one.
- ``ray``: ``ray.init(num_cpus=2, include_dashboard=False)``, one replica of a deployment with an
  async ``__call__``; ``--batch`` wraps the model in ``@serve.batch`` at its defaults
  (``max_batch_size=10, batch_wait_timeout_s=0.01``) with ``max_ongoing_requests=64`` as in the
  anchors (Ray's default of 5 throttles one replica to a crawl at 32 clients); without
  ``--batch`` ``max_ongoing_requests`` keeps Ray's default unless ``--max-ongoing`` says
  otherwise. HTTP binds 127.0.0.1; each replica's inter-deployment gRPC server, which Ray binds
  to ``[::]``, is rebound to 127.0.0.1 by a worker set-up hook.

Models (the same as ``mlcycle.serve.online.examples``): ``noop`` echoes its input; ``mlp`` is
Linear(256, 1024)-ReLU-Linear(1024, 1024)-ReLU-Linear(1024, 10) with a softmax output, built
after ``torch.manual_seed(seed)``, evaluated in ``torch.inference_mode`` on one thread.

Process control (:class:`ServerProcess`): each server starts in its own session (process group)
pinned to the server core; stopping it sends SIGTERM to the group, then SIGKILL to the group and
to every descendant found under ``/proc`` (LitServe's children outlive a SIGTERM of their parent,
and Ray's daemons leave the group), so nothing is left running.
"""

from __future__ import annotations

import argparse
import atexit
import contextlib
import json
import os
import signal
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

BatchFn = Callable[[list[Any]], list[Any]]
HOST = "127.0.0.1"


# ------------------------------------------------------------------------------------------
# Models


def build_mlp(in_features: int = 256, hidden: int = 1024, classes: int = 10, seed: int = 0) -> Any:
    """The anchors' MLP, ``torch.manual_seed(seed)`` then Linear-ReLU-Linear-ReLU-Linear."""
    import torch
    from torch import nn

    torch.manual_seed(seed)
    return nn.Sequential(
        nn.Linear(in_features, hidden),
        nn.ReLU(),
        nn.Linear(hidden, hidden),
        nn.ReLU(),
        nn.Linear(hidden, classes),
    ).eval()


def make_batch_fn(model: str, *, hidden: int = 1024, seed: int = 0) -> BatchFn:
    """The model as a function from a batch of inputs to a list of outputs."""
    if model == "noop":
        return lambda inputs: list(inputs)
    if model != "mlp":
        raise ValueError(f"model must be 'noop' or 'mlp', got {model!r}")
    import torch

    torch.set_num_threads(1)
    net = build_mlp(hidden=hidden, seed=seed)

    def mlp(inputs: list[Any]) -> list[Any]:
        with torch.inference_mode():
            x = torch.tensor(inputs, dtype=torch.float32)  # (batch, 256)
            return net(x).softmax(-1).tolist()  # (batch, 10)

    mlp([[0.0] * 256])  # warm up the first call's allocations
    return mlp


# ------------------------------------------------------------------------------------------
# Servers (each function blocks until the process is signalled)


def _stop_on_sigterm() -> None:
    def _raise(signum: int, frame: Any) -> None:
        raise SystemExit(0)

    signal.signal(signal.SIGTERM, _raise)


def serve_bare(model: str, port: int, *, hidden: int, seed: int) -> None:
    """A Starlette app on uvicorn calling the model inline in its async handler."""
    import uvicorn
    from starlette.applications import Starlette
    from starlette.requests import Request
    from starlette.responses import JSONResponse, PlainTextResponse
    from starlette.routing import Route

    fn = make_batch_fn(model, hidden=hidden, seed=seed)

    async def predict(request: Request) -> JSONResponse:
        body = await request.json()
        return JSONResponse({"output": fn([body["input"]])[0]})

    async def health(request: Request) -> PlainTextResponse:
        return PlainTextResponse("ok")

    app = Starlette(routes=[Route("/predict", predict, methods=["POST"]), Route("/health", health)])
    uvicorn.run(
        app,
        host=HOST,
        port=port,
        loop="uvloop",
        http="httptools",
        access_log=False,
        log_level="warning",
    )


def _make_litserve_api() -> type:
    """The LitAPI class; built on first use (module ``__getattr__``) so that importing this file
    does not import LitServe, yet LitServe's spawned worker can unpickle it by name."""
    import litserve as ls

    class LitPeerAPI(ls.LitAPI):
        """The model behind LitServe: one input per request, a list per batch."""

        def __init__(self, model: str, hidden: int, seed: int, **kwargs: Any) -> None:
            super().__init__(**kwargs)
            self.model, self.hidden, self.seed = model, hidden, seed

        def setup(self, device: str) -> None:
            self.fn = make_batch_fn(self.model, hidden=self.hidden, seed=self.seed)

        def decode_request(self, request):  # noqa: ANN001, ANN201 - LitServe reads annotations
            return request["input"]

        def batch(self, inputs: list[Any]) -> list[Any]:
            return list(inputs)

        def unbatch(self, output: list[Any]) -> list[Any]:
            return list(output)

        def predict(self, x: Any) -> Any:
            if self.max_batch_size > 1:
                return self.fn(x)
            return self.fn([x])[0]

        def encode_response(self, output: Any) -> dict[str, Any]:
            return {"output": output}

    LitPeerAPI.__module__ = __name__
    LitPeerAPI.__qualname__ = "LitPeerAPI"
    return LitPeerAPI


def __getattr__(name: str) -> Any:
    if name == "LitPeerAPI":
        cls = _make_litserve_api()
        globals()[name] = cls
        return cls
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def serve_litserve(
    model: str, port: int, *, hidden: int, seed: int, max_batch_size: int, batch_timeout_s: float
) -> None:
    """LitServe with one CPU worker, batched when ``max_batch_size > 1``."""
    import litserve as ls

    api_cls = __getattr__("LitPeerAPI")
    api = api_cls(model, hidden, seed, max_batch_size=max_batch_size, batch_timeout=batch_timeout_s)
    server = ls.LitServer(api, accelerator="cpu", workers_per_device=1)
    server.run(host=HOST, port=port, log_level="warning", generate_client_file=False)


def ray_loopback_hook() -> None:
    """Ray worker set-up hook: bind each replica's inter-deployment gRPC server to loopback.

    Ray Serve 2.60 binds it to ``[::]:0`` (all interfaces) in ``Replica._on_initialized``;
    this wraps the helper it calls so that the address becomes ``127.0.0.1:0``.
    """
    try:
        from ray.serve._private import replica
    except ImportError:  # not a Serve worker, or another Ray version: nothing to rebind
        return
    original = replica.add_port_to_grpc_server

    def loopback(server: Any, address: str) -> Any:
        return original(server, address.replace("[::]", HOST).replace("0.0.0.0", HOST))

    replica.add_port_to_grpc_server = loopback


def serve_ray(
    model: str, port: int, *, hidden: int, seed: int, batch: bool, max_ongoing: int | None
) -> None:
    """Ray Serve: one replica, async ``__call__``, ``@serve.batch`` at its defaults if asked."""
    import ray
    from ray import serve
    from starlette.requests import Request

    here = str(Path(__file__).resolve().parent)  # Ray workers import the hook from here
    os.environ["PYTHONPATH"] = os.pathsep.join(
        p for p in (here, os.environ.get("PYTHONPATH", "")) if p
    )
    ray.init(
        address="local",  # a fresh local instance, never another user's cluster
        num_cpus=2,
        include_dashboard=False,
        _node_ip_address=HOST,
        runtime_env={"worker_process_setup_hook": "_serve_peers.ray_loopback_hook"},
        log_to_driver=False,
    )
    try:
        serve.start(http_options={"host": HOST, "port": port})
        cap = max_ongoing or (64 if batch else None)
        options: dict[str, Any] = {"num_replicas": 1}
        if cap:
            options["max_ongoing_requests"] = cap

        if batch:

            @serve.deployment(**options)
            class Batched:
                def __init__(self) -> None:
                    self.fn = make_batch_fn(model, hidden=hidden, seed=seed)

                @serve.batch
                async def run(self, inputs: list[Any]) -> list[Any]:
                    return self.fn(inputs)

                async def __call__(self, request: Request) -> dict[str, Any]:
                    body = await request.json()
                    return {"output": await self.run(body["input"])}

            app = Batched.bind()
        else:

            @serve.deployment(**options)
            class Single:
                def __init__(self) -> None:
                    self.fn = make_batch_fn(model, hidden=hidden, seed=seed)

                async def __call__(self, request: Request) -> dict[str, Any]:
                    body = await request.json()
                    return {"output": self.fn([body["input"]])[0]}

            app = Single.bind()
        serve.run(app, name="peer", route_prefix="/predict")
        print(f"ray serve ready on http://{HOST}:{port}/predict", flush=True)
        while True:
            time.sleep(3600)
    finally:  # ray.shutdown() ends Serve's actors too, faster than serve.shutdown() first
        with contextlib.suppress(Exception):
            ray.shutdown()


# ------------------------------------------------------------------------------------------
# Process control


def _proc_children() -> dict[int, list[int]]:
    """ppid -> child pids, from /proc (Linux)."""
    children: dict[int, list[int]] = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            stat = Path(f"/proc/{entry}/stat").read_text()
        except OSError:
            continue
        fields = stat[stat.rfind(")") + 2 :].split()
        children.setdefault(int(fields[1]), []).append(int(entry))
    return children


def descendants(pid: int) -> list[int]:
    """All live descendants of ``pid`` (children, grandchildren, ...), from /proc."""
    if not os.path.isdir("/proc"):
        return []
    tree = _proc_children()
    out: list[int] = []
    stack = list(tree.get(pid, []))
    while stack:
        child = stack.pop()
        out.append(child)
        stack.extend(tree.get(child, []))
    return out


def _start_time(pid: int) -> str | None:
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    return stat[stat.rfind(")") + 2 :].split()[19]


def post_json(url: str, body: bytes, timeout_s: float = 10.0) -> Any:
    """POST a JSON ``body`` to ``url`` once; the decoded JSON answer (raises on HTTP errors)."""
    req = urllib.request.Request(url, body, {"Content-Type": "application/json"})
    with urllib.request.urlopen(req, timeout=timeout_s) as resp:
        return json.loads(resp.read())


class ServerProcess:
    """A server command run in its own process group, pinned to ``cores``; :meth:`stop` ends
    it and everything it started. Every instance is also stopped at interpreter exit."""

    _live: set[ServerProcess] = set()

    def __init__(
        self,
        name: str,
        cmd: Sequence[str],
        *,
        url: str,
        probe_body: bytes,
        cores: Sequence[int] | None = None,
        env: dict[str, str] | None = None,
        log_path: Path | None = None,
        nice: int = 0,
    ) -> None:
        self.name = name
        self.url = url
        self.probe_body = probe_body
        self.log_path = log_path
        self._tracked: dict[int, str | None] = {}
        cpu = set(cores) if cores else None

        def preexec() -> None:
            if cpu:
                os.sched_setaffinity(0, cpu)
            if nice:
                os.nice(nice)

        self._log = open(log_path, "wb") if log_path else subprocess.DEVNULL  # noqa: SIM115
        self.proc = subprocess.Popen(
            list(cmd),
            stdin=subprocess.DEVNULL,
            stdout=self._log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
            preexec_fn=preexec,
            env={**os.environ, **(env or {})},
        )
        ServerProcess._live.add(self)

    def _track(self) -> None:
        for pid in descendants(self.proc.pid):
            self._tracked.setdefault(pid, _start_time(pid))

    def wait_ready(self, timeout_s: float) -> float:
        """Post the probe body until a 200 comes back; the seconds that took. Raises
        RuntimeError with the log's tail when the server exits or ``timeout_s`` passes."""
        t0 = time.monotonic()
        while time.monotonic() - t0 < timeout_s:
            self._track()
            if self.proc.poll() is not None:
                raise RuntimeError(f"{self.name} exited with {self.proc.returncode}: {self.tail()}")
            req = urllib.request.Request(
                self.url, self.probe_body, {"Content-Type": "application/json"}
            )
            try:
                with urllib.request.urlopen(req, timeout=5) as resp:
                    if resp.status == 200:
                        self._track()
                        return time.monotonic() - t0
            except (urllib.error.URLError, OSError, ValueError):
                pass
            time.sleep(0.25)
        raise RuntimeError(f"{self.name} not ready after {timeout_s:.0f} s: {self.tail()}")

    def move(self, cores: Sequence[int] | None, nice: int = 0) -> str | None:
        """Pin every thread of the server and its descendants to ``cores`` and set their
        niceness to ``nice`` (a server started in the background at a low priority, moved
        where it is measured). Returns what could not be done (lowering niceness needs
        privileges), or None."""
        problems: set[str] = set()
        for pid in [self.proc.pid, *descendants(self.proc.pid)]:
            try:
                tids = [int(t) for t in os.listdir(f"/proc/{pid}/task")]
            except OSError:
                continue
            for tid in tids:  # affinity and niceness are per thread on Linux
                try:
                    if cores:
                        os.sched_setaffinity(tid, set(cores))
                    os.setpriority(os.PRIO_PROCESS, tid, nice)
                except PermissionError as exc:
                    problems.add(f"{type(exc).__name__}: {exc.strerror}")
                except (ProcessLookupError, OSError):
                    continue
        self._track()
        return "; ".join(sorted(problems)) or None

    def probe(self, body: bytes) -> Any:
        """POST ``body`` once to the server's URL and return the decoded JSON answer."""
        return post_json(self.url, body)

    def tail(self, n_chars: int = 1500) -> str:
        """The end of the server's log (empty without one)."""
        if not self.log_path or not self.log_path.exists():
            return ""
        return self.log_path.read_bytes()[-n_chars:].decode(errors="replace")

    def stop(self, grace_s: float = 5.0) -> None:
        """SIGTERM the group, wait ``grace_s``, then SIGKILL the group and every descendant."""
        if self not in ServerProcess._live:
            return
        ServerProcess._live.discard(self)
        self._track()
        pgid = self.proc.pid
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(pgid, signal.SIGTERM)
        try:
            self.proc.wait(timeout=grace_s)
        except subprocess.TimeoutExpired:
            pass
        self._track()
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(pgid, signal.SIGKILL)
        for pid, started in self._tracked.items():
            if started is not None and _start_time(pid) == started:  # not a reused pid
                with contextlib.suppress(ProcessLookupError, PermissionError):
                    os.kill(pid, signal.SIGKILL)
        with contextlib.suppress(subprocess.TimeoutExpired):
            self.proc.wait(timeout=5)
        deadline = time.monotonic() + 5
        while time.monotonic() < deadline and any(
            started is not None and _start_time(pid) == started
            for pid, started in self._tracked.items()
        ):
            time.sleep(0.05)
        if self._log is not subprocess.DEVNULL:
            self._log.close()

    def leftovers(self) -> list[int]:
        """Tracked pids still alive (should be empty after :meth:`stop`)."""
        return [p for p, s in self._tracked.items() if s is not None and _start_time(p) == s]

    @classmethod
    def stop_all(cls) -> None:
        """Stop every server still running (at exit, and on SIGINT/SIGTERM of the harness)."""
        for server in list(cls._live):
            with contextlib.suppress(Exception):
                server.stop(grace_s=2.0)


atexit.register(ServerProcess.stop_all)


def peer_command(
    kind: str,
    model: str,
    port: int,
    *,
    hidden: int = 1024,
    seed: int = 0,
    max_batch_size: int = 1,
    batch_timeout_s: float = 0.0,
    batch: bool = False,
    max_ongoing: int | None = None,
) -> list[str]:
    """The command line that runs one peer server with this file."""
    cmd = [sys.executable, str(Path(__file__).resolve()), kind, "--model", model]
    cmd += ["--port", str(port), "--hidden", str(hidden), "--seed", str(seed)]
    if kind == "litserve":
        cmd += ["--max-batch-size", str(max_batch_size), "--batch-timeout-s", str(batch_timeout_s)]
    if kind == "ray":
        cmd += ["--batch"] if batch else []
        cmd += ["--max-ongoing", str(max_ongoing)] if max_ongoing else []
    return cmd


def main(argv: Sequence[str] | None = None) -> int:
    """Run one peer server in the foreground until SIGTERM/SIGINT."""
    parser = argparse.ArgumentParser(prog="benchmarks/_serve_peers.py", description=__doc__)
    parser.add_argument("kind", nargs="?", choices=("bare", "litserve", "ray"))
    parser.add_argument("--model", choices=("noop", "mlp"), default="noop")
    parser.add_argument("--port", type=int, default=8100)
    parser.add_argument("--hidden", type=int, default=1024, help="MLP hidden width")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--max-batch-size", type=int, default=1, help="LitServe batch size")
    parser.add_argument("--batch-timeout-s", type=float, default=0.0, help="LitServe wait")
    parser.add_argument("--batch", action="store_true", help="Ray: @serve.batch at defaults")
    parser.add_argument("--max-ongoing", type=int, default=None, help="Ray max_ongoing_requests")
    for flag in ("--quick", "--json"):  # `make bench` passes --quick to every script
        parser.add_argument(flag, action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--out", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.kind is None:  # `make bench` runs every benchmarks/*.py with --quick
        print("benchmarks/_serve_peers.py runs one peer server for serve_bench.py; see --help.")
        return 0
    _stop_on_sigterm()
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    common = {"hidden": args.hidden, "seed": args.seed}
    try:
        if args.kind == "bare":
            serve_bare(args.model, args.port, **common)
        elif args.kind == "litserve":
            serve_litserve(
                args.model,
                args.port,
                max_batch_size=args.max_batch_size,
                batch_timeout_s=args.batch_timeout_s,
                **common,
            )
        else:
            serve_ray(
                args.model, args.port, batch=args.batch, max_ongoing=args.max_ongoing, **common
            )
    except KeyboardInterrupt:
        pass
    return 0


if __name__ == "__main__":
    sys.exit(main())
