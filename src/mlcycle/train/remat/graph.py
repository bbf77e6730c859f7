"""The forward+backward data-flow graph that every rematerialization planner reads.

A :class:`Graph` is plain data: nodes in topological order, each with a compute cost and the
bytes of its output, and the edges between them. The solver, the baselines and the simulator
all read this one type; :func:`capture` builds it from a real PyTorch training step, and
:meth:`Graph.from_node_link` reads the published graphs of the Checkmate paper (Jain et al.,
MLSys 2020, Sec. 6) in networkx node-link JSON.

A :class:`Schedule` is the plan's answer: an ordered list of ``compute`` and ``free`` operations
over node indices. It is the single exchange format between planners, the simulator
(:mod:`mlcycle.train.remat.simulate`) and the executor.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

__all__ = ["Node", "Graph", "Schedule", "COMPUTE", "FREE", "capture"]

COMPUTE = 0  # op code: compute node i (all its inputs must be resident)
FREE = 1  # op code: drop the output of node i


@dataclass(frozen=True)
class Node:
    """One operation of the training step.

    Attributes:
        name: human-readable label (an fx node name or a layer name).
        cost: compute cost of one evaluation, in seconds when measured, else estimated units.
        bytes: size of the output that stays resident while the node is kept.
        backward: True for nodes of the backward pass.
        output: True when the output must stay resident until the step ends (a gradient).
        transient: extra bytes live only while the node computes (the intermediates inside a
            coarse node that are freed before it ends).
        stash: bytes the node's *first* computation allocates that stay until the step ends and
            are not part of ``bytes``: a parameter's gradient computed beside an input
            gradient, or updated BatchNorm running statistics. A recomputation allocates none.
    """

    name: str
    cost: float
    bytes: int
    backward: bool = False
    output: bool = False
    transient: int = 0
    stash: int = 0


@dataclass
class Graph:
    """A DAG of nodes in topological order: ``preds[i]`` are the inputs of node ``i``, all ``< i``.

    Attributes:
        nodes: the nodes, topologically ordered.
        preds: for each node, the indices of the nodes whose outputs it reads.
        name: a label for reports.
        const_bytes: memory that is resident for the whole step and not planned (parameters,
            inputs, gradients accumulated outside the graph); added to every peak. Gradients
            and statistics the graph itself produces are ``Node.stash`` instead.
        meta: free-form data, e.g. the captured fx graph and the fine-node groups that
            the executor needs. Planners never read it.
    """

    nodes: list[Node]
    preds: list[tuple[int, ...]]
    name: str = "graph"
    const_bytes: int = 0
    meta: dict[str, Any] = field(default_factory=dict, repr=False)

    def __post_init__(self) -> None:
        if len(self.nodes) != len(self.preds):
            raise ValueError(
                f"Graph needs one preds entry per node: got {len(self.nodes)} nodes and "
                f"{len(self.preds)} preds lists."
            )
        for i, ps in enumerate(self.preds):
            for p in ps:
                if not 0 <= p < i:
                    raise ValueError(
                        f"Graph nodes must be in topological order: node {i} "
                        f"({self.nodes[i].name!r}) reads node {p}; every input index must be "
                        f"in [0, {i}). Sort the nodes topologically first."
                    )
        self.preds = [tuple(sorted(set(ps))) for ps in self.preds]
        succs: list[list[int]] = [[] for _ in self.nodes]
        for i, ps in enumerate(self.preds):
            for p in ps:
                succs[p].append(i)
        self.succs: list[tuple[int, ...]] = [tuple(s) for s in succs]

    # -- sizes and totals -------------------------------------------------------------------
    def __len__(self) -> int:
        return len(self.nodes)

    @property
    def edges(self) -> list[tuple[int, int]]:
        """All (producer, consumer) pairs."""
        return [(p, i) for i, ps in enumerate(self.preds) for p in ps]

    @property
    def total_cost(self) -> float:
        """Cost of computing every node once: the denominator of every cost ratio."""
        return float(sum(n.cost for n in self.nodes))

    def last_use(self) -> list[int]:
        """For each node, the index of its last consumer (itself when it has none)."""
        return [max(s) if s else i for i, s in enumerate(self.succs)]

    # -- published graphs -------------------------------------------------------------------
    @classmethod
    def from_node_link(cls, data: dict[str, Any] | str | Path) -> Graph:
        """Read a networkx node-link graph as published with Checkmate and Moccasin.

        Nodes carry ``id``, ``name``, ``backward``, ``cost_cpu`` and ``cost_ram``; links are
        ``{source, target}``. Node ids are renumbered into topological order.
        """
        if isinstance(data, (str, Path)):
            path = Path(data)
            try:
                data = json.loads(path.read_text())
            except FileNotFoundError:
                raise FileNotFoundError(
                    f"No graph file at {path}; pass a node-link JSON such as "
                    "shared/remat-graphs/VGG16_256_train.json."
                ) from None
        raw_nodes = data.get("nodes")
        raw_links = data.get("links", data.get("edges"))
        if not isinstance(raw_nodes, list) or not isinstance(raw_links, list):
            raise ValueError(
                "A node-link graph needs 'nodes' and 'links' lists, e.g. "
                '{"nodes": [{"id": 0, "cost_cpu": 1, "cost_ram": 4}], "links": []}.'
            )
        ids = [n["id"] for n in raw_nodes]
        preds_by_id: dict[Any, list[Any]] = {i: [] for i in ids}
        for link in raw_links:
            preds_by_id[link["target"]].append(link["source"])
        order = _topological(ids, preds_by_id)
        index = {node_id: k for k, node_id in enumerate(order)}
        by_id = {n["id"]: n for n in raw_nodes}
        nodes = []
        for node_id in order:
            n = by_id[node_id]
            nodes.append(
                Node(
                    name=str(n.get("name", node_id)),
                    cost=float(n.get("cost_cpu", n.get("cost", 1.0))),
                    bytes=int(n.get("cost_ram", n.get("bytes", 0))),
                    backward=bool(n.get("backward", False)),
                    output=bool(n.get("output", False)),
                    transient=int(n.get("transient", 0)),
                    stash=int(n.get("stash", 0)),
                )
            )
        preds = [tuple(index[p] for p in preds_by_id[node_id]) for node_id in order]
        name = str(data.get("graph", {}).get("name", "graph"))
        return cls(nodes=nodes, preds=preds, name=name, const_bytes=int(data.get("const_bytes", 0)))

    def to_node_link(self) -> dict[str, Any]:
        """The graph as node-link JSON data (the inverse of :meth:`from_node_link`)."""
        return {
            "directed": True,
            "multigraph": False,
            "graph": {"name": self.name},
            "const_bytes": self.const_bytes,
            "nodes": [
                {
                    "id": i,
                    "name": n.name,
                    "backward": n.backward,
                    "cost_cpu": n.cost,
                    "cost_ram": n.bytes,
                    **({"output": True} if n.output else {}),
                    **({"transient": n.transient} if n.transient else {}),
                    **({"stash": n.stash} if n.stash else {}),
                }
                for i, n in enumerate(self.nodes)
            ],
            "links": [{"source": p, "target": i} for p, i in self.edges],
        }

    @classmethod
    def chain(cls, n_forward: int, *, cost: float = 1.0, nbytes: int = 1) -> Graph:
        """The training graph of a linear chain of ``n_forward`` layers (Griewank's setting).

        Forward node ``f_i`` reads ``f_{i-1}``; backward node ``b_i`` reads ``b_{i+1}`` and the
        activation ``f_i`` it differentiates, i.e. the forward output that enters it.
        """
        if n_forward < 1:
            raise ValueError(f"n_forward must be >= 1, got {n_forward}.")
        nodes = [Node(f"f{i}", cost, nbytes) for i in range(n_forward)]
        preds: list[tuple[int, ...]] = [(i - 1,) if i else () for i in range(n_forward)]
        for k in range(n_forward):
            layer = n_forward - 1 - k  # backward visits layers in reverse
            idx = n_forward + k
            ins = [layer]  # the layer's own output (for k == 0 it is also the loss input)
            if k:
                ins.append(idx - 1)  # the gradient flowing in from the layer above
            if layer:
                ins.append(layer - 1)  # the layer's input activation
            nodes.append(Node(f"b{layer}", cost, nbytes, backward=True))
            preds.append(tuple(ins))
        return cls(nodes=nodes, preds=preds, name=f"chain{n_forward}")


def _topological(
    ids: Sequence[Any], preds: dict[Any, Any], key: Callable[[Any], Any] | None = None
) -> list[Any]:
    """Kahn's algorithm; among ready nodes the smallest ``key`` (default: position in
    ``ids``) goes first. Raises ``ValueError`` on a cycle or a link from an unknown node."""
    import heapq

    pos = {i: k for k, i in enumerate(ids)}
    key = key or pos.__getitem__
    remaining = {i: len(preds[i]) for i in ids}
    succs: dict[Any, list[Any]] = {i: [] for i in ids}
    for i in ids:
        for p in preds[i]:
            if p not in succs:
                raise ValueError(f"Link from unknown node {p!r} to {i!r}.")
            succs[p].append(i)
    ready = [(key(i), pos[i], i) for i in ids if remaining[i] == 0]
    heapq.heapify(ready)
    order = []
    while ready:
        *_, i = heapq.heappop(ready)
        order.append(i)
        for s in succs[i]:
            remaining[s] -= 1
            if remaining[s] == 0:
                heapq.heappush(ready, (key(s), pos[s], s))
    if len(order) != len(ids):
        raise ValueError("The graph has a cycle; a training graph must be a DAG.")
    return order


@dataclass(frozen=True)
class Schedule:
    """An ordered list of ``(op, node)`` pairs, ``op`` being :data:`COMPUTE` or :data:`FREE`.

    A node may be computed several times (rematerialization); between a compute and the next
    free of the same node its output is resident.
    """

    ops: tuple[tuple[int, int], ...]

    @classmethod
    def from_ops(cls, ops: Iterable[tuple[int, int]]) -> Schedule:
        return cls(tuple((int(o), int(i)) for o, i in ops))

    def computes(self) -> list[int]:
        """Node indices in the order they are computed, recomputations included."""
        return [i for op, i in self.ops if op == COMPUTE]

    def compute_counts(self, n: int) -> list[int]:
        counts = [0] * n
        for op, i in self.ops:
            if op == COMPUTE:
                counts[i] += 1
        return counts

    def to_json(self) -> list[list[Any]]:
        return [["compute" if op == COMPUTE else "free", i] for op, i in self.ops]


def capture(module: Any, example_inputs: Any, **kwargs: Any) -> Graph:
    """Capture one training step of ``module`` as a :class:`Graph`; see :mod:`._capture`."""
    from mlcycle.train.remat._capture import capture_graph

    return capture_graph(module, example_inputs, **kwargs)
