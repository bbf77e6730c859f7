"""Baseline rematerialization strategies, all returning :class:`Schedule` on the same graph.

Every baseline here is a *checkpoint set* turned into a schedule by
:func:`schedule_from_checkpoints`: the forward pass runs once, checkpointed outputs stay
resident until their last use, every other forward output is freed after its last forward use
and recomputed from the nearest resident ancestors just before a backward node needs it.
This is how Checkmate (Jain et al., MLSys 2020, Sec. 6.1) evaluates its baselines, so every
comparison runs on one simulator.
"""

from __future__ import annotations

from mlcycle.train.remat.graph import COMPUTE, FREE, Graph, Schedule

__all__ = ["checkpoint_all", "schedule_from_checkpoints"]


def checkpoint_all(graph: Graph) -> Schedule:
    """Compute each node once in order and free each output right after its last use."""
    return schedule_from_checkpoints(graph, set(range(len(graph))))


def schedule_from_checkpoints(graph: Graph, keep: set[int]) -> Schedule:
    """The schedule that keeps the outputs in ``keep`` and recomputes the rest on demand.

    Args:
        graph: the training graph.
        keep: node indices whose outputs stay resident from their first computation until
            their last use. Backward nodes are always kept (they are never recomputed).

    Forward nodes (``backward == False``) run in order. A non-kept forward node is freed once
    no later *forward* node needs it; when a backward node needs it, it is recomputed, together
    with whatever of its ancestors is missing, and then stays until its last use.
    """
    n = len(graph)
    last = graph.last_use()
    fwd_last = [
        max((s for s in graph.succs[i] if not graph.nodes[s].backward), default=i)
        for i in range(n)
    ]
    resident: set[int] = set()
    ops: list[tuple[int, int]] = []

    def compute(v: int) -> None:
        ops.append((COMPUTE, v))
        resident.add(v)

    def release(after: int, backward_phase: bool) -> None:
        # Drop every resident output that no node after ``after`` needs any more; in the
        # forward phase also drop non-kept forward outputs past their last forward use.
        for u in sorted(resident):
            if graph.nodes[u].output:
                continue
            dead = last[u] <= after
            if not dead and not backward_phase and u not in keep and not graph.nodes[u].backward:
                dead = fwd_last[u] <= after
            if dead:
                ops.append((FREE, u))
                resident.discard(u)

    def ensure(v: int) -> None:
        # Recompute v (and missing ancestors) so that it is resident; iterative DFS.
        stack = [v]
        while stack:
            u = stack[-1]
            if u in resident:
                stack.pop()
                continue
            missing = [p for p in graph.preds[u] if p not in resident]
            if missing:
                stack.extend(missing)
                continue
            stack.pop()
            compute(u)

    for v in range(n):
        node = graph.nodes[v]
        if node.backward:
            for p in graph.preds[v]:
                ensure(p)
        compute(v)
        release(v, node.backward)
    return Schedule.from_ops(ops)
