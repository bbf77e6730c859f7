"""Batch-size controllers (Clipper Sec. 4.3): AIMD and the latency model, driven by hand."""

from __future__ import annotations

import pytest

from mlcycle.serve.online.batching import (
    AIMDBatcher,
    FixedBatcher,
    LatencyModel,
    LatencyModelBatcher,
    NoBatching,
    make_controller,
)


def test_aimd_grows_additively_while_batches_fit_then_backs_off_on_a_miss() -> None:
    ctrl = AIMDBatcher(target_s=0.010, max_batch_size=64)
    sizes = []
    for _ in range(20):  # full batches at 0.2 ms per query: all within 10 ms
        n = ctrl.batch_size()
        sizes.append(n)
        ctrl.observe(n, 0.0002 * n)
    assert sizes == list(range(1, 21))  # +1 per full batch
    before = ctrl.batch_size()
    ctrl.observe(before, 0.012)  # one batch over the target
    assert ctrl.batch_size() == int(before * 0.9)  # a 10% multiplicative back-off
    assert ctrl.misses == 1


def test_aimd_does_not_grow_on_partial_batches_and_respects_bounds() -> None:
    ctrl = AIMDBatcher(target_s=0.010, max_batch_size=4, initial=3)
    ctrl.observe(1, 0.001)  # a thin queue: the limit was not exercised
    assert ctrl.batch_size() == 3
    for _ in range(10):
        ctrl.observe(ctrl.batch_size(), 0.001)
    assert ctrl.batch_size() == 4  # capped
    for _ in range(50):
        ctrl.observe(ctrl.batch_size(), 1.0)
    assert ctrl.batch_size() == 1  # never below one


def test_latency_model_fits_a_line_and_picks_the_largest_batch_that_fits() -> None:
    model = LatencyModel(quantile=0.99)
    for n in (1, 2, 4, 8, 16, 32):
        for _ in range(4):
            model.observe(n, 0.001 + 0.0005 * n)  # a = 1 ms, b = 0.5 ms per query
    assert model.a_s == pytest.approx(0.001, abs=1e-9)
    assert model.b_s == pytest.approx(0.0005, abs=1e-9)
    ctrl = LatencyModelBatcher(max_batch_size=64, target_s=1.0, model=model)
    # 1 ms + 0.5 ms * n <= 10.1 ms  ->  n = 18
    assert ctrl.batch_size(remaining_s=0.0101) == 18
    assert model.predict_s(18) <= 0.0101 < model.predict_s(19)
    assert ctrl.batch_size(remaining_s=0.0001) == 1  # nothing fits: still make progress
    assert ctrl.batch_size(remaining_s=10.0) == 64  # everything fits: the cap


def test_latency_model_adds_the_tail_of_the_residuals() -> None:
    model = LatencyModel(quantile=0.9)
    for i in range(200):
        model.observe(8, 0.004 + (0.002 if i % 20 == 0 else 0.0))  # 5% slow batches
    assert model.predict_s(8) >= 0.004
    slow = LatencyModel(quantile=0.99)
    for i in range(200):
        slow.observe(8, 0.004 + (0.002 if i % 20 == 0 else 0.0))
    assert slow.predict_s(8) > model.predict_s(8) + 0.001  # p99 covers the slow batches


def test_running_sums_match_an_exact_refit_after_the_window_wraps() -> None:
    model = LatencyModel(window=16, refit_every=1000)
    for i in range(100):
        model.observe(1 + i % 7, 0.001 + 0.0002 * (1 + i % 7) + 1e-5 * (i % 3))
    a, b = model.a_s, model.b_s
    model._refit()
    assert (a, b) == pytest.approx((model.a_s, model.b_s), rel=1e-9, abs=1e-12)


def test_latency_model_before_and_after_one_size() -> None:
    model = LatencyModel()
    assert model.predict_s(10) == 0.0 and model.largest_fitting(0.01, 64) == 1
    model.observe(4, 0.004)  # one size seen: proportional, no fixed cost
    assert model.predict_s(8) == pytest.approx(0.008)
    ctrl = LatencyModelBatcher(max_batch_size=64, target_s=0.006)
    ctrl.observe(4, 0.004)  # a batcher without a shared model feeds its own
    assert ctrl.batch_size(remaining_s=0.1) == 6  # limited by target_s


def test_fixed_none_and_factory() -> None:
    assert NoBatching().batch_size(1.0) == 1
    assert FixedBatcher(16).batch_size(0.0) == 16
    assert isinstance(make_controller("aimd", max_batch_size=8, target_s=0.01), AIMDBatcher)
    assert isinstance(
        make_controller("latency", max_batch_size=8, target_s=0.01), LatencyModelBatcher
    )
    with pytest.raises(ValueError, match="aimd, latency, fixed, none"):
        make_controller("fast", max_batch_size=8, target_s=0.01)
    with pytest.raises(ValueError, match="backoff"):
        AIMDBatcher(0.01, backoff=1.5)
    with pytest.raises(ValueError, match="max_batch_size"):
        FixedBatcher(0)


def test_a_few_descheduled_batches_do_not_move_the_fitted_line() -> None:
    """On a busy machine a batch can take ten times its usual latency; the line ignores those,
    the tail margin keeps them."""
    clean, noisy = LatencyModel(), LatencyModel()
    for i in range(256):
        n = 1 + i % 32
        lat = 0.001 + 0.0001 * n
        clean.observe(n, lat)
        noisy.observe(n, lat * (10.0 if i % 16 == 3 else 1.0))  # 6% of batches 10x slower
    for n in (1, 16, 32):
        assert noisy.mean_s(n) == pytest.approx(clean.mean_s(n), rel=0.02)
    assert noisy.predict_s(16) > 3 * clean.mean_s(16)  # the p99 covers the slow ones
    assert noisy.outliers > 0 and noisy.to_dict()["outliers"] == noisy.outliers
    assert noisy.fast_s(16) <= noisy.mean_s(16)


def test_a_lasting_slowdown_is_learned() -> None:
    """Outliers are the few: when most batches get slower, the line follows."""
    model = LatencyModel(window=64)
    for _ in range(64):
        model.observe(8, 0.002)
    for _ in range(64):
        model.observe(8, 0.006)
    assert model.mean_s(8) == pytest.approx(0.006, rel=0.05)


def test_aimd_calibrates_from_a_latency_fit_then_adapts() -> None:
    model = LatencyModel()
    for n in (1, 64, 1, 64):
        model.observe(n, 0.001 + 0.0002 * n)  # batch 64 takes 13.8 ms
    ctrl = AIMDBatcher(target_s=0.010, max_batch_size=64)
    ctrl.calibrate(model)  # 1 ms + 0.2 ms * n <= 10 ms  ->  45
    assert ctrl.batch_size() == 45
    ctrl.observe(45, 0.012)
    assert ctrl.batch_size() == 40  # AIMD from there
    ctrl.calibrate(LatencyModel())  # nothing measured: unchanged
    assert ctrl.batch_size() == 40
