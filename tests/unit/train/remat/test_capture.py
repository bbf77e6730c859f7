"""Capture of a training step as a rematerialization graph (AOTAutograd joint graph)."""

from __future__ import annotations

import copy
import inspect
import operator

import pytest

torch = pytest.importorskip("torch")
nn = torch.nn
fx = torch.fx

from mlcycle.train.remat._capture import CaptureError, capture_graph  # noqa: E402
from mlcycle.train.remat.graph import Graph, capture  # noqa: E402
from mlcycle.train.remat.profile import (  # noqa: E402
    estimate_costs,
    measure_costs,
    resolve_cost_model,
)


class TinyMLP(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.fc1 = nn.Linear(8, 16)
        self.fc2 = nn.Linear(16, 16)
        self.fc3 = nn.Linear(16, 4)

    def forward(self, x):
        h = torch.relu(self.fc1(x))
        h = torch.tanh(self.fc2(h)) * 2.0 + 1.0
        return self.fc3(h)


class TinyResNet(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Conv2d(3, 4, 3, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(4)
        self.conv = nn.Conv2d(4, 4, 3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(4)
        self.fc = nn.Linear(4, 3)

    def forward(self, x):
        h = torch.relu(self.bn1(self.stem(x)))
        h = torch.relu(self.bn2(self.conv(h)) + h)  # residual add
        return self.fc(h.mean(dim=(2, 3)))


class Branchy(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(4, 4)

    def forward(self, x):
        y = self.fc(x)
        if y.sum() > 0:  # data-dependent branch
            y = y * 2
        return y


def _inputs(model: nn.Module) -> torch.Tensor:
    gen = torch.Generator().manual_seed(0)
    if isinstance(model, TinyResNet):
        return torch.randn(2, 3, 6, 6, generator=gen)
    return torch.randn(3, 8, generator=gen)


@pytest.fixture(scope="module", params=[TinyMLP, TinyResNet], ids=["mlp", "resnet"])
def captured(request):
    torch.manual_seed(0)
    model = request.param().train()
    x = _inputs(model)
    coarse = capture(model, x, cost_model="flops")
    fine = capture(model, x, cost_model="flops", coarsen=False)
    return model, x, coarse, fine


def _tangent_dependent(gm: fx.GraphModule) -> set[str]:
    dep: set[str] = set()
    for n in gm.graph.nodes:
        if n.op == "placeholder" and n.target.startswith("tangents"):
            dep.add(n.name)
        elif any(a.name in dep for a in n.all_input_nodes):
            dep.add(n.name)
    return dep


def test_nodes_topological_and_preds_match_fx(captured):
    _, _, coarse, fine = captured
    for g in (coarse, fine):
        assert isinstance(g, Graph)
        gm = g.meta["fx"]
        nodes = {n.name: n for n in gm.graph.nodes}
        group_of = {name: i for i, names in enumerate(g.meta["groups"]) for name in names}
        for i, ps in enumerate(g.preds):
            assert all(0 <= p < i for p in ps)
            want = {
                group_of[a.name]
                for name in g.meta["groups"][i]
                for a in nodes[name].all_input_nodes
                if a.name in group_of and group_of[a.name] != i
            }
            assert set(ps) == want
        assert g.nodes[0].name in nodes


def test_group_mapping_covers_every_call_function_once(captured):
    _, _, coarse, fine = captured
    for g in (coarse, fine):
        gm = g.meta["fx"]
        calls = [n.name for n in gm.graph.nodes if n.op == "call_function"]
        flat = [name for names in g.meta["groups"] for name in names]
        assert sorted(flat) == sorted(calls)
        assert len(flat) == len(set(flat)) == g.meta["fine_nodes"]
        assert len(g.meta["groups"]) == len(g.meta["exposed"]) == len(g)
        for names, exposed in zip(g.meta["groups"], g.meta["exposed"], strict=True):
            assert set(exposed) <= set(names)
    assert len(fine) == coarse.meta["fine_nodes"]


def test_coarsening_reduces_nodes(captured):
    _, _, coarse, fine = captured
    assert len(coarse) < len(fine)
    assert coarse.const_bytes > 0
    assert sum(n.bytes for n in coarse.nodes) > 0
    assert sum(n.bytes for n in fine.nodes) > 0
    assert coarse.total_cost == pytest.approx(fine.total_cost)


def test_forward_and_backward_flags(captured):
    _, _, coarse, fine = captured
    for g in (coarse, fine):
        dep = _tangent_dependent(g.meta["fx"])
        assert any(n.backward for n in g.nodes) and any(not n.backward for n in g.nodes)
        for node, names, ps in zip(g.nodes, g.meta["groups"], g.preds, strict=True):
            if node.backward:
                assert any(name in dep for name in names)
            else:
                assert not any(name in dep for name in names)
                assert all(not g.nodes[p].backward for p in ps)
        assert any(n.output for n in g.nodes)
        # the model's outputs and every parameter gradient are graph outputs
        assert g.meta["num_fwd_outputs"] >= 1


def test_joint_graph_and_groups_reproduce_eager_gradients(captured):
    model, x, coarse, _ = captured
    ref = copy.deepcopy(model)
    out = ref(x)
    out.backward(torch.ones_like(out))
    params = dict(ref.named_parameters())

    # run the groups in graph order keeping only exposed values between groups
    g = coarse
    gm = g.meta["fx"]
    nodes = {n.name: n for n in gm.graph.nodes}
    env = {}
    state = {**dict(model.named_parameters()), **dict(model.named_buffers())}
    for name, kind, source in g.meta["placeholders"]:
        if kind in ("param", "buffer"):
            env[name] = state[source].detach()
        elif kind == "input":
            env[name] = x
        else:
            val = nodes[name].meta["val"]
            env[name] = torch.ones(val.shape, dtype=val.dtype)
    with torch.no_grad():
        for names, exposed in zip(g.meta["groups"], g.meta["exposed"], strict=True):
            for name in names:
                n = nodes[name]
                args, kwargs = fx.node.map_arg((n.args, n.kwargs), lambda a: env[a.name])
                env[name] = n.target(*args, **kwargs)
            for name in set(names) - set(exposed):
                del env[name]
    outs = [env[o] if o is not None else None for o in g.meta["outputs"]]
    nfwd = g.meta["num_fwd_outputs"]
    torch.testing.assert_close(outs[nfwd - 1], out.detach(), rtol=1e-4, atol=1e-5)
    grads = outs[nfwd:]
    for (_, kind, source), grad in zip(g.meta["placeholders"], grads, strict=False):
        if kind == "param":
            torch.testing.assert_close(grad, params[source].grad, rtol=1e-4, atol=1e-5)


def test_costs_positive(captured):
    model, x, coarse, _ = captured
    gm = coarse.meta["fx"]
    calls = [n.name for n in gm.graph.nodes if n.op == "call_function"]
    est = estimate_costs(gm)
    assert set(est) == set(calls) and all(c > 0 for c in est.values())
    primals = [*model.parameters(), *model.buffers(), x]
    measured = measure_costs(gm, [p.detach() for p in primals], repeats=2)
    assert set(measured) == set(calls) and all(c > 0 for c in measured.values())
    assert all(n.cost > 0 for n in coarse.nodes)
    assert coarse.meta["cost_model"] == "flops"


def test_measured_capture_leaves_module_unchanged():
    torch.manual_seed(1)
    model = nn.Sequential(TinyResNet(), nn.Dropout(0.5)).train()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    rng = torch.random.get_rng_state()
    g = capture_graph(model, (_inputs(model[0]),), cost_model="measure", repeats=1)
    assert g.meta["cost_model"] == "measure"
    assert all(n.cost > 0 for n in g.nodes)
    for k, v in model.state_dict().items():
        assert torch.equal(v, before[k]), k
    assert all(p.grad is None for p in model.parameters())
    assert model.training
    assert torch.equal(torch.random.get_rng_state(), rng)
    # the BatchNorm updates are forward outputs of the joint graph, on the mutated buffers
    buffers = {name for name, kind, _ in g.meta["placeholders"] if kind == "buffer"}
    assert set(g.meta["mutated_inputs"]) == buffers
    # dropout is flagged: recomputing it draws a new mask
    assert g.meta["random"]
    nodes = {n.name: n for n in g.meta["fx"].graph.nodes}
    for i in g.meta["random"]:
        assert any("dropout" in str(nodes[name].target) for name in g.meta["groups"][i])


def test_data_dependent_control_flow_raises_with_line():
    lines, start = inspect.getsourcelines(Branchy.forward)
    lineno = start + next(i for i, line in enumerate(lines) if "if y.sum() > 0" in line)
    with pytest.raises(CaptureError) as info:
        capture(Branchy(), torch.randn(2, 4))
    msg = str(info.value)
    assert "data-dependent control flow" in msg
    assert f"test_capture.py:{lineno}" in msg
    assert "torch.where" in msg
    assert isinstance(info.value, ValueError)


def test_item_raises_capture_error():
    class Item(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.fc = nn.Linear(4, 4)

        def forward(self, x):
            y = self.fc(x)
            return y * y.mean().item()

    with pytest.raises(CaptureError, match=r"\.item\(\)"):
        capture(Item(), torch.randn(2, 4))


def test_bad_inputs():
    with pytest.raises(TypeError, match="tuple of tensors"):
        capture(TinyMLP(), [1.0, 2.0])
    with pytest.raises(TypeError, match="nn.Module"):
        capture(lambda x: x, torch.randn(2))
    with pytest.raises(ValueError, match="cost_model"):
        capture(TinyMLP(), torch.randn(3, 8), cost_model="bogus")
    assert resolve_cost_model("auto", "cpu") == "flops"
    assert resolve_cost_model("auto", "cuda") == "measure"


def test_getitem_and_views_allocate_nothing(captured):
    _, _, _, fine = captured
    gm = fine.meta["fx"]
    for n in gm.graph.nodes:
        if n.op == "call_function" and (
            n.target is operator.getitem or n.target is torch.ops.aten.t.default
        ):
            assert fine.meta["fine_bytes"][n.name] == 0


def _views_of(node: fx.Node) -> set[fx.Node]:
    """``node`` and every value that aliases its storage (views of views...)."""
    from mlcycle.train.remat.profile import _is_alias

    seen, stack = {node}, [node]
    while stack:
        for u in stack.pop().users:
            if u.op == "call_function" and _is_alias(u) and u not in seen:
                seen.add(u)
                stack.append(u)
    return seen


def test_pointwise_ops_write_into_an_input_that_dies_in_their_group(captured):
    _, _, coarse, _ = captured
    nodes = {n.name: n for n in coarse.meta["fx"].graph.nodes}
    outputs = set(coarse.meta["outputs"])
    reused = 0
    for names, exposed, reuse in zip(
        coarse.meta["groups"], coarse.meta["exposed"], coarse.meta["reuse"], strict=True
    ):
        for member, into in reuse.items():
            reused += 1
            n, a = nodes[member], nodes[into]
            assert torch.Tag.pointwise in n.target.tags
            assert names.index(into) < names.index(member)
            assert into not in exposed and into not in outputs
            # No one reads the overwritten storage after the op: not the input, not a view of it.
            upto = set(names[: names.index(member) + 1])
            for alias in _views_of(a):
                assert alias.name in upto
                assert all(u.name in upto for u in alias.users), (member, into, alias)
            va, vn = a.meta["val"], n.meta["val"]
            assert (va.shape, va.stride(), va.dtype) == (vn.shape, vn.stride(), vn.dtype)
    assert reused > 0


def test_a_chain_of_pointwise_ops_holds_one_tensor():
    # Backward of tanh(fc2(h)) * 2: mm -> mul -> tanh_backward, each the same [3, 16] tensor.
    # Each op writes into its dying input, so the group holds one tensor and no transient
    # (allocating each result would hold two at once).
    torch.manual_seed(0)
    model = TinyMLP()
    g = capture(model, _inputs(model), cost_model="flops")
    (i,) = [i for i, names in enumerate(g.meta["groups"]) if "tanh_backward" in names]
    assert g.meta["reuse"][i] == {"mul_1": "mm", "tanh_backward": "mul_1"}
    assert g.nodes[i].bytes == 3 * 16 * 4
    assert g.nodes[i].transient == 0
