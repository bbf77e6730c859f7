"""Capture one training step of a PyTorch module as a rematerialization :class:`Graph`.

The step is traced with AOTAutograd (``functorch.compile.aot_function``) into its *joint*
forward+backward fx graph: placeholders ``primals_*`` (parameters, buffers, then the example
inputs) and ``tangents_*`` (the incoming gradient of each differentiable output), and one output
node listing the forward outputs followed by one gradient per primal. The joint graph is caught
in the partition function and tracing stops there: tracing runs on fake tensors, so no real
forward or backward step runs and the module is left exactly as it was.

Every ``call_function`` node of the joint graph is a *fine* node. Cheap nodes (views,
``getitem`` of a multi-output op, pointwise ops) are then contracted into the group of their
producer, which keeps the graph a DAG, so that a ResNet-50 step becomes a few hundred *coarse*
nodes that the Checkmate planner (Jain et al., MLSys 2020) can solve. The executor partitions the
same joint graph along the recorded groups; see :func:`capture_graph` for what ``graph.meta``
holds.
"""

from __future__ import annotations

import functools
import linecache
import operator
import os
import sysconfig
import traceback
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import fx, nn

from mlcycle.train.remat.graph import Graph, Node, _topological
from mlcycle.train.remat.profile import (
    _is_alias,
    _is_tangent,
    _tensor_bytes,
    node_costs,
    resolve_cost_model,
)

__all__ = ["CaptureError", "capture_graph"]


class CaptureError(ValueError):
    """A module whose training step cannot be captured as a static joint graph."""


class _Captured(Exception):
    """Raised from the partition function once the joint graph is recorded: stops tracing."""


# -- public entry point ---------------------------------------------------------------------
def capture_graph(
    module: nn.Module,
    example_inputs: Any,
    *,
    cost_model: str = "auto",
    coarsen: bool = True,
    repeats: int = 3,
) -> Graph:
    """Capture one forward+backward step of ``module`` on ``example_inputs`` as a :class:`Graph`.

    The backward pass is the one of ``module(*example_inputs)`` with a gradient of ones for
    every differentiable output (as ``out.backward(torch.ones_like(out))``).

    Args:
        module: the model; its parameters, buffers (e.g. BatchNorm running statistics), gradients
            and training mode are left unchanged.
        example_inputs: a tensor or a tuple of tensors, passed positionally to ``module``.
        cost_model: ``"auto"`` (measure on CUDA, estimate from FLOPs on the CPU), ``"measure"``
            or ``"flops"``; see :mod:`mlcycle.train.remat.profile`.
        coarsen: contract cheap nodes (views, ``getitem``, pointwise ops) into their producer;
            False keeps one graph node per fx ``call_function`` node.
        repeats: timed runs per node when measuring (the median is kept).

    Returns:
        The graph, nodes in topological order. ``const_bytes`` is the memory of all
        placeholders (parameters, buffers, inputs, tangents); the graph outputs that are
        stashed (see ``"stash"`` below) are each node's ``Node.stash``. ``graph.meta`` holds
        what the executor needs:

        - ``"fx"``: the joint :class:`torch.fx.GraphModule`; its forward takes the flat
          placeholder values in order (``meta["placeholders"]``).
        - ``"groups"``: per graph node, the fx node names it runs, in execution order.
        - ``"exposed"``: per graph node, the fx names of its members read outside the group
          (by another group or by the graph output): what stays resident while it is kept.
        - ``"stash"``: per graph node, its members that are graph outputs although the node is
          not marked ``output`` (e.g. BatchNorm running statistics computed beside an
          activation, or a weight gradient computed beside an input gradient). The executor
          keeps these values from their first computation to the end of the step; their
          bytes are the node's ``stash``, not in its ``bytes``.
        - ``"reuse"``: per graph node, ``{member: input}``: the pointwise members that write
          their result into the storage of an input computed in the same group and dying there
          (see :func:`_reuse_in_group`); the node's ``transient`` counts no new allocation for
          them, and the executor runs them in place or with their ``out=`` overload
          (:func:`reuse_variant`).
        - ``"random"``: indices of graph nodes that draw random numbers (dropout): recomputing
          one draws a new mask unless the RNG state is restored first.
        - ``"placeholders"``: ``(fx name, kind, source)`` with kind ``"param"``, ``"buffer"``,
          ``"input"`` or ``"tangent"``; source is the qualified name or the position.
        - ``"outputs"``: the fx names (None for none) of the joint graph's outputs, in order.
        - ``"num_fwd_outputs"``: how many of ``outputs`` are forward outputs: first the new
          values of mutated inputs (``"mutated_inputs"``, the placeholder names, in order),
          then the module's flattened outputs; the rest are gradients, one per primal.
        - ``"out_spec"``: the pytree spec of the module's output.
        - ``"fine_nodes"``, ``"fine_costs"``, ``"fine_bytes"``: the fine graph.
        - ``"cost_model"``: ``"measure"`` or ``"flops"``, the model that was used.

    Raises:
        TypeError: ``module`` is not an ``nn.Module`` or the inputs are not tensors.
        ValueError: an unknown ``cost_model``.
        CaptureError: the step cannot be traced into a static graph (data-dependent control
            flow, ``.item()``, ops whose output shape depends on values, ...); the message
            names the construct and the line of the model's code.
    """
    if not isinstance(module, nn.Module):
        raise TypeError(
            f"capture needs a torch.nn.Module, got {type(module).__name__}; wrap a function in "
            "a Module whose forward calls it."
        )
    inputs = _check_inputs(example_inputs)
    device = _device_of(module, inputs)
    chosen = resolve_cost_model(cost_model, device)
    if repeats < 1:
        raise ValueError(f"repeats must be >= 1, got {repeats}.")

    joint = _trace_joint(module, inputs)
    fine = _analyse(joint.gm)
    costs = node_costs(
        joint.gm,
        [t.detach() for t in joint.primals],
        cost_model=chosen,
        repeats=repeats,
    )
    graph = _build_graph(joint, fine, costs, coarsen=coarsen)
    graph.name = type(module).__name__
    graph.meta["cost_model"] = chosen
    return graph


# -- tracing --------------------------------------------------------------------------------
@dataclass
class _Joint:
    gm: fx.GraphModule
    num_fwd_outputs: int
    placeholders: list[tuple[str, str, Any]]
    primals: list[torch.Tensor]
    mutated_inputs: list[str]
    out_spec: Any


def _check_inputs(example_inputs: Any) -> tuple[torch.Tensor, ...]:
    example = "e.g. capture(model, torch.randn(32, 3, 224, 224)) or capture(model, (x, mask))"
    if isinstance(example_inputs, torch.Tensor):
        return (example_inputs,)
    if isinstance(example_inputs, (tuple, list)):
        for k, x in enumerate(example_inputs):
            if not isinstance(x, torch.Tensor):
                raise TypeError(
                    f"example_inputs must be a tensor or a tuple of tensors, {example}; "
                    f"element {k} is of type {type(x).__name__}. Bind non-tensor arguments in the "
                    "module (or a wrapper module) instead."
                )
        if not example_inputs:
            raise TypeError(f"example_inputs is empty; pass at least one tensor, {example}.")
        return tuple(example_inputs)
    raise TypeError(
        f"example_inputs must be a tensor or a tuple of tensors, {example}; "
        f"got {type(example_inputs).__name__}."
    )


def _device_of(module: nn.Module, inputs: Sequence[torch.Tensor]) -> torch.device:
    tensors = [*module.parameters(), *inputs]
    return tensors[0].device if tensors else torch.device("cpu")


def functional_step(
    module: nn.Module, record: dict[str, Any] | None = None
) -> tuple[Any, list[str]]:
    """``step(*params, *buffers, *inputs)``: the module as a pure function, for AOTAutograd.

    The capture and the executor trace this same function, so both see the same joint graph
    (same fx node names). Returns the function and the parameter and buffer names, in order.
    """
    from torch.utils import _pytree as pytree

    names = [n for n, _ in module.named_parameters()] + [n for n, _ in module.named_buffers()]
    k = len(names)
    record = {} if record is None else record

    def step(*args: torch.Tensor) -> Any:
        out = torch.func.functional_call(
            module, dict(zip(names, args[:k], strict=True)), tuple(args[k:])
        )
        record["out_spec"] = pytree.tree_flatten(out)[1]
        try:  # which inputs the step mutates (BatchNorm running statistics)
            from torch._functorch._aot_autograd.functional_utils import has_data_mutation

            record["mutated"] = [bool(has_data_mutation(a)) for a in args]
        except Exception:  # private API; only the metadata is lost
            record.pop("mutated", None)
        return out

    return step, names


def _trace_joint(module: nn.Module, inputs: tuple[torch.Tensor, ...]) -> _Joint:
    from functorch.compile import aot_function

    named_params = list(module.named_parameters())
    named_buffers = list(module.named_buffers())
    flat = [p for _, p in named_params] + [b for _, b in named_buffers] + list(inputs)
    record: dict[str, Any] = {}
    step, names = functional_step(module, record)
    k = len(names)

    def partition(joint_module: fx.GraphModule, _joint_inputs: Any, **kwargs: Any) -> Any:
        record["gm"] = joint_module
        record["num_fwd_outputs"] = int(kwargs["num_fwd_outputs"])
        raise _Captured

    def identity(gm: fx.GraphModule, _example: Any) -> fx.GraphModule:
        return gm

    buffers_before = [(b, b.detach().clone()) for _, b in named_buffers]
    versions = [t._version for t in flat[:k]]
    compiled = aot_function(
        step,
        fw_compiler=identity,
        bw_compiler=identity,
        partition_fn=partition,
        num_params_buffers=k,
    )
    training = module.training
    try:
        with torch.enable_grad():
            compiled(*flat)
    except _Captured:
        pass
    except Exception as exc:
        raise CaptureError(_explain(module, exc)) from exc
    finally:
        module.train(training)
        # Tracing is on fake tensors and never writes real ones; restore anyway if it did.
        for (b, saved), v in zip(buffers_before, versions[len(named_params) :], strict=True):
            if b._version != v:
                with torch.no_grad():
                    b.copy_(saved)
    if "gm" not in record:
        raise CaptureError(
            f"Cannot capture {type(module).__name__}: its output does not require grad, so "
            "the step has no backward pass. Make sure some parameters have requires_grad=True "
            "and that the forward is not run under torch.no_grad()."
        )

    gm: fx.GraphModule = record["gm"]
    phs = [n for n in gm.graph.nodes if n.op == "placeholder"]
    primal_phs = [n for n in phs if not _is_tangent(n)]
    if len(primal_phs) != len(flat):
        raise CaptureError(
            f"Cannot capture {type(module).__name__}: the joint graph has {len(primal_phs)} "
            f"primal inputs for {len(flat)} parameters, buffers and inputs (an input aliasing "
            "a parameter?). Pass inputs that are distinct tensors."
        )
    placeholders: list[tuple[str, str, Any]] = []
    for i, n in enumerate(primal_phs):
        if i < len(named_params):
            placeholders.append((n.name, "param", names[i]))
        elif i < k:
            placeholders.append((n.name, "buffer", names[i]))
        else:
            placeholders.append((n.name, "input", i - k))
    tangent_phs = [n for n in phs if _is_tangent(n)]
    placeholders += [(n.name, "tangent", j) for j, n in enumerate(tangent_phs)]
    mutated = record.get("mutated") or []
    return _Joint(
        gm=gm,
        num_fwd_outputs=record["num_fwd_outputs"],
        placeholders=placeholders,
        primals=flat,
        mutated_inputs=[primal_phs[i].name for i, m in enumerate(mutated) if m],
        out_spec=record.get("out_spec"),
    )


# -- errors ---------------------------------------------------------------------------------
def _excluded_dirs() -> tuple[str, ...]:
    dirs = [os.path.dirname(torch.__file__), os.path.dirname(os.path.abspath(__file__))]
    try:
        import functorch

        dirs.append(os.path.dirname(functorch.__file__))
    except ImportError:  # pragma: no cover
        pass
    for key in ("stdlib", "platstdlib"):
        path = sysconfig.get_paths().get(key)
        if path:
            dirs.append(path)
    return tuple(os.path.realpath(d) + os.sep for d in dirs)


def _user_frame(exc: BaseException) -> traceback.FrameSummary | None:
    """The innermost traceback frame outside torch, the stdlib and this package's capture."""
    chain: list[BaseException] = []
    e: BaseException | None = exc
    while e is not None and e not in chain:
        chain.append(e)
        e = e.__cause__ or e.__context__
    excluded = _excluded_dirs()
    for e in reversed(chain):  # the root cause holds the deepest frames
        for frame in reversed(traceback.extract_tb(e.__traceback__)):
            path = os.path.realpath(frame.filename)
            if frame.filename.startswith("<") or path.startswith(excluded):
                continue
            return frame
    return None


def _explain(module: nn.Module, exc: BaseException) -> str:
    chain: list[BaseException] = []
    e: BaseException | None = exc
    while e is not None and e not in chain:
        chain.append(e)
        e = e.__cause__ or e.__context__
    kinds = {type(x).__name__ for x in chain}
    text = " ".join(str(x) for x in chain)
    frame = _user_frame(exc)
    source = ""
    where = "in the model's code (no source line found)"
    if frame is not None:
        source = (frame.line or linecache.getline(frame.filename, frame.lineno or 0)).strip()
        where = f"at {frame.filename}:{frame.lineno}"
    stripped = source.lstrip()
    if kinds & {"DataDependentOutputException", "GuardOnDataDependentSymNode"} or (
        "data-dependent" in text.lower() or "_local_scalar_dense" in text
    ):
        if stripped.startswith(("if ", "elif ", "while ", "assert ")) or " if " in source:
            what = "data-dependent control flow (a Python branch on a tensor's value)"
        elif ".item()" in source:
            what = "`.item()` (a tensor's value read into Python)"
        elif ".tolist()" in source:
            what = "`.tolist()` (a tensor's values read into Python)"
        elif any(f"{c}(" in source for c in ("float", "int", "bool")):
            what = "a tensor converted to a Python number (data-dependent)"
        else:
            what = "a tensor's value read into Python (data-dependent)"
        fix = (
            "The captured graph must be the same for every input, and tensor values are unknown "
            "while tracing. Keep the computation on tensors (torch.where(cond, a, b), masking, "
            "torch.clamp; keep scalars as 0-d tensors) instead of reading them into Python, or "
            "capture only the static part (e.g. the submodule before the branch)."
        )
    elif "DynamicOutputShapeException" in kinds:
        what = "an op whose output shape depends on tensor values"
        fix = (
            "Ops such as nonzero, boolean-mask indexing (x[x > 0]) or unique cannot be "
            "captured; use a fixed-shape form (torch.where, multiplying by a mask) or capture "
            "the static part only."
        )
    elif "UnsupportedOperatorException" in kinds or "UnsupportedFakeTensorException" in kinds:
        what = "an operator that cannot be traced with fake tensors"
        fix = (
            "Register a fake (meta) kernel for it with torch.library.register_fake, or capture "
            "only the part of the model without it."
        )
    elif "modified by an inplace operation" in text:
        what = "an in-place op that overwrites a value the backward pass needs"
        fix = (
            "This step fails in eager PyTorch too (loss.backward() raises the same error); use "
            "the out-of-place form (y = y + z instead of y += z, inplace=False)."
        )
    elif "tensor subclasses" in text or ".numpy()" in source:
        what = "a conversion out of PyTorch (e.g. .numpy())"
        fix = "Keep the computation in torch ops, or capture only the part of the model before it."
    else:
        what = "an operation AOTAutograd cannot trace"
        fix = "Capture only the static part of the model, or make this step traceable."
    first = str(chain[-1]).strip().splitlines()
    detail = f"{type(chain[-1]).__name__}: {first[0] if first else ''}"
    lines = [f"Cannot capture {type(module).__name__}: {what} {where}"]
    if source:
        lines.append(f"    {source}")
    lines.append(fix)
    lines.append(f"(traced error: {detail})")
    return "\n".join(lines)


# -- the fine graph -------------------------------------------------------------------------
@dataclass
class _Fine:
    """Facts about the joint graph's call_function nodes, by fx node name."""

    order: list[fx.Node] = field(default_factory=list)
    pos: dict[str, int] = field(default_factory=dict)
    units: dict[str, list[tuple[str, int | None]]] = field(default_factory=dict)
    unit_bytes: dict[tuple[str, int | None], int] = field(default_factory=dict)
    bytes: dict[str, int] = field(default_factory=dict)
    backward: dict[str, bool] = field(default_factory=dict)
    cheap: dict[str, bool] = field(default_factory=dict)
    random: dict[str, bool] = field(default_factory=dict)
    outputs: list[str | None] = field(default_factory=list)
    const_bytes: int = 0


def _tags(n: fx.Node) -> tuple[Any, ...]:
    return tuple(getattr(n.target, "tags", ()))


def _analyse(gm: fx.GraphModule) -> _Fine:
    f = _Fine()
    tangent_dep: set[str] = set()
    for n in gm.graph.nodes:
        if n.op == "placeholder":
            f.const_bytes += _tensor_bytes(n.meta.get("val"))
            f.units[n.name] = []
            if _is_tangent(n):
                tangent_dep.add(n.name)
        elif n.op == "get_attr":
            f.const_bytes += _tensor_bytes(getattr(gm, str(n.target), None))
            f.units[n.name] = []
        elif n.op == "call_function":
            f.pos[n.name] = len(f.order)
            f.order.append(n)
            if any(a.name in tangent_dep for a in n.all_input_nodes):
                tangent_dep.add(n.name)
            f.backward[n.name] = n.name in tangent_dep
            val = n.meta.get("val")
            if n.target is operator.getitem and isinstance(n.args[0], fx.Node):
                base, idx = n.args[0], n.args[1]
                base_units = f.units.get(base.name, [])
                if (base.name, int(idx)) in f.unit_bytes:  # an element the base allocated
                    f.units[n.name] = [(base.name, int(idx))]
                elif isinstance(base.meta.get("val"), (tuple, list)) and not base_units:
                    f.units[n.name] = []
                else:  # an element of a view op's output (split): the base's storage
                    f.units[n.name] = list(base_units)
            elif _is_alias(n) and n.all_input_nodes:
                f.units[n.name] = list(f.units.get(n.all_input_nodes[0].name, []))
            elif isinstance(val, (tuple, list)):
                f.units[n.name] = []
                for i, v in enumerate(val):
                    if isinstance(v, torch.Tensor):
                        f.units[n.name].append((n.name, i))
                        f.unit_bytes[(n.name, i)] = _tensor_bytes(v)
            elif isinstance(val, torch.Tensor):
                f.units[n.name] = [(n.name, None)]
                f.unit_bytes[(n.name, None)] = _tensor_bytes(val)
            else:
                f.units[n.name] = []
            f.bytes[n.name] = sum(f.unit_bytes[u] for u in f.units[n.name] if u[0] == n.name)
            tags = _tags(n)
            f.cheap[n.name] = (_is_alias(n) or torch.Tag.pointwise in tags) and (
                torch.Tag.nondeterministic_seeded not in tags
            )
            f.random[n.name] = torch.Tag.nondeterministic_seeded in tags
        elif n.op == "output":
            outs = n.args[0]
            flat_outs = list(outs) if isinstance(outs, (tuple, list)) else [outs]
            f.outputs = [o.name if isinstance(o, fx.Node) else None for o in flat_outs]
    return f


# -- coarsening and the Graph ---------------------------------------------------------------
def _groups(f: _Fine, coarsen: bool) -> list[list[str]]:
    """Partition the fine nodes into groups (each a list of fx names, in fx order)."""
    group_of: dict[str, int] = {}
    members: list[list[str]] = []
    anchor_backward: list[bool] = []

    def inner_inputs(n: fx.Node) -> list[fx.Node]:
        return [a for a in n.all_input_nodes if a.op == "call_function"]

    gpreds: list[set[int]] = []  # group -> the groups it reads from, so far

    def reaches(src: int, dst: int) -> bool:
        """Does group ``dst`` (transitively) read from group ``src``?"""
        stack, seen = [dst], {dst}
        while stack:
            g = stack.pop()
            if g == src:
                return True
            for p in gpreds[g] - seen:
                seen.add(p)
                stack.append(p)
        return False

    def sole_reader(n: fx.Node, g: int) -> bool:
        """``n`` is the only reader outside group ``g`` of the values it reads from ``g``."""
        return all(
            u is n or group_of.get(u.name) == g
            for a in inner_inputs(n)
            if group_of[a.name] == g
            for u in a.users
        )

    for n in f.order:
        gs = {group_of[a.name] for a in inner_inputs(n)}
        if coarsen and f.cheap[n.name] and gs:
            same_phase = [g for g in sorted(gs) if anchor_backward[g] == f.backward[n.name]]
            if len(gs) == 1:
                choice = same_phase[0] if same_phase else None
            else:
                # A pointwise op reading several groups (a residual add) joins the group whose
                # value only it reads, so that value stays inside: it is freed as soon as the op
                # ran, and the planner does not count it for the group's whole life. Joining is
                # safe while no other input group depends on the chosen one.
                choice = next(
                    (
                        g
                        for g in same_phase
                        if sole_reader(n, g) and not any(reaches(g, h) for h in gs - {g})
                    ),
                    None,
                )
            if choice is not None:
                group_of[n.name] = choice
                members[choice].append(n.name)
                gpreds[choice] |= gs - {choice}
                continue
        group_of[n.name] = len(members)
        members.append([n.name])
        anchor_backward.append(f.backward[n.name])
        gpreds.append(set(gs))

    if coarsen:
        # A group with no inputs from other groups made only of cheap ops (a weight transposed,
        # a tangent unsqueezed, a step counter incremented) can join its only consumer group, or
        # when nothing reads it, the group of the next node: it has no inputs, so the DAG holds.
        by_name = {n.name: n for n in f.order}
        target: dict[int, int] = {}
        for g, names in enumerate(members):
            inside = set(names)
            has_input = any(
                a.op == "call_function" and a.name not in inside
                for name in names
                for a in by_name[name].all_input_nodes
            )
            if has_input or not all(f.cheap[x] for x in names):
                continue
            consumers = {
                group_of[u.name]
                for name in names
                for u in by_name[name].users
                if u.op == "call_function" and group_of[u.name] != g
            }
            if len(consumers) == 1:
                target[g] = next(iter(consumers))
            elif not consumers:
                last = max(f.pos[x] for x in names)
                later = (group_of[m.name] for m in f.order[last + 1 :])
                same = (h for h in later if h != g and anchor_backward[h] == anchor_backward[g])
                nxt = next(same, None)
                if nxt is not None:
                    target[g] = nxt

        def final(g: int) -> int:
            seen = set()
            while g in target and g not in seen:
                seen.add(g)
                g = target[g]
            return g

        merged: dict[int, list[str]] = {}
        for g, names in enumerate(members):
            merged.setdefault(final(g), []).extend(names)
        members = [sorted(v, key=f.pos.__getitem__) for _, v in sorted(merged.items())]
    return members


def _build_graph(joint: _Joint, f: _Fine, costs: dict[str, float], *, coarsen: bool) -> Graph:
    gm = joint.gm
    members = _groups(f, coarsen)
    group_of = {name: g for g, names in enumerate(members) for name in names}
    by_name = {n.name: n for n in f.order}
    out_names = {o for o in f.outputs if o is not None}

    # Group-level edges, then a stable topological order (by anchor position).
    preds: list[set[int]] = [set() for _ in members]
    for g, names in enumerate(members):
        for name in names:
            for a in by_name[name].all_input_nodes:
                h = group_of.get(a.name)
                if h is not None and h != g:
                    preds[g].add(h)
    groups = range(len(members))
    order = _topological(groups, dict(enumerate(preds)), key=lambda g: f.pos[members[g][0]])
    index = {g: i for i, g in enumerate(order)}

    nodes: list[Node] = []
    graph_preds: list[tuple[int, ...]] = []
    groups_meta: list[list[str]] = []
    exposed_meta: list[list[str]] = []
    stash_meta: list[list[str]] = []
    reuse_meta: list[dict[str, str]] = []
    random_meta: list[int] = []
    const_bytes = f.const_bytes
    for i, g in enumerate(order):
        names = members[g]
        inside = set(names)
        owned = {u for name in names for u in f.units[name] if u[0] in inside}
        exposed: list[str] = []
        kept: set[tuple[str, int | None]] = set()  # units read by other groups
        out_units: set[tuple[str, int | None]] = set()
        out_members: list[str] = []
        for name in names:
            read_outside = any(
                u.op == "call_function" and u.name not in inside for u in by_name[name].users
            )
            is_out = name in out_names
            if read_outside or is_out:
                exposed.append(name)
            if read_outside:
                kept |= set(f.units[name]) & owned
            if is_out:
                out_members.append(name)
                out_units |= set(f.units[name]) & owned
        is_output = bool(out_members) and kept <= out_units
        stash_bytes = 0
        if is_output:
            nbytes = sum(f.unit_bytes[u] for u in out_units)
            stash: list[str] = []
        else:
            nbytes = sum(f.unit_bytes[u] for u in kept - out_units)
            stash = out_members
            stash_bytes = sum(f.unit_bytes[u] for u in out_units)
        anchor = names[0] if not coarsen else _anchor(names, by_name, group_of, f)
        held = kept | out_units
        reuse = _reuse_in_group(names, by_name, f, owned, held)
        peak = _group_peak(names, by_name, f, owned, held, reuse)
        nodes.append(
            Node(
                name=anchor,
                cost=float(sum(costs.get(name, 0.0) for name in names)),
                bytes=int(nbytes),
                backward=f.backward[anchor],
                output=is_output,
                transient=max(0, int(peak - nbytes - stash_bytes)),
                stash=int(stash_bytes),
            )
        )
        graph_preds.append(tuple(sorted(index[h] for h in preds[g])))
        groups_meta.append(list(names))
        exposed_meta.append(exposed)
        stash_meta.append(stash)
        reuse_meta.append(reuse)
        if any(f.random[name] for name in names):
            random_meta.append(i)

    graph = Graph(nodes=nodes, preds=graph_preds, const_bytes=int(const_bytes))
    graph.meta.update(
        fx=gm,
        groups=groups_meta,
        exposed=exposed_meta,
        stash=stash_meta,
        reuse=reuse_meta,
        random=random_meta,
        placeholders=joint.placeholders,
        outputs=list(f.outputs),
        num_fwd_outputs=joint.num_fwd_outputs,
        mutated_inputs=joint.mutated_inputs,
        out_spec=joint.out_spec,
        fine_nodes=len(f.order),
        fine_costs={n.name: float(costs.get(n.name, 0.0)) for n in f.order},
        fine_bytes=dict(f.bytes),
    )
    return graph


def _group_peak(
    names: list[str],
    by_name: dict[str, fx.Node],
    f: _Fine,
    owned: set[tuple[str, int | None]],
    held: set[tuple[str, int | None]],
    reuse: dict[str, str] | None = None,
) -> int:
    """The most bytes the group's own allocations hold at once while it runs, its members in
    order: an allocation is released once every member that reads it (or a view of it) ran,
    unless it is ``held`` (read outside the group, or a graph output). A member in ``reuse``
    allocates nothing: its result takes over the storage of the input it writes into, which
    dies at that member."""
    inside = set(names)
    reuse = reuse or {}
    readers: dict[tuple[str, int | None], int] = {}
    for name in names:
        for a in by_name[name].all_input_nodes:
            if a.name in inside:
                for u in f.units[a.name]:
                    if u in owned:
                        readers[u] = readers.get(u, 0) + 1
    live = peak = 0
    for name in names:
        mine = [u for u in f.units[name] if u[0] == name]
        into = f.units[reuse[name]][0] if name in reuse else None
        live += sum(f.unit_bytes[u] for u in mine) - (f.unit_bytes[into] if into else 0)
        peak = max(peak, live)
        released = [u for u in mine if u not in held and not readers.get(u)]
        for a in by_name[name].all_input_nodes:
            if a.name in inside:
                for u in f.units[a.name]:
                    if u in readers:
                        readers[u] -= 1
                        if not readers[u] and u not in held:
                            released.append(u)
        live -= sum(f.unit_bytes[u] for u in set(released) if u != into)
    return peak


def _reuse_in_group(
    names: list[str],
    by_name: dict[str, fx.Node],
    f: _Fine,
    owned: set[tuple[str, int | None]],
    held: set[tuple[str, int | None]],
) -> dict[str, str]:
    """Which pointwise members can write their result into an input's storage instead of
    allocating, as inductor's buffer reuse does: ``{member: input}``, fx names.

    Eager PyTorch allocates a new tensor for ``add(slice, maxpool_grad)`` even when
    ``maxpool_grad`` is never read again, so for a moment both are live; at U-Net's full
    resolution that moment sets the least feasible budget. Writing into the dying input removes
    it. The input must be an allocation of this group (not a view, not a placeholder), read by
    no member after this one nor by anything outside the group (not ``held``: not exposed, not a
    graph output, hence not saved for backward), have the result's shape, strides, dtype and
    device, and the op must have a kernel that writes in place (:func:`reuse_variant`).
    Deciding within the group keeps the choice valid in every copy the executor makes of it: a
    recomputation copies the same members, and only exposed members are read outside.
    """
    pos = {name: i for i, name in enumerate(names)}
    last_read: dict[tuple[str, int | None], int] = {}
    for name in names:
        for a in by_name[name].all_input_nodes:
            if a.name in pos:
                for u in f.units[a.name]:
                    last_read[u] = max(last_read.get(u, -1), pos[name])
    reuse: dict[str, str] = {}
    for name in names:
        n = by_name[name]
        val = n.meta.get("val")
        if (
            not isinstance(val, torch.Tensor)
            or f.units[name] != [(name, None)]
            or not isinstance(n.target, torch._ops.OpOverload)
            or torch.Tag.pointwise not in n.target.tags
            or torch.Tag.nondeterministic_seeded in n.target.tags
        ):
            continue
        inputs = n.all_input_nodes
        for a in inputs:
            if a.name not in pos or len(f.units[a.name]) != 1:
                continue
            (u,) = f.units[a.name]
            handle = u == (a.name, None) or (
                a.target is operator.getitem and u == (a.args[0].name, a.args[1])
            )
            if (
                handle
                and u in owned
                and u not in held
                and last_read.get(u) == pos[name]
                and f.unit_bytes[u] == f.unit_bytes[(name, None)]
                and _same_layout(a.meta.get("val"), val)
                and not any(b is not a and u in f.units.get(b.name, ()) for b in inputs)
                and reuse_variant(n.target, _is_self(n, a), val.device.type) is not None
            ):
                reuse[name] = a.name
                break
    return reuse


def _same_layout(a: Any, b: torch.Tensor) -> bool:
    """``a`` is a tensor that ``b`` can be written into element for element."""
    return (
        isinstance(a, torch.Tensor)
        and a.shape == b.shape
        and a.stride() == b.stride()
        and a.dtype == b.dtype
        and a.device == b.device
        and a.storage_offset() == 0
    )


def _is_self(n: fx.Node, a: fx.Node) -> bool:
    """``a`` is ``n``'s first argument, the one an in-place variant (``add_``) writes."""
    return bool(n.args) and n.args[0] is a


@functools.cache
def reuse_variant(
    op: torch._ops.OpOverload, into_self: bool, device_type: str
) -> tuple[torch._ops.OpOverload, str | None] | None:
    """How pointwise ``op`` writes its result into an input's storage on ``device_type``.

    Returns ``(overload, None)`` for the in-place variant (``add.Tensor`` -> ``add_.Tensor``,
    ``relu`` -> ``relu_``), usable when the input is the first argument (``into_self``);
    ``(overload, name)`` for the ``out=`` overload (``add.out``, ``threshold_backward
    .grad_input``) with ``name=`` the input; None when neither writes in place. An ``out=``
    overload counts only with a kernel of its own for the device (a structured elementwise
    kernel): the ones generated from the functional op (``relu.out``, ``clone.out``, registered
    only as CompositeExplicitAutograd) compute into a new tensor and copy it over, which saves
    nothing. Both the capture and the executor ask this function, so they agree.
    """

    def signature(schema: Any) -> list[tuple[str, str, bool]]:
        return [(a.name, str(a.type), a.kwarg_only) for a in schema.arguments]

    def variants(packet: Any) -> list[tuple[torch._ops.OpOverload, int]]:
        """The packet's overloads that write exactly one argument: (overload, its index)."""
        found = []
        for overload in packet.overloads():
            candidate = getattr(packet, overload)
            args = candidate._schema.arguments
            writes = [a.alias_info is not None and a.alias_info.is_write for a in args]
            if sum(writes) == 1 and len(candidate._schema.returns) == 1:
                found.append((candidate, writes.index(True)))
        return found

    want = signature(op._schema)  # str(type) omits alias annotations: Tensor(a!) is Tensor
    namespace = getattr(torch.ops, op.namespace)
    inplace = op.overloadpacket.__name__ + "_"
    if into_self and hasattr(namespace, inplace):
        for candidate, k in variants(getattr(namespace, inplace)):
            if k == 0 and signature(candidate._schema) == want:
                return candidate, None
    key = torch._C._dispatch_key_for_device(device_type)
    for candidate, k in variants(op.overloadpacket):
        args = signature(candidate._schema)
        if (
            args[k][2]  # keyword-only
            and args[:k] + args[k + 1 :] == want
            and torch._C._dispatch_has_kernel_for_dispatch_key(candidate.name(), key)
        ):
            return candidate, args[k][0]
    return None


def _anchor(
    names: list[str], by_name: dict[str, fx.Node], group_of: dict[str, int], f: _Fine
) -> str:
    """The node that started the group: the first member not merged in as an input-free op."""
    g = group_of[names[0]]
    for name in names:
        ins = [a for a in by_name[name].all_input_nodes if a.op == "call_function"]
        if any(group_of[a.name] != g for a in ins) or not f.cheap[name]:
            return name
    return names[0]
