"""Run a rematerialization plan as a real PyTorch training step.

:func:`rematerialize` plans the step (:func:`mlcycle.train.remat.solve.plan`) and returns a
module that runs it. The route is AOTAutograd's: ``aot_function`` traces the same pure
function the planner captured, hands us the joint forward+backward graph, and we return the
forward and backward graphs that the plan prescribes:

1. **Rewrite the joint graph in schedule order.** Every ``compute`` of a planned node copies
   that node's fx members into a new joint graph, in the order of the schedule. A
   recomputation is a fresh copy whose readers use the newest copy, so it lands just in time,
   as often as the plan asks. Frees need no node: fx's code generation drops every value after
   its last use, which is where the schedule frees it.
2. **Split at the first backward computation.** The values computed before it that the rest
   reads are the tensors saved for backward; AOTAutograd's own extraction builds the forward
   and backward graphs from that split, and its runtime wrapper supplies the
   ``autograd.Function``, the BatchNorm buffer updates (copied into the buffers once per step)
   and the release of saved tensors as the backward pass goes.
3. **Replay randomness.** Before the first computation of a random op (dropout), the RNG state
   is stored; a recomputation restores it around the op, so the mask is the same bits.
4. **Reuse dying buffers.** A pointwise member that the capture marked in
   ``graph.meta["reuse"]`` writes into its input's storage, which dies there (inductor's
   buffer reuse), in place (``add_``) or through ``out=``; the planned ``transient`` assumes
   it.

Checkmate (Jain et al., MLSys 2020, Sec. 5) generates its execution the same way, as a static
schedule of tensor operations with explicit deallocation.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from torch import fx, nn

from mlcycle.train.remat.graph import COMPUTE, Graph, Schedule
from mlcycle.train.remat.solve import Plan

__all__ = ["Rematerialized", "rematerialize", "build_partition"]

_RANDOM_OPS: dict[str, Any] = {}  # op name -> op, for the RNG-replay wrapper's constant arg


def _rng_state(device_type: str) -> torch.Tensor:
    """The RNG state that the next random op on ``device_type`` will use."""
    if device_type == "cuda":
        return torch.cuda.get_rng_state()
    return torch.get_rng_state()


def _replay_rng(
    state: torch.Tensor, device_type: str, op_name: str, *args: Any, **kwargs: Any
) -> Any:
    """Run a random op with the RNG state of its first computation, then restore the RNG."""
    get, put = (
        (torch.cuda.get_rng_state, torch.cuda.set_rng_state)
        if device_type == "cuda"
        else (torch.get_rng_state, torch.set_rng_state)
    )
    current = get()
    put(state)
    try:
        return _RANDOM_OPS[op_name](*args, **kwargs)
    finally:
        put(current)


def build_partition(
    joint: fx.GraphModule, num_fwd_outputs: int, graph: Graph, schedule: Schedule
) -> tuple[fx.GraphModule, fx.GraphModule]:
    """Forward and backward fx graphs that run ``schedule`` (see the module docstring).

    Raises:
        ValueError: the joint graph is not the one the plan was made for.
    """
    from torch._functorch.partitioners import _extract_fwd_bwd_modules

    by_name = {n.name: n for n in joint.graph.nodes}
    groups: list[list[str]] = graph.meta["groups"]
    missing = [name for members in groups for name in members if name not in by_name]
    if missing:
        raise ValueError(
            f"The traced step does not match the plan ({len(missing)} planned ops missing, "
            f"e.g. {missing[:3]}); the module or its inputs changed since planning. Call "
            "rematerialize() again."
        )
    random = set(graph.meta.get("random", ()))
    reuse: list[dict[str, str]] = graph.meta.get("reuse") or [{} for _ in groups]
    placeholders = [n for n in joint.graph.nodes if n.op == "placeholder"]
    device_type = _device_type(placeholders)

    new = fx.Graph()
    cur: dict[fx.Node, fx.Node] = {}  # joint node -> its newest copy
    first: dict[fx.Node, fx.Node] = {}  # joint node -> its first copy
    for ph in placeholders:
        cur[ph] = first[ph] = new.node_copy(ph)
    # Buffers the step updates (BatchNorm statistics) are written after the forward pass, so
    # the backward pass must not read them: recomputations read a copy taken before.
    mutated = set(graph.meta.get("mutated_inputs", ()))
    before_update = {
        ph: new.call_function(torch.ops.aten.clone.default, (cur[ph],))
        for ph in placeholders
        if ph.name in mutated
    }
    for ph, clone in before_update.items():
        clone.meta = dict(ph.meta)
    computed: set[int] = set()
    rng_states: dict[str, fx.Node] = {}  # random op name -> node holding its RNG state
    in_backward = False  # the forward phase ends at the first backward computation
    fw_nodes: set[fx.Node] = set(cur.values()) | set(before_update.values())
    for op, v in schedule.ops:
        if op != COMPUTE:
            continue  # fx frees each value after its last use
        in_backward = in_backward or graph.nodes[v].backward
        recompute = v in computed
        computed.add(v)
        for name in groups[v]:
            node = by_name[name]
            copy = None
            if v in random and _is_random(node):
                if not recompute:
                    state = new.call_function(_rng_state, (device_type,))
                    state.meta["val"] = _fake_like(node, _rng_state(device_type))
                    rng_states[name] = state
                    if not in_backward:
                        fw_nodes.add(state)
                else:
                    _RANDOM_OPS[str(node.target)] = node.target
                    args = fx.map_arg(node.args, lambda a: cur[a])
                    copy = new.call_function(
                        _replay_rng,
                        (rng_states[name], device_type, str(node.target), *args),
                        fx.map_arg(node.kwargs, lambda a: cur[a]),
                    )
                    copy.meta = dict(node.meta)
            if copy is None:
                reads = {**cur, **before_update} if in_backward else cur
                if name in reuse[v]:  # write into the dying input's storage, as planned
                    into = by_name[reuse[v][name]]
                    copy = _copy_in_place(new, node, into, reads, in_backward)
                else:
                    copy = new.node_copy(node, reads.__getitem__)
            cur[node] = copy
            first.setdefault(node, copy)
            if not in_backward:
                fw_nodes.add(copy)
    (out_node,) = [n for n in joint.graph.nodes if n.op == "output"]
    outs = list(out_node.args[0])
    mapped = [
        None if o is None else (first[o] if k < num_fwd_outputs else cur[o])
        for k, o in enumerate(outs)
    ]
    out = new.output(tuple(mapped))
    out.meta = dict(out_node.meta)
    saved = [
        n
        for n in new.nodes
        if n in fw_nodes
        and n.op != "output"
        and not _is_tangent(n)
        and not isinstance(n.meta.get("val"), (tuple, list))
        and any(u not in fw_nodes and u.op != "output" for u in n.users)
    ]
    gm = fx.GraphModule(joint, new)
    return _extract_fwd_bwd_modules(gm, saved, [], num_fwd_outputs=num_fwd_outputs)


def _copy_in_place(
    new: fx.Graph,
    node: fx.Node,
    into: fx.Node,
    reads: dict[fx.Node, fx.Node],
    in_backward: bool,
) -> fx.Node:
    """Copy pointwise ``node`` so that it writes its result into ``into``'s newest copy: its
    in-place variant when ``into`` is its first argument, else its ``out=`` overload.

    The capture chose ``into`` (``graph.meta["reuse"]``): computed in the same group, read by
    nothing after ``node``, with the result's layout, so ``node``'s copy in every copy of the
    group may overwrite it and allocates nothing, as the planned ``transient`` assumes. The
    partitioner keeps a mutating op in the forward graph unless it is tagged as backward."""
    from mlcycle.train.remat._capture import _is_self, reuse_variant

    val = node.meta["val"]
    variant = reuse_variant(node.target, _is_self(node, into), val.device.type)
    if variant is None:  # the capture plans reuse only where this exists
        raise ValueError(
            f"{node.target} cannot write into its input on {val.device.type}; the plan was made "
            "on another device or torch version. Capture and plan the step again."
        )
    target, out_name = variant
    args = fx.map_arg(node.args, reads.__getitem__)
    kwargs = dict(fx.map_arg(node.kwargs, reads.__getitem__))
    if out_name is not None:
        kwargs[out_name] = reads[into]
    copy = new.call_function(target, args, kwargs)
    copy.meta = dict(node.meta)
    copy.meta["partitioner_tag"] = "is_backward" if in_backward else "is_forward"
    return copy


def _is_tangent(n: fx.Node) -> bool:
    return n.op == "placeholder" and "tangent" in n.name


def _is_random(node: fx.Node) -> bool:
    target = node.target
    return isinstance(target, torch._ops.OpOverload) and torch.Tag.nondeterministic_seeded in (
        target.tags
    )


def _device_type(placeholders: Sequence[fx.Node]) -> str:
    for ph in placeholders:
        val = ph.meta.get("val")
        if isinstance(val, torch.Tensor):
            return val.device.type
    return "cpu"


def _fake_like(node: fx.Node, real: torch.Tensor) -> Any:
    val = node.meta.get("val")
    fake = val[0] if isinstance(val, (tuple, list)) else val
    mode = getattr(fake, "fake_mode", None)
    return mode.from_tensor(real) if mode is not None else real


class Rematerialized(nn.Module):
    """A module whose training step follows a rematerialization plan.

    Calling it runs the forward pass; ``.backward()`` on a loss computed from its output fills
    the wrapped module's parameters' ``.grad`` exactly as the plain step would (same ops, same
    order within each op), while holding at most ``plan.peak_bytes`` of tensors at once (as
    simulated). BatchNorm running statistics are updated once per step; dropout masks are the
    same on recomputation. Optimizer code is unchanged: pass ``module.parameters()``.

    Attributes:
        module: the wrapped module (its parameters are the ones trained).
        plan: the :class:`~mlcycle.train.remat.solve.Plan` being executed.
    """

    def __init__(self, module: nn.Module, example_inputs: tuple[torch.Tensor, ...], plan: Plan):
        super().__init__()
        from functorch.compile import aot_function

        from mlcycle.train.remat._capture import functional_step

        self.module = module
        self.plan = plan
        self._signature = [_sig(t) for t in example_inputs]
        # where each parameter and buffer lives, in parameters()/buffers() order: read from
        # there every step (0.01 ms), not by walking the module tree (0.36 ms on GPT-2 tiny)
        self._slots = [
            (sub._parameters, n)
            for name, _ in module.named_parameters()
            for sub, n in [_owner(module, name)]
        ] + [
            (sub._buffers, n)
            for name, _ in module.named_buffers()
            for sub, n in [_owner(module, name)]
        ]
        step, names = functional_step(module)
        self._k = len(names)
        graph = plan.graph
        if graph is None:
            raise ValueError("The plan carries no graph; make it with mlcycle.train.remat.plan().")

        def partition(joint: fx.GraphModule, _inputs: Any, **kwargs: Any) -> Any:
            return build_partition(joint, int(kwargs["num_fwd_outputs"]), graph, plan.schedule)

        self._step = aot_function(
            step,
            fw_compiler=_boxed,
            bw_compiler=_boxed,
            partition_fn=partition,
            num_params_buffers=self._k,
        )
        self._compile(example_inputs)

    def _compile(self, example_inputs: Sequence[torch.Tensor]) -> None:
        """Trace and partition now, on fake tensors: no memory spike and no buffer update in
        the first real step (tracing on real inputs allocates a whole plain forward)."""
        from torch._subclasses.fake_tensor import FakeTensorMode

        mode = FakeTensorMode(allow_non_fake_inputs=False)
        real = [*self.module.parameters(), *self.module.buffers(), *example_inputs]
        fake = [mode.from_tensor(t, static_shapes=True) for t in real]
        for f, t in zip(fake, real, strict=True):
            f.requires_grad_(t.requires_grad)
        with mode, torch.enable_grad():
            out = self._step(*fake)
        del out

    def forward(self, *inputs: torch.Tensor) -> Any:
        got = [_sig(t) for t in inputs]
        if got != self._signature:
            raise ValueError(
                f"This step was planned for inputs {self._signature} and got {got}. A plan is "
                "valid for one shape; call rematerialize(module, new_example_inputs, ...) for "
                "the new shape (e.g. the last, smaller batch), or drop that batch."
            )
        flat = [table[n] for table, n in self._slots]
        return self._step(*flat, *inputs)


def _owner(module: nn.Module, name: str) -> tuple[nn.Module, str]:
    """The submodule holding the parameter or buffer ``name`` (dotted), and its own name."""
    path, _, leaf = name.rpartition(".")
    return (module.get_submodule(path) if path else module), leaf


def _boxed(gm: fx.GraphModule, _example: Any) -> fx.GraphModule:
    """Run the graph eagerly, taking its inputs as a list that it clears, so that each saved
    tensor is released after its last use in the backward pass rather than at its end."""
    boxed_codegen = getattr(fx.graph, "_BoxedCodeGen", None)
    if boxed_codegen is None:  # older torch: boxed, but inputs live until the graph returns
        from functorch.compile import make_boxed_func

        return make_boxed_func(gm)
    gm.graph.set_codegen(boxed_codegen())
    gm.recompile()  # GraphModule reports _boxed_call from its codegen
    return gm


def _sig(t: Any) -> tuple[Any, ...]:
    if not isinstance(t, torch.Tensor):
        return (type(t).__name__,)
    return (tuple(t.shape), str(t.dtype), t.device.type)


def rematerialize(
    module: nn.Module,
    example_inputs: Any,
    *,
    budget_bytes: int | None = None,
    budget_fraction: float | None = None,
    solver: str = "auto",
    time_limit_s: float = 60.0,
    cost_model: str = "auto",
) -> Rematerialized:
    """Plan ``module``'s training step within a memory budget and return a module that runs it.

    Args:
        module: the model; it stays the owner of the parameters being trained.
        example_inputs: a tensor or tuple of tensors with the shapes of a real batch.
        budget_bytes: peak memory allowed for the step: parameters, gradients, inputs and
            every activation included.
        budget_fraction: the budget as a fraction of the plain step's peak.
        solver: see :func:`mlcycle.train.remat.solve.solve`.
        time_limit_s: planning time limit.
        cost_model: ``"auto"``, ``"measure"`` or ``"flops"`` (see :mod:`.profile`).

    Example:
        >>> step = rematerialize(model, x, budget_fraction=0.4)
        >>> loss = loss_fn(step(x), y); loss.backward(); optimizer.step()
    """
    from mlcycle.train.remat._capture import _check_inputs
    from mlcycle.train.remat.solve import plan as make_plan

    inputs = _check_inputs(example_inputs)
    p = make_plan(
        module,
        inputs,
        budget_bytes=budget_bytes,
        budget_fraction=budget_fraction,
        solver=solver,
        time_limit_s=time_limit_s,
        cost_model=cost_model,
    )
    return Rematerialized(module, inputs, p)
