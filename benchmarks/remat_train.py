"""Claim: at every memory budget, mlcycle's planned training step is faster than every eager peer
at equal or lower measured peak memory; at ~0.35x of plain peak its overhead is <= 1.15x; under a
cap equal to plain training's peak at batch B, it trains a batch >= 3x B on ResNet-50.

What is measured. One training step (forward, loss, backward; no optimizer) of each model, in
one run on one machine, by every method below. Per method and setting: the step time (median of
``--steps`` steps after warm-up, the device synchronized around each) and the measured peak
memory:

- on CUDA, ``torch.cuda.max_memory_allocated()`` over the timed steps (absolute: parameters,
  buffers, inputs and gradients included); ``peak_above_base`` subtracts what was allocated
  before the timed steps, as the H100 anchors in ``shared/anchors/`` do;
- on the CPU, one more step under a live-tensor tracker (``mlcycle.train.remat.memory.LiveBytes``
  when present, else this script's own dispatch-mode tracker) with the parameters, buffers and
  inputs as its baseline; gradients are set to None before every step, so they count as they
  are allocated. ``peak_above_base`` is the peak less the parameters, buffers, inputs and one
  step's gradients: the anchors' base, which holds the previous step's gradients (freed by
  ``zero_grad(set_to_none=True)`` before the new ones are made).

``mem_ratio`` is the absolute peak over plain's; ``mem_ratio_above_base`` is the peak above the
base over plain's, the ratio the anchors report (0.55x, 0.34x, ...) and the one the 0.35x claim
uses. At the CPU's small batches the base is a large share of the peak (ResNet-50 at batch 8:
~200 of ~800 MiB; GPT-2 small at batch 4: ~950 of ~2,700 MiB), so 0.35x of the absolute peak
would be below what any schedule needs.

Methods (the loss is ``out.float().square().mean()`` for all of them):

- ``plain``: eager PyTorch, every activation kept.
- ``checkpoint_sequential``: ``torch.utils.checkpoint.checkpoint_sequential`` (non-reentrant)
  with 2, round(sqrt(n)) and n // 2 segments over the model's sequential body (ResNet: stem,
  every residual block, head; GPT-2: embeddings, every transformer block, final norm + head).
- ``per_block``: ``torch.utils.checkpoint.checkpoint(block, x, use_reentrant=False)`` around
  every element of that body but the head (GPT-2's usual per-block checkpointing).
- ``compile``: ``torch.compile`` with ``torch._functorch.config.activation_memory_budget`` at
  1.0, 0.5 and 0.2; ``time_ratio_own`` is relative to its own 1.0 run (fusion speed-ups apart).
  Not an eager peer: it is reported beside the others, not counted in the claim. Skipped in
  ``--quick`` (a CPU compile takes about a minute per setting on 2 cores).
- ``ours``: ``mlcycle.train.remat.rematerialize`` at budget fractions (of the *plan's* plain
  peak, which need not equal plain's measured one), at 0.35x plain's *measured* peak above
  the base, and at
  each eager peer's measured peak as ``budget_bytes`` (the equal-memory comparison). Each row
  also carries the plan's predicted peak and cost ratio, and the measured peak over the
  predicted one (``measured_over_plan``; ``plan_check_ok`` when within 10%).

``time_ratio`` and ``mem_ratio`` are relative to ``plain`` on the same model and machine. On the
CPU each timed step is paired with a plain step (alternating order) and ``time_ratio`` is the
median of the per-pair ratios, so that load from other processes cancels out.

Largest batch under a cap: cap = plain's measured peak at batch B on the ResNet. The largest
batch that fits is searched (doubling, then bisection, a few tries) for ours (re-planned per
batch with ``budget_bytes=cap``; it fits when the plan is feasible and the measured peak is
within the cap) and for the lowest-memory eager peer. Plain trains B by definition.

Claims (in ``--json``, ``claims``): ``faster_at_equal_memory``: for every eager peer row, some
ours row has a measured peak <= the peer's (within ``--mem-tol``) and a lower ``time_ratio``;
``overhead_at_035``: the worst over models of the least ``time_ratio`` among ours rows whose
measured ``mem_ratio_above_base`` is <= 0.35 (within ``--mem-tol``); ``max_batch_ratio``: ours'
largest batch over B on the ResNet.

Sizes: ``--quick`` runs resnet-tiny (batch 32) and gpt2-tiny (batch 64) on the CPU with one
thread (the 2 cores are shared; OpenMP's spinning under load makes multi-thread timings erratic),
the planner limited to 3 s and a 110 s time budget that skips what is left. The full run takes
resnet50 (batch 8, 224x224) and gpt2-small (batch 4, sequence 256) on the CPU, or on CUDA the
anchors' sizes: resnet50 at batch 128 and gpt2-small at batch 16, sequence 1024.

Usage::

    python benchmarks/remat_train.py --quick         # CPU: resnet-tiny + gpt2-tiny, < 2 min
    python benchmarks/remat_train.py                 # resnet50 + gpt2-small (CUDA if present)
    python benchmarks/remat_train.py --quick --json  # last stdout line: one JSON object

The exit code is 0 whether or not the claims hold, and when ``rematerialize`` is missing (its
rows then say so); it is 1 when a plain or peer step crashed (a fault of this script).
``benchmarks/remat_gpu.py`` runs the same code on a lent GPU.
"""

from __future__ import annotations

import math
import signal
import statistics
import threading
import time
import weakref
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

CLAIM = (
    "At every memory budget, mlcycle's planned training step is faster than every eager peer at "
    "equal or lower measured peak memory; at ~0.35x of plain peak its overhead is <= 1.15x; under "
    "a cap equal to plain training's peak at batch B, it trains a batch >= 3x B on ResNet-50."
)
NAME = "remat_train"
MIB = 2**20
EAGER_PEERS = ("checkpoint_sequential", "per_block")
TARGET_FRACTION = 0.35

# --------------------------------------------------------------------------------------------
# Loss, memory, time limits


def loss_of(out: torch.Tensor) -> torch.Tensor:
    """The benchmark loss, the same for every method: mean of squares of the logits."""
    return out.float().square().mean()


def storage_bytes(tensors: Any) -> int:
    """Bytes of the distinct storages behind ``tensors`` (each shared storage counted once)."""
    seen: dict[int, int] = {}
    for t in tensors:
        if isinstance(t, torch.Tensor) and t.device.type != "meta":
            st = t.untyped_storage()
            seen[st.data_ptr()] = st.nbytes()
    return sum(seen.values())


def _make_own_tracker() -> Any:
    """A TorchDispatchMode that counts the bytes of storages created while it is active and
    still alive; ``peak_bytes`` is their high-water mark. Views and in-place results (returns
    that alias an input) are not new storage."""
    from torch.utils._python_dispatch import TorchDispatchMode

    class OwnLiveBytes(TorchDispatchMode):
        def __init__(self) -> None:
            super().__init__()
            self.live: dict[int, int] = {}
            self.current = 0
            self.peak_bytes = 0

        def _free(self, key: int) -> None:
            self.current -= self.live.pop(key, 0)

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):  # noqa: ANN001
            out = func(*args, **(kwargs or {}))
            returns = func._schema.returns
            leaves = out if isinstance(out, (tuple, list)) else (out,)
            for i, t in enumerate(leaves):
                if not isinstance(t, torch.Tensor):
                    continue
                if i < len(returns) and returns[i].alias_info is not None:
                    continue
                st = t.untyped_storage()
                key, nbytes = st.data_ptr(), st.nbytes()
                if nbytes == 0 or key in self.live:
                    continue
                self.live[key] = nbytes
                self.current += nbytes
                self.peak_bytes = max(self.peak_bytes, self.current)
                weakref.finalize(st, self._free, key)
            return out

    return OwnLiveBytes()


def cpu_peak(
    fn: Callable[[], None], baseline: list[torch.Tensor], tracker: str = "auto"
) -> tuple[int, str]:
    """Peak live bytes of one call of ``fn`` on the CPU, the storages of ``baseline`` (what is
    resident before the call) included, and the name of the tracker that measured it.

    ``tracker``: ``"mlcycle"`` (``mlcycle.train.remat.memory.LiveBytes``), ``"own"`` (this
    script's), or ``"auto"`` (mlcycle's when importable, else our own).
    """
    if tracker in ("auto", "mlcycle"):
        try:
            from mlcycle.train.remat.memory import LiveBytes  # type: ignore[import-not-found]
        except ImportError:
            if tracker == "mlcycle":
                raise
        else:
            with LiveBytes(baseline=baseline, device="cpu") as mem:
                fn()
            return int(mem.peak_bytes), "mlcycle.LiveBytes"
    mode = _make_own_tracker()
    with mode:
        fn()
    return storage_bytes(baseline) + int(mode.peak_bytes), "own"


@contextmanager
def time_limit(seconds: float | None) -> Iterator[None]:
    """Raise TimeoutError in the block after ``seconds`` (main thread, POSIX only; else none)."""
    usable = (
        seconds is not None
        and math.isfinite(seconds)
        and hasattr(signal, "setitimer")
        and threading.current_thread() is threading.main_thread()
    )
    if not usable:
        yield
        return
    assert seconds is not None

    def _raise(signum: int, frame: Any) -> None:
        raise TimeoutError(f"stopped after {seconds:.0f} s")

    old = signal.signal(signal.SIGALRM, _raise)
    signal.setitimer(signal.ITIMER_REAL, max(seconds, 1.0))
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, old)


def short_error(exc: BaseException, limit: int = 300) -> str:
    """``Type: message`` on one line, at most ``limit`` characters."""
    text = f"{type(exc).__name__}: {exc}".replace("\n", " ")
    return text if len(text) <= limit else text[: limit - 3] + "..."


def infeasible_text(exc: Any, time_limit_s: float) -> str:
    """Why the planner gave up: a budget below the proven least, or none found in time."""
    least = getattr(exc, "min_feasible_bytes", None) or 0
    if "was found in" in str(exc):
        return f"no plan found (least possible {least / MIB:.2f} MiB; limit {time_limit_s:g} s)"
    return f"infeasible (least possible {least / MIB:.2f} MiB)"


# --------------------------------------------------------------------------------------------
# Ours and the peers


def load_rematerialize() -> tuple[Callable[..., Any] | None, str | None]:
    """``mlcycle.train.remat.rematerialize``, or None and why it could not be imported."""
    try:
        from mlcycle.train.remat import rematerialize  # type: ignore[attr-defined]

        return rematerialize, None
    except ImportError:
        pass
    try:
        from mlcycle.train.remat.execute import rematerialize  # type: ignore[import-not-found]

        return rematerialize, None
    except ImportError as exc:
        return None, f"mlcycle.train.remat.rematerialize is missing ({short_error(exc)})"


def skip_cpsat_if_missing() -> str | None:
    """When ortools is not installed, replace the planner's CP-SAT stage by one that finds
    nothing (the incumbents and the MILP still run) and say so; else None."""
    import importlib.util

    if importlib.util.find_spec("ortools") is not None:
        return None
    from mlcycle.train.remat import _cpsat

    def _skipped(graph: Any, budget_bytes: int, **kw: Any) -> Any:
        return _cpsat.CpSatResult(
            schedule=None, lower_bound_cost=0.0, status="unknown", solve_s=0.0
        )

    _cpsat.solve_cpsat = _skipped  # type: ignore[assignment]
    return "ortools is not installed: the planner's CP-SAT stage was skipped"


class _GPT2Embed(nn.Module):
    """GPT-2's token + position embeddings and dropout, as one module of the body."""

    def __init__(self, gpt: nn.Module) -> None:
        super().__init__()
        self.wte, self.wpe, self.drop = gpt.wte, gpt.wpe, gpt.drop
        self._gpt = [gpt]  # not a submodule: its buffer ``pos`` is read, not owned

    def forward(self, idx: torch.Tensor) -> torch.Tensor:
        """Embed (B, T) token ids; returns (B, T, C)."""
        pos = self._gpt[0].pos[: idx.size(1)]  # (T,)
        return self.drop(self.wte(idx) + self.wpe(pos))  # (B, T, C)


def sequential_body(model: nn.Module) -> tuple[str, list[nn.Module]] | None:
    """The model as a list of modules applied in turn, and its family; None when unknown.

    ResNet: ``[stem, every residual block, head]``; GPT-2: ``[embeddings, every block,
    final norm + head]``.
    """
    if hasattr(model, "stages") and hasattr(model, "conv1") and hasattr(model, "fc"):
        stem = nn.Sequential(model.conv1, model.bn1, model.relu, model.maxpool)
        blocks = [block for stage in model.stages for block in stage]
        head = nn.Sequential(model.avgpool, nn.Flatten(1), model.fc)
        return "resnet", [stem, *blocks, head]
    if hasattr(model, "wte") and hasattr(model, "h") and hasattr(model, "lm_head"):
        head = nn.Sequential(model.ln_f, model.lm_head)
        return "gpt2", [_GPT2Embed(model), *model.h, head]
    return None


def body_matches(model: nn.Module, body: list[nn.Module], inputs: tuple[torch.Tensor, ...]) -> bool:
    """Whether running ``body`` in turn gives the model's own output (same RNG, no grad)."""
    state = {k: v.clone() for k, v in model.state_dict().items()}  # BatchNorm statistics move
    try:
        with torch.no_grad(), torch.random.fork_rng(devices=[]):
            torch.manual_seed(0)
            ref = model(*inputs)
            torch.manual_seed(0)
            x = inputs[0]
            for m in body:
                x = m(x)
        return bool(torch.allclose(ref, x, rtol=1e-4, atol=1e-5))
    finally:
        model.load_state_dict(state)


def make_step(
    model: nn.Module, forward: Callable[[], torch.Tensor], *, returns_loss: bool = False
) -> Callable[[], None]:
    """One training step: gradients set to None, ``forward()``, the loss, backward.

    With ``returns_loss`` the forward already returns the loss (ours plans model and loss as
    one module, so that the plan sees the logits-sized tensors the loss allocates).
    """

    def step() -> None:
        model.zero_grad(set_to_none=True)
        out = forward()
        (out if returns_loss else loss_of(out)).backward()

    return step


class WithLoss(nn.Module):
    """``model`` followed by the benchmark loss, so that one plan covers the whole step."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, *inputs: torch.Tensor) -> torch.Tensor:
        return loss_of(self.model(*inputs))


def peer_forwards(
    body: list[nn.Module], inputs: tuple[torch.Tensor, ...]
) -> list[tuple[str, str, Callable[[], torch.Tensor]]]:
    """``(method, setting, forward)`` for each eager checkpointing peer over ``body``."""
    from torch.utils.checkpoint import checkpoint, checkpoint_sequential

    n = len(body)
    seq = nn.Sequential(*body)
    x0 = inputs[0]
    out: list[tuple[str, str, Callable[[], torch.Tensor]]] = []
    for segs in sorted({2, int(round(math.sqrt(n))), n // 2}):
        if 2 <= segs < n:

            def fwd(segs: int = segs) -> torch.Tensor:
                return checkpoint_sequential(seq, segs, x0, use_reentrant=False)

            out.append(("checkpoint_sequential", f"segments={segs}", fwd))

    def per_block() -> torch.Tensor:
        x = x0
        for m in body[:-1]:
            x = checkpoint(m, x, use_reentrant=False)
        return body[-1](x)

    out.append(("per_block", f"blocks={n - 1}", per_block))
    return out


# --------------------------------------------------------------------------------------------
# Rows and one model's bench


@dataclass
class Row:
    """One measurement: a method at one setting on one model."""

    model: str
    batch: int
    method: str
    setting: str
    step_s: float | None = None
    step_mean_s: float | None = None
    peak_bytes: int | None = None
    peak_above_base: int | None = None
    time_ratio: float | None = None
    mem_ratio: float | None = None
    mem_ratio_above_base: float | None = None
    time_ratio_own: float | None = None
    budget_fraction: float | None = None
    budget_bytes: int | None = None
    plan_peak_bytes: int | None = None
    plan_plain_peak_bytes: int | None = None
    plan_cost_ratio: float | None = None
    plan_solver: str | None = None
    plan_s: float | None = None
    measured_over_plan: float | None = None
    plan_check_ok: bool | None = None
    compile_s: float | None = None
    tracker: str | None = None
    error: str | None = None

    @property
    def ok(self) -> bool:
        """Measured: no error, a step time and a peak."""
        return self.error is None and self.step_s is not None and self.peak_bytes is not None


@dataclass
class Config:
    """How to measure.

    Attributes:
        device: ``"cpu"`` or ``"cuda"``.
        steps: timed steps per row (the median is reported).
        min_time_s: keep timing (up to 10x ``steps``) until this much time has passed.
        warmup: untimed steps first.
        time_limit_s: the planner's ``time_limit_s``.
        mem_tol: relative tolerance when comparing peaks ("equal or lower").
        plan_tol: allowed relative gap between ours' measured and planned peak.
        tracker: CPU tracker, see :func:`cpu_peak`.
        compile_limit_s: wall limit on one ``torch.compile`` (first step).
        deadline: ``time.monotonic()`` after which phases are skipped; None for none.
        cost_model: passed to ``rematerialize`` when not None (its default is ``"auto"``:
            measured on CUDA, FLOP estimates on the CPU).
    """

    device: str = "cpu"
    steps: int = 3
    warmup: int = 1
    min_time_s: float = 0.0
    time_limit_s: float = 30.0
    mem_tol: float = 0.02
    plan_tol: float = 0.10
    tracker: str = "auto"
    compile_limit_s: float = 300.0
    deadline: float | None = None
    cost_model: str | None = None

    def left(self) -> float:
        """Seconds until the deadline (inf without one)."""
        return math.inf if self.deadline is None else self.deadline - time.monotonic()


def _sync(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


def _free_cuda(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()
        torch.cuda.empty_cache()


class ModelBench:
    """Every method on one model at one batch; rows go to ``emit`` as they are measured.

    Args:
        name: a :func:`mlcycle.models.build` name.
        kw: its keyword arguments, ``batch`` included.
        cfg: how to measure.
        emit: called with each finished :class:`Row`.
    """

    def __init__(
        self, name: str, kw: dict[str, Any], cfg: Config, emit: Callable[[Row], None]
    ) -> None:
        from mlcycle.models import build

        self.name, self.kw, self.cfg, self.emit = name, dict(kw), cfg, emit
        self.batch = int(kw["batch"])
        self.model, self.inputs = build(name, device=cfg.device, **kw)
        self.model.train()
        found = sequential_body(self.model)
        self.family, self.body = found if found else ("other", None)
        self.body_note: str | None = None if found else "no sequential body known: no peers"
        if self.body is not None and not body_matches(self.model, self.body, self.inputs):
            self.body = None  # would measure another network: no peers then
            self.body_note = "the sequential body does not reproduce the model: no peers"
        self.rows: list[Row] = []
        self.plain_row: Row | None = None
        self.plain_step: Callable[[], None] | None = None
        self.remat, self.remat_error = load_rematerialize()
        self.plan_s_est = 0.0

    # ---- measuring
    def resident(self, inputs: tuple[torch.Tensor, ...] | None = None) -> list[torch.Tensor]:
        """Parameters, buffers and inputs: what lives before a step (gradients are None)."""
        inputs = self.inputs if inputs is None else inputs
        return [*self.model.parameters(), *self.model.buffers(), *inputs]

    def grad_bytes(self) -> int:
        """Bytes of the gradients one step leaves behind (one per trainable parameter)."""
        return sum(p.numel() * p.element_size() for p in self.model.parameters() if p.requires_grad)

    def measure(
        self,
        step: Callable[[], None],
        inputs: tuple[torch.Tensor, ...] | None = None,
        paired: bool = True,
        cpu_peak_too: bool = True,
    ) -> dict[str, Any]:
        """Warm up, time ``cfg.steps`` steps, and measure the peak (see the module docstring).

        On the CPU with ``paired`` (and plain measured), each timed step is paired with a plain
        step, in alternating order, and ``time_ratio`` is the median of the per-pair ratios:
        load from other processes on a shared machine then cancels out of the ratio. Without
        ``cpu_peak_too`` the CPU peak is left unmeasured (None).
        """
        cfg, dev = self.cfg, self.cfg.device
        ref = self.plain_step if paired and dev == "cpu" and step is not self.plain_step else None
        for _ in range(cfg.warmup):
            step()
        _sync(dev)
        base = 0
        if dev == "cuda":
            base = torch.cuda.memory_allocated()
            torch.cuda.reset_peak_memory_stats()

        def timed(fn: Callable[[], None]) -> float:
            t0 = time.perf_counter()
            fn()
            _sync(dev)
            return time.perf_counter() - t0

        times: list[float] = []
        ratios: list[float] = []
        while len(times) < max(cfg.steps, 1) or (
            sum(times) < cfg.min_time_s and len(times) < 10 * cfg.steps
        ):
            if ref is None:
                times.append(timed(step))
            elif len(times) % 2:
                t_ref = timed(ref)
                times.append(timed(step))
                ratios.append(times[-1] / t_ref)
            else:
                times.append(timed(step))
                ratios.append(times[-1] / timed(ref))
        peak: int | None = None
        if dev == "cuda":
            peak, tracker = int(torch.cuda.max_memory_allocated()), "cuda.max_memory_allocated"
        elif cpu_peak_too:
            self.model.zero_grad(set_to_none=True)
            # The anchors' base (memory allocated before a timed step) holds the previous
            # step's gradients, which the step frees before making new ones: count them in.
            base = storage_bytes(self.resident(inputs)) + self.grad_bytes()
            peak, tracker = cpu_peak(step, self.resident(inputs), cfg.tracker)
        else:
            tracker = "none"
        out = {
            "step_s": statistics.median(times),
            "step_mean_s": statistics.fmean(times),
            "peak_bytes": peak,
            "peak_above_base": None if peak is None else peak - base,
            "tracker": tracker,
        }
        if ratios:
            out["time_ratio"] = statistics.median(ratios)
        return out

    def _finish(self, row: Row) -> Row:
        plain = self.plain_row
        if row.error is None and row.step_s and plain is not None and plain.ok:
            if row.time_ratio is None:  # else paired with plain steps (see measure)
                row.time_ratio = row.step_s / (plain.step_s or math.nan)
        if row.ok and plain is not None and plain.ok and row is not plain:
            assert row.peak_bytes is not None and plain.peak_bytes is not None
            row.mem_ratio = row.peak_bytes / plain.peak_bytes
            if row.peak_above_base is not None and plain.peak_above_base:
                row.mem_ratio_above_base = row.peak_above_base / plain.peak_above_base
        elif row is plain and row.ok:
            row.time_ratio = row.mem_ratio = row.mem_ratio_above_base = 1.0
        self.rows.append(row)
        self.emit(row)
        return row

    def _row(self, method: str, setting: str, batch: int | None = None) -> Row:
        return Row(self.name, self.batch if batch is None else batch, method, setting)

    def _skip(self, row: Row, need_s: float) -> bool:
        if self.cfg.left() < need_s:
            row.error = f"skipped: {self.cfg.left():.0f} s left of the time budget"
            self._finish(row)
            return True
        return False

    def _run(self, row: Row, step: Callable[[], None]) -> Row:
        try:
            row.__dict__.update(self.measure(step))
        except Exception as exc:  # noqa: BLE001 -- recorded in the row
            row.error = short_error(exc)
            self._recover()
        return self._finish(row)

    def _recover(self) -> None:
        self.model.zero_grad(set_to_none=True)
        _free_cuda(self.cfg.device)

    @contextmanager
    def active(self) -> Iterator[ModelBench]:
        """On CUDA, this model and its inputs on the device for the block and parked on the
        CPU after it, so that absolute peaks never include another model's memory."""
        if self.cfg.device != "cuda":
            yield self
            return
        self.model.to("cuda")
        self.inputs = tuple(x.to("cuda") for x in self.inputs)
        try:
            yield self
        finally:
            self.model.zero_grad(set_to_none=True)
            self.model.to("cpu")
            self.inputs = tuple(x.to("cpu") for x in self.inputs)
            _free_cuda("cuda")

    # ---- methods
    def plain(self) -> Row:
        """Eager PyTorch, every activation kept (the reference of every ratio)."""
        row = self._row("plain", "eager")
        self.plain_row = row
        self.plain_step = make_step(self.model, lambda: self.model(*self.inputs))
        return self._run(row, self.plain_step)

    def peers(self) -> list[Row]:
        """checkpoint_sequential at 2 / sqrt(n) / n/2 segments and per-block checkpointing."""
        if self.body is None:
            return []
        rows = []
        for method, setting, fwd in peer_forwards(self.body, self.inputs):
            row = self._row(method, setting)
            if not self._skip(row, 5.0):
                rows.append(self._run(row, make_step(self.model, fwd)))
        return rows

    def _plan(self, inputs: tuple[torch.Tensor, ...], **budget: Any) -> tuple[Any, Any, float]:
        assert self.remat is not None
        margin = 20.0 if self.cfg.deadline is not None else 0.0
        limit = min(self.cfg.time_limit_s, max(self.cfg.left() - margin - 10.0, 1.0))
        if self.cfg.cost_model is not None:
            budget["cost_model"] = self.cfg.cost_model
        t0 = time.perf_counter()
        with time_limit(self.cfg.left() - margin if self.cfg.deadline is not None else None):
            wrapper = self.remat(WithLoss(self.model), inputs, time_limit_s=limit, **budget)
        plan_s = time.perf_counter() - t0
        self.plan_s_est = max(self.plan_s_est, plan_s)
        return wrapper, wrapper.plan, plan_s

    def ours(self, setting: str, **budget: Any) -> Row:
        """Ours planned at ``budget_fraction=`` or ``budget_bytes=``, then measured."""
        row = self._row("ours", setting)
        row.budget_fraction = budget.get("budget_fraction")
        if self.remat is None:
            row.error = f"missing: {self.remat_error}"
            return self._finish(row)
        if self._skip(row, 1.5 * self.plan_s_est + 5.0):
            return row
        from mlcycle.train.remat import InfeasibleBudgetError

        wrapper = None
        try:
            wrapper, plan, row.plan_s = self._plan(self.inputs, **budget)
            row.budget_bytes = int(plan.budget_bytes)
            row.plan_peak_bytes = int(plan.peak_bytes)
            row.plan_plain_peak_bytes = int(plan.plain_peak_bytes)
            row.plan_cost_ratio = float(plan.cost_ratio)
            row.plan_solver = str(getattr(plan, "solver", ""))
            step = make_step(self.model, lambda: wrapper(*self.inputs), returns_loss=True)
            row.__dict__.update(self.measure(step))
            row.measured_over_plan = row.peak_bytes / row.plan_peak_bytes  # type: ignore[operator]
            row.plan_check_ok = abs(row.measured_over_plan - 1.0) <= self.cfg.plan_tol
        except InfeasibleBudgetError as exc:
            row.error = infeasible_text(exc, self.cfg.time_limit_s)
        except Exception as exc:  # noqa: BLE001 -- recorded in the row
            row.error = short_error(exc)
        finally:
            wrapper = None  # noqa: F841 -- frees the plan's buffers before the next row
            self._recover()
        return self._finish(row)

    def ours_fractions(self, fractions: tuple[float, ...]) -> list[Row]:
        """Ours at each budget fraction of the plan's plain peak."""
        return [self.ours(f"fraction={f:g}", budget_fraction=f) for f in fractions]

    def ours_target(self, fraction: float = TARGET_FRACTION) -> Row | None:
        """Ours with a budget of ``fraction`` x plain's measured peak above the base (what the
        anchors compare), plus the base itself (parameters, buffers, inputs, gradients)."""
        plain = self.plain_row
        if plain is None or not plain.ok:
            return None
        peak, above = plain.peak_bytes or 0, plain.peak_above_base
        cap = int(peak - (1.0 - fraction) * above) if above else int(fraction * peak)
        return self.ours(f"@{fraction:g}x plain", budget_bytes=cap)

    def ours_at_peers(self) -> list[Row]:
        """Ours with ``budget_bytes`` = each eager peer's measured peak (equal memory)."""
        done: list[int] = [
            r.budget_bytes for r in self.rows if r.method == "ours" and r.budget_bytes
        ]
        rows = []
        peers = [r for r in self.rows if r.method in EAGER_PEERS and r.ok]
        for peer in sorted(peers, key=lambda r: r.peak_bytes or 0):
            cap = int(peer.peak_bytes or 0)
            if any(abs(b - cap) <= 0.005 * cap for b in done):
                continue
            done.append(cap)
            rows.append(self.ours(f"@{peer.method}:{peer.setting}", budget_bytes=cap))
        return rows

    def compiled(self, budgets: tuple[float, ...], skip_reason: str | None = None) -> list[Row]:
        """torch.compile at each ``activation_memory_budget``; ``time_ratio_own`` vs its 1.0."""
        rows: list[Row] = []
        if not budgets:
            return rows
        import torch._functorch.config as fcfg

        ref: float | None = None
        for b in budgets:
            row = self._row("compile", f"budget={b:g}")
            if skip_reason:
                row.error = f"skipped: {skip_reason}"
                rows.append(self._finish(row))
                continue
            if self._skip(row, min(self.cfg.compile_limit_s, 60.0)):
                rows.append(row)
                continue
            try:
                torch._dynamo.reset()
                with fcfg.patch(activation_memory_budget=b):
                    compiled = torch.compile(self.model)
                    step = make_step(self.model, lambda: compiled(*self.inputs))  # noqa: B023
                    t0 = time.perf_counter()
                    limit = min(self.cfg.compile_limit_s, max(self.cfg.left() - 10.0, 1.0))
                    with time_limit(limit):
                        step()
                        _sync(self.cfg.device)
                    row.compile_s = time.perf_counter() - t0
                    # On the CPU a dispatch-mode tracker would make dynamo run the step eagerly
                    # (the peak came out exactly plain's): the compiled peak is not measured.
                    on_cpu = self.cfg.device == "cpu"
                    row.__dict__.update(self.measure(step, cpu_peak_too=not on_cpu))
                    if on_cpu:
                        row.tracker = "none: compiled CPU code is invisible to the tracker"
            except Exception as exc:  # noqa: BLE001 -- recorded in the row
                row.error = short_error(exc)
                self._recover()
            finally:
                torch._dynamo.reset()
            if row.error is None and row.step_s and b == 1.0:
                ref = row.step_s
            if row.error is None and row.step_s and ref:
                row.time_ratio_own = row.step_s / ref
            rows.append(self._finish(row))
        return rows

    # ---- largest batch under a cap
    def inputs_at(self, batch: int) -> tuple[torch.Tensor, ...]:
        """Example inputs like ours at another batch size (same seed, same kinds)."""
        out = []
        gen = torch.Generator().manual_seed(batch)
        for x in self.inputs:
            shape = (batch, *x.shape[1:])
            if x.is_floating_point():
                new = torch.randn(shape, generator=gen, dtype=x.dtype)
            else:
                new = torch.randint(0, int(x.max()) + 1, shape, generator=gen, dtype=x.dtype)
            out.append(new.to(x.device))
        return tuple(out)

    def _peak_once(self, step: Callable[[], None], inputs: tuple[torch.Tensor, ...]) -> int:
        """The peak of one step after one warm-up step (first-call effects excluded)."""
        step()
        self.model.zero_grad(set_to_none=True)
        if self.cfg.device == "cuda":
            _free_cuda("cuda")
            torch.cuda.reset_peak_memory_stats()
            step()
            _sync("cuda")
            return int(torch.cuda.max_memory_allocated())
        return cpu_peak(step, self.resident(inputs), self.cfg.tracker)[0]

    def batch_search(self, max_tries: int = 5) -> dict[str, Any]:
        """Largest batch within cap = plain's measured peak at B: ours vs the leanest peer."""
        plain = self.plain_row
        result: dict[str, Any] = {"model": self.name, "base_batch": self.batch}
        if plain is None or not plain.ok:
            result["error"] = "plain was not measured"
            return result
        cap = int(plain.peak_bytes or 0)
        tol = 1.0 + self.cfg.mem_tol
        result.update(cap_bytes=cap, plain_max_batch=self.batch)
        from mlcycle.train.remat import InfeasibleBudgetError

        keep: dict[str, Any] = {}

        def fits_ours(b: int) -> tuple[bool, dict[str, Any]]:
            inputs = self.inputs_at(b)
            try:
                wrapper, plan, plan_s = self._plan(inputs, budget_bytes=cap)
            except InfeasibleBudgetError as exc:
                return False, {"reason": infeasible_text(exc, self.cfg.time_limit_s)}
            except torch.cuda.OutOfMemoryError:
                self._recover()
                return False, {"reason": "CUDA out of memory while planning"}
            try:
                peak = self._peak_once(
                    make_step(self.model, lambda: wrapper(*inputs), returns_loss=True), inputs
                )
            except torch.cuda.OutOfMemoryError:
                self._recover()
                return False, {"reason": "CUDA out of memory", "plan_s": plan_s}
            good = peak <= cap * tol
            if good:
                keep.update(wrapper=wrapper, inputs=inputs, batch=b)
            info = {"peak_bytes": peak, "plan_peak_bytes": int(plan.peak_bytes), "plan_s": plan_s}
            return good, info

        if self.remat is None:
            result["ours_error"] = f"missing: {self.remat_error}"
        else:
            try:
                ok, probes = search_largest(fits_ours, self.batch, max_tries, self.cfg)
                result.update(ours_max_batch=ok, ours_probes=probes)
                result["max_batch_ratio"] = ok / self.batch
                if keep.get("batch") == ok and ok > self.batch:
                    wrapper, inputs = keep["wrapper"], keep["inputs"]
                    m = self.measure(
                        make_step(self.model, lambda: wrapper(*inputs), returns_loss=True),
                        inputs,
                        False,
                    )
                    result["ours_step_s_at_max"] = m["step_s"]
                    result["throughput_ratio"] = (ok / m["step_s"]) / (self.batch / plain.step_s)  # type: ignore[operator]
            except Exception as exc:  # noqa: BLE001 -- recorded in the result
                result["ours_error"] = short_error(exc)
            finally:
                keep.clear()
                self._recover()

        peers = [r for r in self.rows if r.method in EAGER_PEERS and r.ok]
        if self.body is not None and peers and self.cfg.left() > 10:
            lean = min(peers, key=lambda r: r.peak_bytes or 0)
            result["peer"] = f"{lean.method}:{lean.setting}"

            def fits_peer(b: int) -> tuple[bool, dict[str, Any]]:
                inputs = self.inputs_at(b)
                fwd = next(
                    f
                    for m, s, f in peer_forwards(self.body or [], inputs)
                    if (m, s) == (lean.method, lean.setting)
                )
                try:
                    peak = self._peak_once(make_step(self.model, fwd), inputs)
                except torch.cuda.OutOfMemoryError:
                    self._recover()
                    return False, {"reason": "CUDA out of memory"}
                return peak <= cap * tol, {"peak_bytes": peak}

            try:
                ok, probes = search_largest(fits_peer, self.batch, max_tries, self.cfg)
                result.update(peer_max_batch=ok, peer_probes=probes)
            except Exception as exc:  # noqa: BLE001 -- recorded in the result
                result["peer_error"] = short_error(exc)
            self._recover()
        return result


def search_largest(
    fits: Callable[[int], tuple[bool, dict[str, Any]]], base: int, max_tries: int, cfg: Config
) -> tuple[int, list[dict[str, Any]]]:
    """The largest batch >= ``base`` that ``fits`` (which is assumed of ``base``): doubling
    from 2 * base until one fails, then bisection, ``max_tries`` probes at most, stopping when
    the interval is within base / 4 or the time budget runs out."""
    ok, bad = base, None
    probes: list[dict[str, Any]] = []
    b = 2 * base
    while len(probes) < max_tries and cfg.left() > 15:
        t0 = time.perf_counter()
        good, info = fits(b)
        probes.append({"batch": b, "fits": good, "s": round(time.perf_counter() - t0, 2), **info})
        if good:
            ok = b
        else:
            bad = b
        if bad is None:
            b *= 2
        else:
            if bad - ok <= max(1, base // 4):
                break
            b = (ok + bad) // 2
    return ok, probes


# --------------------------------------------------------------------------------------------
# Claims and the figure


def _ratio_035(row: Row) -> float:
    """The memory ratio of the 0.35x claim: the peak above the base (parameters, buffers,
    inputs and one step's gradients) over plain's, as the anchors measure it; the absolute
    ratio where no base was measured."""
    ratio = row.mem_ratio_above_base if row.mem_ratio_above_base is not None else row.mem_ratio
    return ratio if ratio is not None else math.inf


def claims_of(
    rows: list[Row], searches: list[dict[str, Any]], mem_tol: float
) -> tuple[dict[str, Any], dict[str, Any]]:
    """The three claims (see the module docstring) and the per-model evidence behind them."""
    detail: dict[str, Any] = {}
    faster: list[bool] = []
    overheads: list[float] = []
    for model in dict.fromkeys(r.model for r in rows):
        mine = [r for r in rows if r.model == model]
        ours = [r for r in mine if r.method == "ours" and r.ok]
        peers = [r for r in mine if r.method in EAGER_PEERS and r.ok]
        d: dict[str, Any] = {"peers": []}
        for p in peers:
            assert p.peak_bytes is not None and p.step_s is not None
            within = [o for o in ours if (o.peak_bytes or 0) <= p.peak_bytes * (1 + mem_tol)]
            best = min(within, key=lambda o: o.time_ratio or math.inf) if within else None
            won = best is not None and (best.time_ratio or math.inf) < (p.time_ratio or 0.0)
            faster.append(won)
            d["peers"].append(
                {
                    "peer": f"{p.method}:{p.setting}",
                    "peer_time_ratio": p.time_ratio,
                    "peer_mem_ratio": p.mem_ratio,
                    "ours": best.setting if best else None,
                    "ours_time_ratio": best.time_ratio if best else None,
                    "ours_mem_ratio": best.mem_ratio if best else None,
                    "faster": won,
                }
            )
        low = [o for o in ours if _ratio_035(o) <= TARGET_FRACTION * (1 + mem_tol)]
        if low:
            pick = min(low, key=lambda o: o.time_ratio or math.inf)
            d["at_035"] = {
                "setting": pick.setting,
                "time_ratio": pick.time_ratio,
                "mem_ratio": pick.mem_ratio,
                "mem_ratio_above_base": pick.mem_ratio_above_base,
            }
            overheads.append(pick.time_ratio or math.inf)
        else:
            at = [o for o in ours if o.budget_fraction == TARGET_FRACTION]
            d["at_035"] = (
                {
                    "note": "no ours row measured at <= 0.35x plain",
                    "fraction_0.35_row": {
                        "time_ratio": at[0].time_ratio,
                        "mem_ratio": at[0].mem_ratio,
                    },
                }
                if at
                else {"note": "no ours row measured at <= 0.35x plain"}
            )
        detail[model] = d
    ours_any = any(r.method == "ours" and r.ok for r in rows)
    ratio = None
    for s in searches:
        if "max_batch_ratio" in s:
            ratio = s["max_batch_ratio"] if ratio is None else min(ratio, s["max_batch_ratio"])
    claims = {
        "faster_at_equal_memory": (all(faster) if faster else None) if ours_any else None,
        "overhead_at_035": max(overheads) if overheads else None,
        "max_batch_ratio": ratio,
    }
    return claims, detail


def pareto(points: list[tuple[float, float]]) -> list[tuple[float, float]]:
    """The points no other point beats on both memory (x) and time (y), by memory."""
    front: list[tuple[float, float]] = []
    for x, y in sorted(points):
        if not front or y < front[-1][1]:
            front.append((x, y))
    return front


def plot(rows: list[Row], path: Path) -> Path | None:
    """time_ratio vs mem_ratio per model, each method's points and Pareto front."""
    try:
        from _common import pyplot
    except ImportError:
        return None
    plt = pyplot()
    models = list(dict.fromkeys(r.model for r in rows))
    if not models:
        return None
    fig, axes = plt.subplots(1, len(models), figsize=(6 * len(models), 4.6), squeeze=False)
    styles = {
        "plain": ("k", "s"),
        "checkpoint_sequential": ("tab:blue", "o"),
        "per_block": ("tab:cyan", "D"),
        "compile": ("tab:gray", "^"),
        "ours": ("tab:red", "*"),
    }
    for ax, model in zip(axes[0], models, strict=True):
        for method, (color, marker) in styles.items():
            pts = []
            for r in rows:
                if r.model != model or r.method != method or not r.ok or r.mem_ratio is None:
                    continue
                y = r.time_ratio_own if method == "compile" else r.time_ratio
                if y is not None:
                    pts.append((r.mem_ratio, y))
            if not pts:
                continue
            label = "compile (time vs its own 1.0)" if method == "compile" else method
            ax.scatter(*zip(*pts, strict=True), color=color, marker=marker, label=label, s=50)
            front = pareto(pts)
            if len(front) > 1:
                ax.step(*zip(*front, strict=True), where="post", color=color, alpha=0.6)
        ax.set_title(model)
        ax.set_xlabel("measured peak / plain peak")
        ax.set_ylabel("step time / plain step time")
        ax.axvline(TARGET_FRACTION, color="tab:red", ls=":", lw=0.8)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    fig.suptitle("One training step: time vs peak memory (lower-left is better)")
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


# --------------------------------------------------------------------------------------------
# The run


def run_all(
    models: list[tuple[str, dict[str, Any]]],
    cfg: Config,
    emit: Callable[[Row], None],
    *,
    fractions: tuple[float, ...],
    compile_budgets: tuple[float, ...] = (),
    compile_skip: str | None = None,
    search_on: str | None = None,
    search_tries: int = 5,
    log: Callable[[str], None] = lambda s: None,
) -> tuple[list[Row], list[dict[str, Any]], list[str], bool]:
    """Every model through every method, in phases so that a time budget cuts the extras
    first: (1) per model plain, the eager peers, ours at ``fractions`` and at 0.35x plain's
    measured peak; (2) per model ours at each peer's measured peak; (3) torch.compile;
    (4) the largest-batch search on ``search_on``.

    Returns the rows (grouped by model), the batch-search results, notes, and whether the
    harness itself failed (a model that did not build, a plain or peer step that crashed).
    """
    searches: list[dict[str, Any]] = []
    notes: list[str] = []
    fatal = False
    benches: list[ModelBench] = []
    for name, kw in models:
        if cfg.left() < 30:
            notes.append(f"{name}: skipped, {cfg.left():.0f} s left of the time budget")
            continue
        log(f"{name} {kw}: building")
        try:
            bench = ModelBench(name, kw, cfg, emit)
        except Exception as exc:  # noqa: BLE001 -- noted, next model
            notes.append(f"{name}: build failed: {short_error(exc)}")
            fatal = True
            continue
        benches.append(bench)
        if bench.body_note:
            notes.append(f"{name}: {bench.body_note}")
        with bench.active():
            bench.plain()
            bench.peers()
            if bench.remat is None:
                bench.ours("missing")
            else:
                bench.ours_fractions(fractions)
                bench.ours_target()
    for bench in benches:
        if bench.remat is not None and cfg.left() > 30:
            log(f"{bench.name}: ours at each peer's measured peak")
            with bench.active():
                bench.ours_at_peers()
    for bench in benches:
        if compile_budgets:
            with bench.active():
                bench.compiled(compile_budgets, compile_skip)
    for bench in benches:
        if bench.name == search_on and cfg.left() > 30:
            log(f"{bench.name}: largest batch under plain's peak")
            with bench.active():
                searches.append(bench.batch_search(search_tries))
    rows = [r for bench in benches for r in bench.rows]
    benches.clear()
    _free_cuda(cfg.device)
    for r in rows:
        if r.method in ("plain", *EAGER_PEERS) and r.error and not r.error.startswith("skipped"):
            notes.append(f"{r.model} {r.method} {r.setting}: {r.error}")
            fatal = True
    return rows, searches, notes, fatal


def device_name(device: str) -> str:
    if device == "cuda":
        return f"cuda: {torch.cuda.get_device_name()} (torch {torch.__version__})"
    return f"cpu: {torch.get_num_threads()} threads (torch {torch.__version__})"


def _fmt_mib(n: int | None) -> str:
    return "-" if n is None else f"{n / MIB:,.1f}"


def _fmt(x: float | None, digits: int = 3) -> str:
    return "-" if x is None else f"{x:.{digits}f}"


def results_table(rows: list[Row], title: str) -> Any:
    """The rows as a rich table (checkpoint_sequential shortened to ckpt_seq)."""
    from rich.table import Table

    table = Table(title=title)
    for col in (
        "model",
        "method",
        "setting",
        "step s",
        "peak MiB",
        "time x",
        "mem x",
        "plan MiB",
        "plan cost",
        "meas/plan",
        "note",
    ):
        text = col in ("model", "method", "setting", "note")
        table.add_column(
            col,
            justify="left" if text else "right",
            no_wrap=True,
            overflow="ellipsis",
            min_width=len(col) if col != "note" else None,
            max_width=34 if col == "note" else None,
        )

    def short(text: str) -> str:
        return text.replace("checkpoint_sequential", "ckpt_seq").replace("segments=", "seg=")

    for r in rows:
        t = _fmt(r.time_ratio, 2)
        if r.time_ratio_own is not None:
            t += f" ({r.time_ratio_own:.2f} own)"
        table.add_row(
            r.model,
            short(r.method),
            short(r.setting),
            _fmt(r.step_s, 4),
            _fmt_mib(r.peak_bytes),
            t,
            _fmt(r.mem_ratio, 2),
            _fmt_mib(r.plan_peak_bytes),
            _fmt(r.plan_cost_ratio, 3),
            _fmt(r.measured_over_plan, 2),
            r.error or "",
        )
    return table


def main() -> int:
    """Parse options, run, print the table, draw the figure, print the JSON."""
    from _common import make_console, make_parser, print_json_last

    parser = make_parser(NAME, __doc__ or "")
    parser.add_argument("--device", choices=("auto", "cpu", "cuda"), default="auto")
    parser.add_argument("--steps", type=int, default=None, help="timed steps per row")
    parser.add_argument(
        "--compile",
        choices=("auto", "on", "off"),
        default="auto",
        help="torch.compile peers (auto: off in --quick)",
    )
    parser.add_argument("--tracker", choices=("auto", "own", "mlcycle"), default="auto")
    parser.add_argument("--mem-tol", type=float, default=0.02)
    parser.add_argument("--time-limit", type=float, default=None, help="planner limit, s")
    parser.add_argument(
        "--threads",
        type=int,
        default=None,
        help="CPU threads (default: 1 with --quick, where the 2 cores are shared and OpenMP's "
        "spinning makes timings erratic; else torch's default)",
    )
    args = parser.parse_args()
    if args.threads or args.quick:
        torch.set_num_threads(args.threads or 1)
    console = make_console(args.json)
    t_start = time.monotonic()

    cuda = torch.cuda.is_available()
    device = (
        "cuda"
        if args.device == "cuda" or (args.device == "auto" and cuda and not args.quick)
        else "cpu"
    )
    if device == "cuda":
        torch.backends.cudnn.benchmark = False  # as the anchors
    if args.quick:
        models = [("resnet-tiny", {"batch": 32}), ("gpt2-tiny", {"batch": 64})]
        cfg = Config(
            device=device,
            steps=args.steps or 5,
            warmup=1,
            min_time_s=0.5,
            time_limit_s=args.time_limit or 3.0,
            deadline=time.monotonic() + 110,
        )
        fractions, tries = (0.7, 0.5, 0.35), 4
    elif device == "cuda":
        models = [("resnet50", {"batch": 128}), ("gpt2-small", {"batch": 16, "seq_len": 1024})]
        cfg = Config(
            device=device, steps=args.steps or 6, warmup=2, time_limit_s=args.time_limit or 30.0
        )
        fractions, tries = (0.7, 0.5, 0.35, 0.25), 5
    else:
        models = [("resnet50", {"batch": 8}), ("gpt2-small", {"batch": 4, "seq_len": 256})]
        cfg = Config(
            device=device, steps=args.steps or 3, warmup=1, time_limit_s=args.time_limit or 30.0
        )
        fractions, tries = (0.7, 0.5, 0.35, 0.25), 5
    cfg.mem_tol, cfg.tracker = args.mem_tol, args.tracker
    use_compile = args.compile == "on" or (args.compile == "auto" and not args.quick)
    compile_skip = (
        None
        if use_compile
        else "in --quick (a CPU compile takes ~1 min each)"
        if args.quick
        else "--compile off"
    )
    if use_compile and device == "cpu":
        import shutil

        if shutil.which("gcc") is None and shutil.which("cc") is None:
            compile_skip = "no C++ compiler for inductor on the CPU"
    search_on = next((n for n, _ in models if n.startswith("resnet")), None)
    cpsat_note = skip_cpsat_if_missing()
    _, remat_error = load_rematerialize()
    console.print(f"[bold]{NAME}[/]: {CLAIM}")
    console.print(f"device: {device_name(device)}; models: {models}")
    if remat_error:
        console.print(f"[yellow]ours: {remat_error}; its rows are marked missing[/]")
    if cpsat_note:
        console.print(f"[yellow]{cpsat_note}[/]")

    def emit(row: Row) -> None:
        extra = f" [red]{row.error}[/]" if row.error else ""
        console.print(
            f"  {row.model:<12} {row.method:<22} {row.setting:<36} step {_fmt(row.step_s, 4)} s"
            f"  peak {_fmt_mib(row.peak_bytes)} MiB  t {_fmt(row.time_ratio)}"
            f"  m {_fmt(row.mem_ratio)}  m-base {_fmt(row.mem_ratio_above_base)}"
            + (f"  plan: cost {_fmt(row.plan_cost_ratio)}" if row.plan_cost_ratio else "")
            + (f" meas/plan {_fmt(row.measured_over_plan)}" if row.measured_over_plan else "")
            + extra,
            highlight=False,
        )

    rows, searches, notes, fatal = run_all(
        models,
        cfg,
        emit,
        fractions=fractions,
        compile_budgets=(1.0, 0.5, 0.2),
        compile_skip=compile_skip,
        search_on=search_on,
        search_tries=tries,
        log=lambda s: console.print(f"[dim]{s}[/]"),
    )
    claims, detail = claims_of(rows, searches, cfg.mem_tol)

    console.print(results_table(rows, f"{NAME}: one training step ({device_name(device)})"))
    for s in searches:
        console.print(
            f"largest batch under cap {_fmt_mib(s.get('cap_bytes'))} MiB on {s['model']}: "
            f"plain {s.get('plain_max_batch')}, ours {s.get('ours_max_batch', '-')} "
            f"(x{_fmt(s.get('max_batch_ratio'), 2)}), {s.get('peer', 'peer')} "
            f"{s.get('peer_max_batch', '-')}  {s.get('ours_error', '')}",
            highlight=False,
        )
    console.print(f"claims: {claims}", highlight=False)
    for n in notes:
        console.print(f"[red]{n}[/]")
    figure = plot(rows, args.out / "remat_train.png")
    if figure:
        console.print(f"figure: {figure}")
    elapsed = time.monotonic() - t_start
    console.print(f"elapsed {elapsed:.1f} s")
    if args.json:
        print_json_last(
            {
                "benchmark": NAME,
                "claim": CLAIM,
                "device": device_name(device),
                "quick": bool(args.quick),
                "models": [[n, kw] for n, kw in models],
                "loss": "out.float().square().mean()",
                "mem_tol": cfg.mem_tol,
                "ours_available": remat_error is None,
                "ours_error": remat_error,
                "cpsat_note": cpsat_note,
                "rows": [asdict(r) for r in rows],
                "claims": claims,
                "claims_detail": detail,
                "batch_search": searches,
                "notes": notes,
                "figure": figure,
                "elapsed_s": elapsed,
            }
        )
    return 1 if fatal else 0


if __name__ == "__main__":
    raise SystemExit(main())
