"""Compute costs of the nodes of a captured joint graph: measured, or estimated from FLOPs.

Checkmate (Jain et al., MLSys 2020, Sec. 5) makes its rematerialization plans hardware-aware
with a *profile-based* cost model: each operation of the training graph is profiled on the
target accelerator, and the solver trades the memory of an activation against the measured
time of recomputing it. This module provides that profile and a static stand-in:

- :func:`measure_costs` runs the joint forward+backward graph node by node on real tensors and
  keeps the median wall time of each node over a few runs (after one warm-up run), with a
  device synchronisation around every node on CUDA so that a kernel's time is charged to the
  node that launched it.
- :func:`estimate_costs` runs nothing: it counts each node's FLOPs with
  :class:`torch.utils.flop_counter.FlopCounterMode` on the fake tensors recorded at capture and
  turns them into seconds with a roofline, ``max(flops / peak_flops, bytes_moved / mem_bw)``
  plus a per-op dispatch overhead, so that memory-bound elementwise ops get a nonzero cost too.

:func:`resolve_cost_model` picks between them: ``"auto"`` measures on CUDA, where per-kernel
times are stable and a few repeats of a step take well under a second, and estimates on the
CPU, where one node-by-node run of a large network takes many seconds, timings of sub-millisecond
ops are noisy, and a CPU profile says little about the accelerator the plan is usually made for.
Both return seconds, so graphs costed either way can be compared; the planner only uses ratios.
"""

from __future__ import annotations

import operator
import statistics
import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import fx

__all__ = [
    "DeviceSpec",
    "CPU_SPEC",
    "GENERIC_CUDA_SPEC",
    "device_spec",
    "measure_costs",
    "estimate_costs",
    "resolve_cost_model",
    "node_costs",
]

COST_MODELS = ("auto", "measure", "flops")


@dataclass(frozen=True)
class DeviceSpec:
    """Roofline constants of a device.

    Attributes:
        name: a label.
        peak_flops: float32 FLOP/s (no tensor cores).
        peak_flops_half: float16/bfloat16 FLOP/s on tensor cores (dense).
        mem_bw: memory bandwidth in bytes/s.
        overhead: seconds of dispatch or kernel-launch overhead charged to every op.
    """

    name: str
    peak_flops: float
    peak_flops_half: float
    mem_bw: float
    overhead: float


#: A generic server CPU core complex as PyTorch uses it: 100 GFLOP/s, 20 GB/s, 2 us per op.
CPU_SPEC = DeviceSpec("cpu", 1e11, 1e11, 2e10, 2e-6)
#: H100 SXM (the default for an unknown CUDA device): 67 TFLOP/s fp32, 989 TFLOP/s bf16 dense,
#: 3.35 TB/s HBM3, 5 us launch overhead.
GENERIC_CUDA_SPEC = DeviceSpec("H100 SXM", 67e12, 989e12, 3.35e12, 5e-6)
# Datasheet peaks, matched against torch.cuda.get_device_name() in this order.
_CUDA_SPECS: tuple[tuple[str, DeviceSpec], ...] = (
    ("H200", DeviceSpec("H200", 67e12, 989e12, 4.8e12, 5e-6)),
    ("H100 PCIE", DeviceSpec("H100 PCIe", 51e12, 756e12, 2.0e12, 5e-6)),
    ("H100", GENERIC_CUDA_SPEC),
    ("A100", DeviceSpec("A100", 19.5e12, 312e12, 2.0e12, 5e-6)),
    ("L4", DeviceSpec("L4", 30e12, 121e12, 0.3e12, 5e-6)),
    ("V100", DeviceSpec("V100", 15.7e12, 125e12, 0.9e12, 5e-6)),
)

# Ops that return an alias of (part of) their input and so move and allocate nothing.
# ``is_view`` on the schema catches most; ``_unsafe_view`` and ``reshape`` carry no alias
# annotation although they reuse the input's storage in the graphs AOTAutograd produces.
_ALIAS_OPS = frozenset(
    {
        "view",
        "reshape",
        "_unsafe_view",
        "_reshape_alias",
        "t",
        "transpose",
        "permute",
        "expand",
        "squeeze",
        "unsqueeze",
        "slice",
        "select",
        "alias",
        "as_strided",
        "detach",
        "view_as",
        "unflatten",
        "split",
        "split_with_sizes",
        "unbind",
        "chunk",
        "narrow",
        "diagonal",
        "unfold",
        "view_as_real",
        "view_as_complex",
    }
)


def _is_alias(n: fx.Node) -> bool:
    """True for ``getitem`` and view ops: nodes that allocate no new memory."""
    if n.target is operator.getitem:
        return True
    op = n.target
    if isinstance(op, torch._ops.OpOverload):
        return bool(getattr(op, "is_view", False)) or op.overloadpacket.__name__ in _ALIAS_OPS
    return False


def _tensor_bytes(v: Any) -> int:
    """Bytes of a tensor, or the sum over a (nested) tuple or list of them; 0 for the rest."""
    if isinstance(v, torch.Tensor):
        return int(v.numel()) * v.element_size()
    if isinstance(v, (tuple, list)):
        return sum(_tensor_bytes(x) for x in v)
    return 0


def _is_tangent(n: fx.Node) -> bool:
    return n.op == "placeholder" and str(n.target).startswith("tangents")


def device_spec(device: torch.device | str | None = None) -> DeviceSpec:
    """The roofline constants for ``device``.

    Args:
        device: a CUDA device (looked up by its name; unknown GPUs get
            :data:`GENERIC_CUDA_SPEC`), or anything else for :data:`CPU_SPEC`.

    Returns:
        The :class:`DeviceSpec`.
    """
    dev = torch.device(device) if device is not None else torch.device("cpu")
    if dev.type != "cuda":
        return CPU_SPEC
    try:
        name = torch.cuda.get_device_name(dev).upper()
    except Exception:  # no driver: estimating for a CUDA graph on a CPU host
        return GENERIC_CUDA_SPEC
    for key, spec in _CUDA_SPECS:
        if key in name:
            return spec
    return GENERIC_CUDA_SPEC


def resolve_cost_model(cost_model: str, device: torch.device | str | None) -> str:
    """Turn ``"auto"`` into ``"measure"`` (on CUDA) or ``"flops"`` (elsewhere).

    Args:
        cost_model: ``"auto"``, ``"measure"`` or ``"flops"``.
        device: where the step runs.

    Returns:
        ``"measure"`` or ``"flops"``.

    Raises:
        ValueError: for any other ``cost_model``.
    """
    if cost_model not in COST_MODELS:
        raise ValueError(
            f"cost_model must be one of {', '.join(map(repr, COST_MODELS))}, got "
            f"{cost_model!r}; e.g. cost_model='flops' for a quick static estimate."
        )
    if cost_model != "auto":
        return cost_model
    dev = torch.device(device) if device is not None else torch.device("cpu")
    return "measure" if dev.type == "cuda" else "flops"


def node_costs(
    gm: fx.GraphModule,
    example_args: Sequence[torch.Tensor] | None = None,
    *,
    cost_model: str = "auto",
    repeats: int = 3,
) -> dict[str, float]:
    """Per-node cost in seconds with the chosen model (see :func:`resolve_cost_model`).

    Args:
        gm: the joint graph.
        example_args: the primal placeholder values (needed to measure).
        cost_model: ``"auto"``, ``"measure"`` or ``"flops"``.
        repeats: timed runs when measuring.

    Returns:
        ``{fx node name: seconds}`` for every ``call_function`` node.
    """
    device = _graph_device(gm, example_args)
    chosen = resolve_cost_model(cost_model, device)
    if chosen == "measure":
        if example_args is None:
            raise ValueError("cost_model='measure' needs example_args (the primal values).")
        return measure_costs(gm, example_args, repeats=repeats)
    return estimate_costs(gm, device=device)


class _TimingInterpreter(fx.Interpreter):
    """Runs the graph node by node and records each call_function node's wall time."""

    def __init__(self, gm: fx.GraphModule, sync: bool) -> None:
        super().__init__(gm, garbage_collect_values=True)
        self.sync = sync
        self.times: dict[str, float] = {}

    def run_node(self, n: fx.Node) -> Any:
        if n.op != "call_function":
            return super().run_node(n)
        with self._set_current_node(n):
            args, kwargs = self.fetch_args_kwargs_from_env(n)
            if self.sync:
                torch.cuda.synchronize()
            start = time.perf_counter()
            out = self.call_function(n.target, args, kwargs)
            if self.sync:
                torch.cuda.synchronize()
            self.times[n.name] = time.perf_counter() - start
        return out


def measure_costs(
    gm: fx.GraphModule, example_args: Sequence[torch.Tensor], repeats: int = 3
) -> dict[str, float]:
    """Measure each node's wall time by running the joint graph node by node on real tensors.

    This is the profile of Checkmate Sec. 5: every node runs in its real context (the real
    shapes, layouts and inputs of the step), once to warm up (allocator, kernel selection,
    lazy initialisation) and then ``repeats`` times; the median of the timed runs is kept. On
    CUDA the device is synchronised before and after each node. Nothing of the caller's state
    changes: inputs that some op would mutate are cloned first, and the CPU and CUDA random
    number generators (dropout draws) are restored afterwards.

    Args:
        gm: the joint graph from :func:`mlcycle.train.remat.capture`, i.e. ``graph.meta["fx"]``.
        example_args: real values for the primal placeholders (parameters, buffers, inputs, in
            placeholder order); tangent placeholders get ``ones`` of their recorded shape.
            Values for all placeholders, tangents included, are accepted too.
        repeats: timed runs; the median per node is returned.

    Returns:
        ``{fx node name: seconds}`` for every ``call_function`` node.

    Raises:
        ValueError: ``example_args`` does not match the placeholders, or ``repeats < 1``.
    """
    if repeats < 1:
        raise ValueError(f"repeats must be >= 1, got {repeats}.")
    phs = [n for n in gm.graph.nodes if n.op == "placeholder"]
    primals = [n for n in phs if not _is_tangent(n)]
    args = list(example_args)
    if len(args) == len(primals) and len(primals) != len(phs):
        for n in phs[len(args) :]:
            val = n.meta.get("val")
            if not isinstance(val, torch.Tensor):
                raise ValueError(f"placeholder {n.name} has no recorded tensor shape.")
            args.append(torch.ones(val.shape, dtype=val.dtype, device=val.device))
    elif len(args) != len(phs):
        raise ValueError(
            f"the graph has {len(primals)} primal and {len(phs) - len(primals)} tangent "
            f"placeholders; got {len(args)} example_args. Pass the primal values in order "
            "(parameters, buffers, inputs)."
        )
    if _mutates(gm):
        args = [a.clone() if isinstance(a, torch.Tensor) else a for a in args]
    device = _graph_device(gm, args)
    sync = device.type == "cuda"
    interp = _TimingInterpreter(gm, sync)
    cpu_rng = torch.random.get_rng_state()
    cuda_rng = torch.cuda.get_rng_state_all() if torch.cuda.is_initialized() else None
    runs: list[dict[str, float]] = []
    try:
        with torch.no_grad():
            for r in range(repeats + 1):
                interp.times = {}
                interp.run(*args, enable_io_processing=False)
                if r:  # run 0 warms up
                    runs.append(interp.times)
    finally:
        torch.random.set_rng_state(cpu_rng)
        if cuda_rng is not None:
            torch.cuda.set_rng_state_all(cuda_rng)
    return {
        n.name: float(statistics.median(run[n.name] for run in runs))
        for n in gm.graph.nodes
        if n.op == "call_function"
    }


def estimate_costs(
    gm: fx.GraphModule, *, device: torch.device | str | None = None, spec: DeviceSpec | None = None
) -> dict[str, float]:
    """Estimate each node's time from its FLOPs and bytes with a roofline; nothing runs.

    FLOPs come from :class:`torch.utils.flop_counter.FlopCounterMode` applied to the op on the
    fake tensors that capture recorded in ``node.meta["val"]`` (matmuls, convolutions and their
    backward, attention); other ops count no FLOPs. Bytes moved are the bytes of the tensor
    inputs plus the output. The time is ``max(flops / peak, bytes / mem_bw) + overhead`` with
    the constants of :func:`device_spec`, the half-precision peak for float16/bfloat16 outputs;
    views and ``getitem`` cost the overhead only.

    Args:
        gm: the joint graph.
        device: the device to estimate for; by default the device of the recorded tensors.
        spec: explicit roofline constants, overriding ``device``.

    Returns:
        ``{fx node name: seconds}`` for every ``call_function`` node, each > 0.
    """
    from torch.utils.flop_counter import FlopCounterMode, flop_registry

    if spec is None:
        spec = device_spec(device if device is not None else _graph_device(gm, None))
    out: dict[str, float] = {}
    for n in gm.graph.nodes:
        if n.op != "call_function":
            continue
        if _is_alias(n):
            out[n.name] = spec.overhead
            continue
        val = n.meta.get("val")
        flops = 0
        packet = getattr(n.target, "overloadpacket", None)
        if packet is not None and packet in flop_registry:
            args, kwargs = fx.node.map_arg((n.args, n.kwargs), lambda a: a.meta.get("val"))
            try:
                with FlopCounterMode(display=False) as counter:
                    n.target(*args, **kwargs)
                flops = counter.get_total_flops()
            except Exception:  # a value without metadata: count bytes only
                flops = 0
        moved = _tensor_bytes(val) + sum(
            _tensor_bytes(a.meta.get("val")) for a in n.all_input_nodes
        )
        half = _dtype_of(val) in (torch.float16, torch.bfloat16)
        peak = spec.peak_flops_half if half else spec.peak_flops
        out[n.name] = max(flops / peak, moved / spec.mem_bw) + spec.overhead
    return out


def _dtype_of(val: Any) -> torch.dtype | None:
    if isinstance(val, torch.Tensor):
        return val.dtype
    if isinstance(val, (tuple, list)):
        for v in val:
            d = _dtype_of(v)
            if d is not None:
                return d
    return None


def _graph_device(gm: fx.GraphModule, args: Sequence[Any] | None) -> torch.device:
    for a in args or ():
        if isinstance(a, torch.Tensor):
            return a.device
    for n in gm.graph.nodes:
        val = n.meta.get("val")
        if isinstance(val, torch.Tensor):
            return val.device
    return torch.device("cpu")


def _mutates(gm: fx.GraphModule) -> bool:
    for n in gm.graph.nodes:
        schema = getattr(n.target, "_schema", None)
        if n.op == "call_function" and schema is not None and schema.is_mutable:
            return True
    return False
