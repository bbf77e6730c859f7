"""Live tensor bytes on the CPU: the tracker that measures a training step's real peak."""

from __future__ import annotations

import pytest

torch = pytest.importorskip("torch")
nn = torch.nn

from mlcycle.train.remat.memory import LiveBytes, cuda_peak, measure_peak  # noqa: E402

MiB = 1 << 20


def _mlp(width: int, layers: int) -> nn.Sequential:
    mods: list[nn.Module] = []
    for _ in range(layers):
        mods += [nn.Linear(width, width), nn.ReLU()]
    return nn.Sequential(*mods)


def _nbytes(tensors) -> int:
    return sum(t.untyped_storage().nbytes() for t in tensors)


def test_freed_tensor_does_not_count_toward_peak() -> None:
    base = torch.empty(4096, dtype=torch.uint8)
    with LiveBytes(baseline=[base]) as mem:
        assert mem.baseline_bytes == 4096
        a = torch.empty(MiB, dtype=torch.uint8)
        assert mem.live_bytes == 4096 + MiB
        del a
        assert mem.live_bytes == 4096
        b = torch.empty(2 * MiB, dtype=torch.uint8)
        assert mem.live_bytes == 4096 + 2 * MiB
        del b
        assert mem.live_bytes == 4096
    assert mem.peak_bytes == 2 * MiB + 4096


def test_tensors_alive_together_add_up() -> None:
    base = torch.empty(4096, dtype=torch.uint8)
    with LiveBytes(baseline=[base]) as mem:
        a = torch.empty(MiB, dtype=torch.uint8)
        b = torch.empty(2 * MiB, dtype=torch.uint8)
        del a, b
    assert mem.peak_bytes == 3 * MiB + 4096
    assert mem.live_bytes == 4096


def test_views_do_not_double_count() -> None:
    with LiveBytes() as mem:
        a = torch.zeros(256, 1024)  # 1 MiB
        views = [a[1:], a.t(), a.view(-1), a.view(torch.uint8), a.reshape(1024, 256), a[::2, ::2]]
        a.add_(1.0)  # in place: no new storage
        views[0].mul_(2.0)
        assert mem.live_bytes == MiB
        del a
        assert mem.live_bytes == MiB  # the views keep the storage alive
        views.pop(0)
        assert mem.live_bytes == MiB
        views.clear()
        assert mem.live_bytes == 0
    assert mem.peak_bytes == MiB


def test_baseline_dedupes_storages_and_untracked_tensors_never_count() -> None:
    w = torch.zeros(1024)  # 4 KiB
    other = torch.zeros(4096)  # predates the block, not in the baseline
    with LiveBytes(baseline=[w, w.view(32, 32), [w[1:]], {"x": w}]) as mem:
        assert mem.baseline_bytes == 4096
        other.add_(1.0)
        v = other.view(64, 64).t()
        assert mem.live_bytes == 4096
        del v
    assert mem.peak_bytes == 4096


def test_baseline_freed_inside_block_is_taken_off() -> None:
    x = torch.zeros(MiB, dtype=torch.uint8)
    mem = LiveBytes(baseline=[x])  # keeps only weak references
    with mem:
        assert mem.live_bytes == MiB
        del x
        assert mem.live_bytes == 0
    assert mem.peak_bytes == MiB


def test_resize_is_tracked() -> None:
    with LiveBytes() as mem:
        z = torch.empty(16, dtype=torch.uint8)
        z.resize_(MiB)
        assert mem.live_bytes == MiB
        del z
        assert mem.live_bytes == 0
    assert mem.peak_bytes == MiB


def test_device_filter_and_frozen_after_exit() -> None:
    with LiveBytes(device="cuda") as mem:
        keep = torch.empty(MiB, dtype=torch.uint8)
    assert mem.peak_bytes == 0
    with LiveBytes(device="cpu") as mem:
        keep = torch.empty(MiB, dtype=torch.uint8)
    del keep  # after exit the counters are frozen
    assert mem.live_bytes == mem.peak_bytes == MiB


def test_mlp_training_step_matches_analytic_estimate() -> None:
    torch.manual_seed(0)
    layers, width, batch = 3, 64, 1024
    net = _mlp(width, layers)
    x = torch.randn(batch, width)
    params = list(net.parameters())
    p_bytes = _nbytes(params)
    act = batch * width * 4  # one activation
    with LiveBytes(baseline=[*params, x]) as mem:
        net(x).sum().backward()
        # Activations are all released by backward; the gradients stay.
        assert mem.live_bytes == p_bytes + act + p_bytes
    assert mem.baseline_bytes == p_bytes + act
    extra = mem.peak_bytes - mem.baseline_bytes
    # The forward must hold all ReLU outputs at once (saved for backward), plus the last Linear
    # output while its ReLU runs; backward adds one gradient activation while the last saved
    # output is still alive, and the gradients so far.
    assert extra >= (layers + 1) * act
    assert extra <= (layers + 1) * act + p_bytes
    assert p_bytes < mem.peak_bytes < 3 * (p_bytes + act + layers * act)


def test_checkpoint_sequential_lowers_the_peak() -> None:
    from torch.utils.checkpoint import checkpoint_sequential

    torch.manual_seed(0)
    layers, width, batch, segments = 16, 128, 2048, 4
    net = _mlp(width, layers)
    x = torch.randn(batch, width)
    params = list(net.parameters())
    p_bytes = _nbytes(params)
    act = batch * width * 4

    def plain() -> None:
        net(x).sum().backward()

    def ckpt() -> None:
        out = checkpoint_sequential(net, segments, x, use_reentrant=False)
        out.sum().backward()

    peaks = {}
    for name, step in (("plain", plain), ("ckpt", ckpt)):
        net.zero_grad(set_to_none=True)
        with LiveBytes(baseline=[*params, x]) as mem:
            step()
            assert mem.live_bytes == mem.baseline_bytes + p_bytes  # only the gradients remain
        peaks[name] = mem.peak_bytes
    base = p_bytes + act
    assert peaks["plain"] >= base + (layers + 1) * act
    assert peaks["ckpt"] < 0.6 * peaks["plain"]
    # Backward recomputes a whole segment: the tracker sees those backward-time activations.
    assert peaks["ckpt"] >= base + (layers // segments) * act


def test_fx_graph_module_step() -> None:
    from torch.func import functional_call
    from torch.fx.experimental.proxy_tensor import make_fx

    torch.manual_seed(0)
    layers, width, batch = 3, 64, 1024
    net = _mlp(width, layers)
    names = [n for n, _ in net.named_parameters()]
    params = [p.detach() for p in net.parameters()]
    x = torch.randn(batch, width)
    act = batch * width * 4

    def step(params, x):
        for p in params:
            p.requires_grad_(True)
        out = functional_call(net, dict(zip(names, params, strict=True)), (x,))
        return torch.autograd.grad(out.sum(), params)

    gm = make_fx(step)(params, x)
    params = [p.detach() for p in params]  # tracing left requires_grad set on them
    baseline = [*params, x]
    base = _nbytes(baseline)
    # The graph holds the whole step (forward and backward as plain aten ops).
    with LiveBytes(baseline=baseline) as mem:
        grads = gm(params, x)
        assert mem.live_bytes == base + _nbytes(grads)
    del grads
    assert mem.peak_bytes >= base + layers * act
    assert mem.peak_bytes <= base + (2 * layers + 2) * act
    # The interpreter frees each value after its last use, as the generated code does.
    peak = measure_peak(lambda: torch.fx.Interpreter(gm).run(params, x), baseline=baseline)
    assert peak == mem.peak_bytes


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the CPU-only error")
def test_cuda_peak_needs_cuda() -> None:
    with pytest.raises(RuntimeError, match="CUDA"):
        cuda_peak(lambda: None)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_peak_counts_a_transient() -> None:
    def fn() -> None:
        torch.empty(8 * MiB, dtype=torch.uint8, device="cuda")

    assert cuda_peak(fn) >= 8 * MiB
