"""IDK cascade routing (Wang et al., UAI 2018): decisions, offline evaluation, real data."""

from __future__ import annotations

import pytest

from mlcycle.serve.online.cascade import CascadeDecision, IDKCascade, max_probability


def test_stage_answers_when_confident_and_defers_otherwise():
    cascade = IDKCascade(["small", "medium", "large"], thresholds=[0.9, 0.7])
    assert cascade.first() == "small"

    sure = cascade.decide(0, [0.95, 0.05])
    assert sure == CascadeDecision(
        stage=0,
        model="small",
        answered=True,
        output=[0.95, 0.05],
        confidence=0.95,
        confident=True,
        next_model=None,
    )
    assert sure.action == "answer"

    unsure = cascade.decide(0, [0.6, 0.4])
    assert (unsure.action, unsure.next_model, unsure.confidence) == ("defer", "medium", 0.6)
    assert cascade.decide("medium", [0.3, 0.7]).answered  # 0.7 reaches the threshold exactly
    assert cascade.decide("medium", [0.4, 0.6]).next_model == "large"

    last = cascade.decide(2, [0.5, 0.5])  # the last stage always answers
    assert last.answered and last.confident and last.next_model is None


def test_threshold_for_the_last_stage_only_flags_unsure_answers():
    cascade = IDKCascade(["small", "large"], thresholds=[0.9, 0.8])
    low = cascade.decide(1, [0.6, 0.4])
    assert low.answered and not low.confident
    assert cascade.decide(1, [0.85, 0.15]).confident


def test_missing_output_defers_and_the_last_stage_answers_none():
    cascade = IDKCascade(["small", "large"], thresholds=[0.5])
    missed = cascade.decide(0, None)  # the small model failed or was late
    assert (missed.action, missed.next_model, missed.confidence) == ("defer", "large", 0.0)
    final = cascade.decide(1, None)
    assert final.answered and final.output is None and not final.confident


def test_user_confidence_function():
    def margin(output):  # gap between the two largest probabilities
        top, second = sorted(output, reverse=True)[:2]
        return top - second

    cascade = IDKCascade(["small", "large"], thresholds=[0.5], confidence=margin)
    assert cascade.decide(0, [0.7, 0.3, 0.0]).next_model == "large"  # margin 0.4
    assert cascade.decide(0, [0.8, 0.1, 0.1]).answered  # margin 0.7

    labels_only = IDKCascade(["rule", "model"], [0.5], confidence=lambda out: 1.0 * (out != "?"))
    assert labels_only.decide(0, "cat").answered
    assert labels_only.decide(0, "?").next_model == "model"


def test_evaluate_matches_a_hand_computation():
    cascade = IDKCascade(["small", "large"], thresholds=[0.8])
    small = [[0.9, 0.1], [0.6, 0.4], [0.2, 0.8], [0.3, 0.7]]
    large = [[0.7, 0.3], [0.1, 0.9], [0.4, 0.6], [0.2, 0.8]]
    labels = [0, 1, 0, 1]
    # Example 0: small answers 0 (0.9 >= 0.8), right, cost 1.
    # Example 1: small defers (0.6); large answers 1, right, cost 1 + 10.
    # Example 2: small answers 1 (0.8 >= 0.8), wrong, cost 1.
    # Example 3: small defers (0.7); large answers 1, right, cost 11.
    result = cascade.evaluate([small, large], labels, costs=[1.0, 10.0])
    assert result["accuracy"] == pytest.approx(3 / 4)
    assert result["mean_cost"] == pytest.approx((1 + 11 + 1 + 11) / 4)
    assert result["cost_vs_last"] == pytest.approx(6 / 10)
    assert result["stage_share"] == pytest.approx([0.5, 0.5])
    assert result["stage_accuracy"] == pytest.approx([0.5, 1.0])
    assert result["stage_accuracy_alone"] == pytest.approx([0.5, 0.75])  # large misses ex. 2
    assert result["n"] == 4

    unit = cascade.evaluate([small, large], labels)  # no costs: mean number of stages run
    assert unit["mean_cost"] == pytest.approx(1.5)

    never = IDKCascade(["small", "large"], thresholds=[1.0]).evaluate([small, large], labels)
    assert never["stage_share"] == [0.0, 1.0] and never["stage_accuracy"][0] is None


def test_evaluate_three_stages():
    cascade = IDKCascade(["a", "b", "c"], thresholds=[0.9, 0.9])
    outputs = [
        [[0.95, 0.05], [0.5, 0.5], [0.5, 0.5]],
        [[0.5, 0.5], [0.05, 0.95], [0.6, 0.4]],
        [[0.0, 1.0], [0.0, 1.0], [1.0, 0.0]],
    ]
    result = cascade.evaluate(outputs, [0, 1, 0], costs=[1, 2, 4])
    assert result["stage_share"] == pytest.approx([1 / 3, 1 / 3, 1 / 3])
    assert result["mean_cost"] == pytest.approx((1 + 3 + 7) / 3)
    assert result["accuracy"] == 1.0


def test_input_errors_are_clear():
    with pytest.raises(ValueError, match="3 stages need 2 thresholds .* or 3, got 1"):
        IDKCascade(["a", "b", "c"], [0.5])
    with pytest.raises(ValueError, match=r"thresholds\[1\] must lie in \[0, 1\]"):
        IDKCascade(["a", "b", "c"], [0.5, 1.5])
    with pytest.raises(ValueError, match=r"thresholds\[0\] must lie in \[0, 1\]"):
        IDKCascade(["a", "b"], [float("nan")])
    with pytest.raises(TypeError, match=r"thresholds\[0\] must be a float"):
        IDKCascade(["a", "b"], ["0.5"])
    with pytest.raises(ValueError, match="at least one stage"):
        IDKCascade([], [])
    with pytest.raises(ValueError, match="unique"):
        IDKCascade(["a", "a"], [0.5])
    with pytest.raises(TypeError, match="list of model names"):
        IDKCascade("a", [])

    cascade = IDKCascade(["a", "b"], [0.5])
    with pytest.raises(ValueError, match="unknown model 'z'"):
        cascade.decide("z", [1.0])
    with pytest.raises(ValueError, match="out of range"):
        cascade.decide(2, [1.0])
    with pytest.raises(TypeError, match="confidence=fn"):
        cascade.decide(0, 3)  # a label, not class probabilities
    with pytest.raises(ValueError, match="outside \\[0, 1\\].*softmax"):
        cascade.decide(0, [3.0, -2.0])
    with pytest.raises(ValueError, match="one list of outputs per stage"):
        cascade.evaluate([[[1.0]]], [0])
    with pytest.raises(ValueError, match="has 1 outputs for 2 labels"):
        cascade.evaluate([[[1.0]], [[1.0]]], [0, 0])
    with pytest.raises(ValueError, match="one per stage"):
        cascade.evaluate([[[1.0]], [[1.0]]], [0], costs=[1.0])
    with pytest.raises(ValueError, match=">= 0"):
        cascade.evaluate([[[1.0]], [[1.0]]], [0], costs=[1.0, -1.0])
    with pytest.raises(ValueError, match="empty"):
        max_probability([])


def test_single_stage_cascade_always_answers():
    cascade = IDKCascade(["only"], thresholds=[])
    assert cascade.decide(0, [0.1, 0.9]).answered
    assert len(cascade) == 1


def test_cascade_on_digits_nears_the_accurate_model_at_a_fraction_of_its_cost():
    """A cheap model (logistic regression on 4x4-pooled digits, 16 x 10 multiply-adds) in front
    of an accurate one (5-nearest-neighbours on all 64 pixels, 64 multiply-adds per training
    image) keeps the accurate model's accuracy while most queries never reach it."""
    np = pytest.importorskip("numpy")
    datasets = pytest.importorskip("sklearn.datasets")
    from sklearn.linear_model import LogisticRegression
    from sklearn.neighbors import KNeighborsClassifier

    pixels, labels = datasets.load_digits(return_X_y=True)  # (1797, 64), values 0..16
    order = np.random.default_rng(0).permutation(len(labels))
    train, test = order[:1000], order[1000:]
    pooled = pixels.reshape(-1, 4, 2, 4, 2).mean(axis=(2, 4)).reshape(-1, 16)  # (1797, 16)

    cheap = LogisticRegression(solver="newton-cholesky").fit(pooled[train], labels[train])
    accurate = KNeighborsClassifier(n_neighbors=5).fit(pixels[train], labels[train])
    cheap_out = cheap.predict_proba(pooled[test])  # (797, 10)
    accurate_out = accurate.predict_proba(pixels[test])  # (797, 10)
    costs = [16 * 10, len(train) * 64]  # multiply-adds per query

    cascade = IDKCascade(["cheap", "accurate"], thresholds=[0.95])
    result = cascade.evaluate([cheap_out, accurate_out], labels[test], costs=costs)
    cheap_acc, accurate_acc = result["stage_accuracy_alone"]

    assert accurate_acc > cheap_acc + 0.05  # the cheap model alone is not good enough
    assert result["accuracy"] >= accurate_acc - 0.01
    assert result["cost_vs_last"] < 0.4  # most queries stop at the cheap stage
    assert result["stage_share"][0] > 0.6
