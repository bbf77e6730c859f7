"""Hypothesis strategies for rematerialization graphs, shared by the remat test files.

Import from a test file in this folder as ``from _strategies import chains, training_graphs``
(pytest puts the folder on ``sys.path``).
"""

from __future__ import annotations

from hypothesis import strategies as st

from mlcycle.train.remat.graph import Graph, Node

__all__ = ["chains", "training_graphs"]


@st.composite
def training_graphs(
    draw: st.DrawFn,
    min_forward: int = 3,
    max_forward: int = 15,
    max_bytes: int = 100,
    stash: bool = False,
) -> Graph:
    """A random training graph: a forward DAG and its mirrored backward pass.

    Forward nodes ``f_0..f_{m-1}`` (``m`` in ``[min_forward, max_forward]``) in topological
    order, each ``f_i`` (``i > 0``) reading one or two earlier forward nodes. Backward nodes
    follow in reverse forward order: the one for ``f_v`` reads ``f_v``, ``f_v``'s forward
    inputs and the backward nodes of ``f_v``'s forward consumers (the gradients flowing back).
    Costs are in ``[1, 10]``, bytes in ``[1, max_bytes]``. With ``stash``, backward nodes also
    allocate ``[0, max_bytes]`` bytes that stay to the end (a parameter's gradient).
    """
    m = draw(st.integers(min_forward, max_forward))
    costs = st.floats(1.0, 10.0, allow_nan=False, allow_infinity=False)
    sizes = st.integers(1, max_bytes)
    nodes: list[Node] = []
    preds: list[tuple[int, ...]] = []
    for i in range(m):
        if i == 0:
            ins: tuple[int, ...] = ()
        else:
            k = draw(st.integers(1, min(2, i)))
            ins = tuple(sorted(draw(st.sets(st.integers(0, i - 1), min_size=k, max_size=k))))
        nodes.append(Node(f"f{i}", draw(costs), draw(sizes)))
        preds.append(ins)
    consumers: list[list[int]] = [[] for _ in range(m)]
    for i, ins in enumerate(preds):
        for p in ins:
            consumers[p].append(i)
    grad: dict[int, int] = {}
    for v in reversed(range(m)):
        grad[v] = len(nodes)
        extra = draw(st.integers(0, max_bytes)) if stash else 0
        nodes.append(Node(f"b{v}", draw(costs), draw(sizes), backward=True, stash=extra))
        preds.append((v, *preds[v], *(grad[s] for s in consumers[v])))
    return Graph(nodes=nodes, preds=preds, name=f"random{m}")


@st.composite
def chains(draw: st.DrawFn, min_layers: int = 3, max_layers: int = 20) -> Graph:
    """A :meth:`Graph.chain` of ``[min_layers, max_layers]`` layers, unit cost and bytes."""
    return Graph.chain(draw(st.integers(min_layers, max_layers)))
