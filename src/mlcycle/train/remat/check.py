"""``mlcycle remat check``: one planned training step against the plain one, measured.

It answers the user's two questions for a model: does the step now fit (measured peak against
the prediction and the plain step), and how much slower is it (median step times). It also
checks that the gradients are the plain step's.
"""

from __future__ import annotations

import copy
import statistics
import time
from collections.abc import Callable
from typing import Any

__all__ = ["check_model"]


def _measure_peak(fn: Callable[[], Any], tensors: list[Any], device: Any) -> int:
    from mlcycle.train.remat.memory import LiveBytes, cuda_peak

    if device.type == "cuda":
        return cuda_peak(fn, device)
    with LiveBytes(baseline=tensors) as mem:
        fn()
    return mem.peak_bytes


def _median_times(fns: list[Callable[[], Any]], steps: int, device: Any) -> list[float]:
    """Median wall time of each function, run in alternation so that load on a shared machine
    falls on all of them alike; one warm-up round first."""
    import torch

    times: list[list[float]] = [[] for _ in fns]
    for round_ in range(steps + 1):
        for k, fn in enumerate(fns):
            if device.type == "cuda":
                torch.cuda.synchronize(device)
            t0 = time.perf_counter()
            fn()
            if device.type == "cuda":
                torch.cuda.synchronize(device)
            if round_:
                times[k].append(time.perf_counter() - t0)
    return [statistics.median(t) for t in times]


def check_model(
    name: str,
    *,
    batch: int,
    budget_fraction: float,
    steps: int = 3,
    solver: str = "auto",
    time_limit_s: float = 60.0,
    device: str | None = None,
    **build_kw: Any,
) -> dict[str, Any]:
    """Plan ``name`` from :mod:`mlcycle.models`, run plain and planned steps, and compare.

    The loss is ``output.sum()``, which allocates nothing beyond the model's own step, so the
    measured peaks compare with the plan's prediction. Returns the fields
    ``grad_max_abs_diff``, ``predicted_peak_bytes``, ``measured_peak_bytes``,
    ``plain_peak_bytes`` (measured), ``step_s_plain``, ``step_s_remat``, and the plan's
    summary (``cost_ratio``, ``lower_bound``, ``budget_bytes``, ``solver``, ...).
    """
    import torch

    from mlcycle.models import build
    from mlcycle.train.remat.execute import rematerialize

    dev = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    model, inputs = build(name, batch=batch, device=dev, **build_kw)
    twin = copy.deepcopy(model)
    step = rematerialize(
        twin, inputs, budget_fraction=budget_fraction, solver=solver, time_limit_s=time_limit_s
    )

    def run(module: Any) -> Callable[[], None]:
        def once() -> None:
            for p in module.parameters():
                p.grad = None
            out = module(*inputs)
            out.sum().backward()

        return once

    plain_step, remat_step = run(model), run(step)
    torch.manual_seed(0)
    plain_step()
    torch.manual_seed(0)
    remat_step()
    diff = max(
        (p.grad - q.grad).abs().max().item()
        for p, q in zip(model.parameters(), twin.parameters(), strict=True)
        if p.grad is not None
    )
    held = lambda m: [*m.parameters(), *m.buffers(), *inputs]  # noqa: E731
    plain_peak = _measure_peak(plain_step, held(model), dev)
    remat_peak = _measure_peak(remat_step, held(twin), dev)
    plain_s, remat_s = _median_times([plain_step, remat_step], steps, dev)
    plan = step.plan
    return {
        "model": name,
        "batch": batch,
        "device": str(dev),
        "budget_fraction": budget_fraction,
        "grad_max_abs_diff": diff,
        "predicted_peak_bytes": plan.peak_bytes,
        "measured_peak_bytes": remat_peak,
        "plain_peak_bytes": plain_peak,
        "predicted_plain_peak_bytes": plan.plain_peak_bytes,
        "step_s_plain": plain_s,
        "step_s_remat": remat_s,
        "time_ratio": remat_s / plain_s if plain_s > 0 else None,
        "mem_ratio": remat_peak / plain_peak if plain_peak > 0 else None,
        **{k: v for k, v in plan.to_dict().items() if k not in ("baselines",)},
    }
