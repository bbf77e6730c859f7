"""The example models: the MLP's weights depend on its seed alone."""

from __future__ import annotations

import importlib.util
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

torch = pytest.importorskip("torch")

from mlcycle.serve.online import examples  # noqa: E402

PEERS = Path(__file__).resolve().parents[3] / "benchmarks" / "_serve_peers.py"


def _same(a, b) -> bool:
    pa, pb = list(a.parameters()), list(b.parameters())
    return len(pa) == len(pb) and all(torch.equal(x, y) for x, y in zip(pa, pb, strict=True))


def test_two_mlps_built_at_once_get_the_same_weights_and_leave_torch_rng_alone() -> None:
    state = torch.random.get_rng_state()
    with ThreadPoolExecutor(2) as pool:  # two replicas of one model loading together
        a, b = pool.map(lambda _: examples.mlp(hidden=64), range(2))
    assert torch.equal(state, torch.random.get_rng_state())
    assert _same(a, b)
    torch.manual_seed(123)  # whatever the global generator holds
    assert _same(a, examples.mlp(hidden=64))
    assert not _same(a, examples.mlp(hidden=64, seed=1))


def test_the_mlp_equals_the_serving_peers_mlp() -> None:
    """serve_bench compares mlcycle's answers with the bare server's, LitServe's and Ray's,
    whose MLP is built after torch.manual_seed(seed) (benchmarks/_serve_peers.py)."""
    spec = importlib.util.spec_from_file_location("_serve_peers_for_test", PEERS)
    peers = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(peers)
    for hidden, seed in ((1024, 0), (96, 3)):
        ours = examples.mlp(hidden=hidden, seed=seed)
        theirs = peers.build_mlp(hidden=hidden, seed=seed)
        assert _same(ours, theirs)
    wide = examples.wide_mlp(hidden=128)
    assert _same(wide, peers.build_mlp(hidden=128))
    x = torch.randn(3, 256)
    with torch.inference_mode():
        assert torch.allclose(wide(x), peers.build_mlp(hidden=128)(x).softmax(-1))
