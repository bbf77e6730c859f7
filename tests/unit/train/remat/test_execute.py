"""The executor: a planned step computes exactly the plain step's gradients, in less memory."""

from __future__ import annotations

import copy
from typing import Any

import pytest
import torch
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode

from mlcycle.models import build
from mlcycle.train.remat import InfeasibleBudgetError, capture, simulate, solve
from mlcycle.train.remat._bounds import min_feasible_bytes
from mlcycle.train.remat.baselines import checkpoint_all
from mlcycle.train.remat.execute import Rematerialized
from mlcycle.train.remat.graph import COMPUTE
from mlcycle.train.remat.memory import LiveBytes


def planned(model: nn.Module, inputs: tuple, t: float = 0.5, solver: str = "auto"):
    """Plan at ``t`` of the way from the least feasible budget up to the plain peak."""
    graph = capture(model, inputs, cost_model="flops")
    lo = min_feasible_bytes(graph)
    hi = simulate(graph, checkpoint_all(graph)).peak_bytes
    while True:  # the least feasible budget is a bound, not always reachable: step up
        try:
            budget = int(lo + t * (hi - lo))
            plan = solve(graph, budget_bytes=budget, solver=solver, time_limit_s=1)
            return Rematerialized(model, inputs, plan)
        except InfeasibleBudgetError:
            if t >= 1.0:
                raise
            t = min(1.0, t + 0.15)


def loss_of(out: torch.Tensor) -> torch.Tensor:
    return out.double().square().mean()


def run_both(name: str, dtype: torch.dtype, t: float = 0.5, **kw):
    model, inputs = build(name, dtype=dtype, **kw)
    twin = copy.deepcopy(model)
    step = planned(twin, inputs, t)
    torch.manual_seed(123)
    loss_of(model(*inputs)).backward()
    torch.manual_seed(123)
    loss_of(step(*inputs)).backward()
    return model, twin, step


# Every model of mlcycle.models, at sizes a 2-core CI machine trains in seconds.
MODELS = [
    ("mlp", {"batch": 16}),
    ("resnet-tiny", {"batch": 8}),
    ("unet-tiny", {"batch": 2}),
    ("gpt2-tiny", {"batch": 4}),
    ("resnet18", {"batch": 2, "image_size": 32}),
    ("resnet50", {"batch": 2, "image_size": 32}),
    ("vgg19", {"batch": 1, "image_size": 32}),
    ("mobilenet_v2", {"batch": 2, "image_size": 32}),
    ("unet", {"batch": 1, "image_size": 32}),
    ("gpt2-small", {"batch": 1, "seq_len": 8, "n_layer": 2}),  # 2 of its 12 identical blocks
]


@pytest.mark.parametrize(("name", "kw"), MODELS, ids=[m for m, _ in MODELS])
def test_gradients_equal_the_plain_step_in_float64(name: str, kw: dict) -> None:
    model, twin, step = run_both(name, torch.float64, **kw)
    assert step.plan.cost_ratio >= 1.0
    for (pname, p), q in zip(model.named_parameters(), twin.parameters(), strict=True):
        assert q.grad is not None, pname
        assert (p.grad - q.grad).abs().max().item() <= 1e-10, pname


@pytest.mark.parametrize("name", ["resnet-tiny", "gpt2-tiny"])
def test_gradients_match_in_float32(name: str) -> None:
    model, twin, _ = run_both(name, torch.float32, t=0.3, batch=8)
    for p, q in zip(model.parameters(), twin.parameters(), strict=True):
        torch.testing.assert_close(q.grad, p.grad, rtol=1e-5, atol=1e-7)


def test_batchnorm_statistics_update_once_per_step() -> None:
    model, twin, step = run_both("resnet-tiny", torch.float64, t=0.2, batch=8)
    counts = step.plan.schedule.compute_counts(len(step.plan.graph))
    assert max(counts) > 1  # the plan does recompute, BatchNorm groups included
    for (name, a), b in zip(model.named_buffers(), twin.buffers(), strict=True):
        assert torch.equal(a, b), name
    tracked = [b for n, b in twin.named_buffers() if n.endswith("num_batches_tracked")]
    assert tracked and all(int(b) == 1 for b in tracked)


def test_dropout_masks_replay_on_recomputation() -> None:
    model, twin, step = run_both("gpt2-tiny", torch.float64, t=0.1, batch=8)
    graph = step.plan.graph
    counts = step.plan.schedule.compute_counts(len(graph))
    assert any(counts[i] > 1 for i in graph.meta["random"]), "no dropout was recomputed"
    assert model.training and any(isinstance(m, nn.Dropout) and m.p > 0 for m in model.modules())
    for p, q in zip(model.parameters(), twin.parameters(), strict=True):
        assert torch.equal(p.grad, q.grad)


class InPlace(nn.Module):
    """In-place activations and an aliasing view, as user code often has them."""

    def __init__(self) -> None:
        super().__init__()
        self.a = nn.Linear(32, 64)
        self.b = nn.Linear(64, 64)
        self.c = nn.Linear(64, 8)
        self.act = nn.ReLU(inplace=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.act(self.a(x))
        g = self.b(h)
        g.mul_(2.0).add_(h)  # in place on an activation that backward does not need
        g = self.act(g)  # in-place ReLU
        v = g.view(-1, 8, 8)[:, 0]  # a view that aliases it
        return self.c(g) + v.sum(-1, keepdim=True)


def test_in_place_ops_and_views_are_handled() -> None:
    torch.manual_seed(0)
    model = InPlace().double()
    x = torch.randn(64, 32, dtype=torch.float64)
    twin = copy.deepcopy(model)
    step = planned(twin, (x,), t=0.2)
    loss_of(model(x)).backward()
    loss_of(step(x)).backward()
    for p, q in zip(model.parameters(), twin.parameters(), strict=True):
        assert (p.grad - q.grad).abs().max().item() <= 1e-10


class _Writes(TorchDispatchMode):
    """Records each op that writes into an argument (``add_``, ``add.out``) other than
    ``copy_``: the storage it was told to write, the storage of its result, and the storages
    of its tensor inputs."""

    def __init__(self) -> None:
        super().__init__()
        self.calls: list[tuple[int, int, list[int]]] = []
        self.ops: list[Any] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        result = func(*args, **kwargs)
        if func is torch.ops.aten.copy_.default:  # AOTAutograd writing BatchNorm's buffers
            return result
        for i, a in enumerate(func._schema.arguments):
            if a.alias_info is not None and a.alias_info.is_write:
                written = kwargs[a.name] if a.name in kwargs else args[i]
                inputs = [t.data_ptr() for t in args if isinstance(t, torch.Tensor)]
                self.calls.append((written.data_ptr(), result.data_ptr(), inputs))
                self.ops.append(func)
        return result


def _in_place_model() -> tuple[nn.Module, tuple[torch.Tensor, ...]]:
    torch.manual_seed(0)
    return InPlace().double(), (torch.randn(64, 32, dtype=torch.float64),)


@pytest.mark.parametrize(
    "make",
    [_in_place_model, lambda: build("resnet-tiny", dtype=torch.float64, batch=8)],
    ids=["in-place-model", "resnet-tiny"],
)
def test_reused_ops_write_in_place_and_gradients_match(make) -> None:
    model, inputs = make()
    twin = copy.deepcopy(model)
    step = planned(twin, inputs, t=0.2)
    graph, schedule = step.plan.graph, step.plan.schedule
    # Every computation of a group runs its planned reuses, recomputations included.
    want = sum(len(graph.meta["reuse"][v]) for op, v in schedule.ops if op == COMPUTE)
    assert want > 0
    torch.manual_seed(1)
    loss_of(model(*inputs)).backward()
    torch.manual_seed(1)
    with _Writes() as mode:
        loss_of(step(*inputs)).backward()
    assert len(mode.calls) == want
    for written, result, inputs_at in mode.calls:
        assert result == written  # the op wrote where it was told, without reallocating
        assert written in inputs_at  # ... into the storage of one of its own inputs
    for p, q in zip(model.parameters(), twin.parameters(), strict=True):
        assert (p.grad - q.grad).abs().max().item() <= 1e-10
    for (name, a), b in zip(model.named_buffers(), twin.buffers(), strict=True):
        assert torch.equal(a, b), name


def test_reuse_runs_in_recomputed_groups_and_through_out() -> None:
    model, inputs = build("resnet-tiny", dtype=torch.float64, batch=8)
    step = planned(model, inputs, t=0.2)
    graph = step.plan.graph
    counts = step.plan.schedule.compute_counts(len(graph))
    assert any(counts[v] > 1 for v, reuse in enumerate(graph.meta["reuse"]) if reuse)
    model, inputs = _in_place_model()
    step = planned(model, inputs, t=0.2)
    with _Writes() as mode:
        step(*inputs).sum().backward()
    ops = {str(op) for op in mode.ops}
    assert "aten.add_.Tensor" in ops  # the input is the first argument: in place
    assert "aten.add.out" in ops  # the second: through out=


def test_other_input_shapes_are_refused_with_advice() -> None:
    model, inputs = build("mlp", batch=16)
    step = planned(model, inputs)
    with pytest.raises(ValueError, match="planned for inputs"):
        step(torch.randn(8, inputs[0].shape[1]))


def test_optimizer_loop_trains_the_wrapped_module() -> None:
    model, inputs = build("mlp", batch=32)
    step = planned(model, inputs, t=0.3)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    losses = []
    for _ in range(5):
        opt.zero_grad()
        loss = loss_of(step(*inputs))
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < losses[0]


@pytest.mark.parametrize(("name", "t"), [("resnet-tiny", 0.15), ("gpt2-tiny", 0.3)])
def test_measured_peak_is_within_ten_percent_of_the_prediction(name: str, t: float) -> None:
    model, inputs = build(name, batch=32)
    step = planned(model, inputs, t=t)
    baseline = [*model.parameters(), *model.buffers(), *inputs]
    with LiveBytes(baseline=baseline) as mem:
        out = step(*inputs)
        out.sum().backward()  # a loss that allocates nothing the plan does not know of
        del out
    predicted = step.plan.peak_bytes
    assert mem.peak_bytes <= 1.10 * predicted
    assert mem.peak_bytes >= 0.90 * predicted
