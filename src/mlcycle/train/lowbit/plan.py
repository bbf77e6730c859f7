"""Plan rematerialization with compressed activations: rescale a graph's saved bytes.

Checkmate's planner (:mod:`mlcycle.train.remat`) reads one number per node, the bytes of its
output while it stays resident. With :func:`~mlcycle.train.lowbit.compress_activations` the
activations that wait for backward are held in low bit, so a forward node that backward reads
costs its compressed size while it waits. :func:`compressed_graph` returns a copy of a graph with
those bytes rescaled, so that any planner and the simulator work with the compressed sizes.

Memory model (the simulator's, Checkmate Sec. 4.3, plus the float copies). Between forward and
backward a saved output is held at ``ratio`` of its bytes. Its float copy is live while the node
that makes it runs and while each node that reads it runs (a forward consumer reads the float
output; a backward node reads it decompressed); the difference is added to those nodes'
``transient`` bytes. Not modelled: a float output that Python keeps alive across later forward
nodes (a residual block's input, held by the enclosing modules' call frames until they return),
and the packing's own temporaries (about 9 bytes per value for at most 1/8 of a tensor). On an
eager step of ``gpt2-tiny`` the measured peak with 2-bit activations is within the plain
schedule's predicted peak; on ``resnet-tiny`` it is about 25% above it, for the first reason.

Execution. Eager PyTorch under :func:`~mlcycle.train.lowbit.compress_activations` stores each
saved tensor as the op that saves it runs, which is what this model assumes. The remat executor
(:func:`mlcycle.train.remat.rematerialize`) runs the forward as one AOTAutograd graph and saves
its tensors when that graph returns: the hooks do compress them (and a plan's schedule runs
unchanged under them), but only from that point on, so the forward part of its peak stays at
float size. Executing a compressed-size plan at its predicted peak needs the executor to pack
each saved tensor right after its last forward use.

Torch-free: this module reads and writes plain :class:`~mlcycle.train.remat.graph.Graph` data.
"""

from __future__ import annotations

import math
from dataclasses import replace
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from mlcycle.train.remat.graph import Graph

__all__ = ["compressed_graph", "compression_ratio"]

_META_BYTES_PER_GROUP = 4  # float16 scale + float16 zero point, as activations.py stores them


def compression_ratio(bits: int, *, group_size: int = 256, dtype_bytes: int = 4) -> float:
    """Compressed bytes over original bytes of one saved floating tensor (ActNN layout).

    ``bits`` per value plus a float16 scale and zero point per ``group_size`` values, over
    ``8 * dtype_bytes`` bits per value: 2 bits in groups of 256 from float32 is
    ``(2 + 32/256) / 32 = 0.0664``, 15x less.
    """
    if bits not in (1, 2, 4, 8):
        raise ValueError(f"bits must be 1, 2, 4 or 8 (as compress_activations stores); got {bits}.")
    if group_size < 8 or group_size % 8:
        raise ValueError(
            f"group_size must be a positive multiple of 8, e.g. 256; got {group_size}."
        )
    if dtype_bytes not in (2, 4, 8):
        raise ValueError(
            f"dtype_bytes must be 2 (float16/bfloat16), 4 (float32) or 8; got {dtype_bytes}."
        )
    bits_per_value = bits + 8.0 * _META_BYTES_PER_GROUP / group_size
    return bits_per_value / (8.0 * dtype_bytes)


def compressed_graph(
    graph: Graph,
    *,
    bits: int | None = 2,
    group_size: int = 256,
    dtype_bytes: int = 4,
    ratio: float | None = None,
) -> Graph:
    """A copy of ``graph`` whose saved activations take their compressed size.

    Every forward node that a backward node reads (and that is not a step output) gets
    ``ceil(bytes * ratio)`` bytes; its float excess ``bytes - compressed`` is added to its own
    ``transient`` (the float copy exists while it is computed) and to the ``transient`` of each
    forward node that reads it (the float copy is the input). Backward nodes, gradients and
    ``const_bytes`` are unchanged. ``meta`` (the captured fx graph, node groups) is shared, so a
    plan made on the copy runs on :func:`mlcycle.train.remat.rematerialize`'s executor.

    Args:
        graph: a captured or published graph.
        bits: bits per saved value (1, 2, 4 or 8); sets ``ratio`` with ``group_size`` and
            ``dtype_bytes`` (see :func:`compression_ratio`). Ignored when ``ratio`` is given.
        group_size: values per scale and zero point.
        dtype_bytes: bytes per value of the activations before compression (4: float32).
        ratio: compressed over original bytes, e.g. a measured
            ``1 / ActivationStats.reduction``; in (0, 1].

    Example:
        >>> g2 = compressed_graph(capture(model, x), bits=2)
        >>> plan = solve(g2, budget_bytes=budget)     # plans with 2-bit activations
    """
    from mlcycle.train.remat.graph import Graph

    if ratio is None:
        if bits is None:
            raise ValueError("Give bits (e.g. bits=2) or a measured ratio (e.g. ratio=0.07).")
        ratio = compression_ratio(bits, group_size=group_size, dtype_bytes=dtype_bytes)
    if not 0 < ratio <= 1:
        raise ValueError(
            f"ratio must be in (0, 1] (compressed bytes over original bytes, e.g. 0.0664 for "
            f"2 bits); got {ratio}."
        )
    saved = [
        not node.backward and not node.output and any(graph.nodes[s].backward for s in succs)
        for node, succs in zip(graph.nodes, graph.succs, strict=True)
    ]
    excess = [
        node.bytes - math.ceil(node.bytes * ratio) if is_saved else 0
        for node, is_saved in zip(graph.nodes, saved, strict=True)
    ]
    nodes = []
    for i, node in enumerate(graph.nodes):
        extra = excess[i] + sum(excess[p] for p in graph.preds[i])
        # replace() keeps every other field of the node (cost, flags, any added later)
        nodes.append(replace(node, bytes=node.bytes - excess[i], transient=node.transient + extra))
    return Graph(
        nodes=nodes,
        preds=list(graph.preds),
        name=f"{graph.name} ({ratio:.4g}x saved bytes)",
        const_bytes=graph.const_bytes,
        meta=graph.meta,
    )
