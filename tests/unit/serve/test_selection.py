"""Exp3 and Exp4 model selection (Clipper Sec. 5.2): learning, straggler handling, state."""

from __future__ import annotations

import json
import math
import pickle
import random

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from mlcycle.serve.online.selection import Exp3, Exp4, probability_loss, zero_one_loss

# --------------------------------------------------------------------------- Exp3


def _run_exp3(policy: Exp3, means: dict[str, float], rounds: int, seed: int) -> list[float]:
    """Play ``rounds`` Bernoulli-reward rounds; return the regret after each round against
    always playing the best arm (expected rewards, so the curve is smooth)."""
    rng = random.Random(seed)
    best = max(means.values())
    regret, curve = 0.0, []
    for _ in range(rounds):
        model = policy.select()
        policy.update(model, 1.0 if rng.random() < means[model] else 0.0)
        regret += best - means[model]
        curve.append(regret)
    return curve


def test_exp3_concentrates_on_the_best_model():
    means = {"weak": 0.3, "fair": 0.5, "good": 0.8}
    policy = Exp3(list(means), gamma=0.1, seed=1)
    curve = _run_exp3(policy, means, rounds=4000, seed=2)

    probs = policy.probabilities()
    assert max(probs, key=probs.get) == "good"
    assert probs["good"] > 0.85
    uniform_regret = 4000 * (0.8 - sum(means.values()) / 3)  # about 1067
    assert curve[-1] < 0.15 * uniform_regret
    # Once learned, what regret remains is the fixed exploration share gamma (by design: the
    # server runs indefinitely and must notice models that improve).
    exploration_cost = 2000 * 0.1 * (0.8 - sum(means.values()) / 3)  # second half, about 53
    assert curve[-1] - curve[1999] < 1.5 * exploration_cost


def test_exp3_regret_is_sublinear_with_gamma_tuned_to_the_horizon():
    """Auer et al. 2002, Cor. 3.2: gamma = sqrt(K ln K / ((e - 1) T)) gives expected regret at
    most 2 sqrt(e - 1) sqrt(T K ln K), so it grows like sqrt(T), not T."""
    means = {"weak": 0.3, "fair": 0.5, "good": 0.8}
    k = len(means)
    mean_regret = {}
    for rounds in (1000, 8000):
        gamma = math.sqrt(k * math.log(k) / ((math.e - 1) * rounds))
        runs = [
            _run_exp3(Exp3(list(means), gamma=gamma, seed=s), means, rounds, seed=100 + s)[-1]
            for s in range(2)
        ]
        mean_regret[rounds] = sum(runs) / len(runs)
        bound = 2 * math.sqrt(math.e - 1) * math.sqrt(rounds * k * math.log(k))
        assert mean_regret[rounds] < bound
    # 8x the rounds: sqrt growth gives about 2.8x the regret, linear growth 8x.
    assert mean_regret[8000] < 4 * mean_regret[1000]


def test_exp3_follows_a_better_model_deployed_at_runtime():
    means = {"v1": 0.6, "v2": 0.9}
    policy = Exp3(["v1"], gamma=0.1, seed=3)
    _run_exp3(policy, {"v1": 0.6}, rounds=200, seed=4)
    policy.add_model("v2")  # the new version starts with the best model's weight
    assert policy.weights()["v2"] == pytest.approx(0.5)
    _run_exp3(policy, means, rounds=2000, seed=5)
    assert policy.probabilities()["v2"] > 0.8

    policy.remove_model("v1")
    assert policy.models == ["v2"]
    assert {policy.select() for _ in range(50)} == {"v2"}
    assert policy.probabilities() == {"v2": pytest.approx(1.0)}


def test_exp3_importance_weighting_uses_the_probability_at_selection():
    policy = Exp3(["a", "b", "c"], gamma=0.3, seed=0)
    p_a = policy.probability("a")
    assert p_a == pytest.approx(1 / 3)
    policy.update("a", 1.0)
    w = policy.weights()
    # w_a / w_b = exp(gamma * (r / p_a) / K)
    assert w["a"] / w["b"] == pytest.approx(math.exp(0.3 * (1.0 / p_a) / 3))

    # Feedback that arrives late uses the probability recorded when the model was chosen.
    late = Exp3(["a", "b"], gamma=0.2, seed=0)
    late.update("a", 0.5, probability=0.25)
    w = late.weights()
    assert w["a"] / w["b"] == pytest.approx(math.exp(0.2 * (0.5 / 0.25) / 2))


def test_exp3_add_model_with_share_and_seeded_draws():
    policy = Exp3(["a", "b"], gamma=0.1, seed=7)
    policy.add_model("c", share=0.2)
    assert policy.weights()["c"] == pytest.approx(0.2)
    draws = [policy.select() for _ in range(30)]
    again = Exp3(["a", "b"], gamma=0.1, seed=7)
    again.add_model("c", share=0.2)
    assert [again.select() for _ in range(30)] == draws


def test_exp3_state_round_trips_through_json_and_pickle():
    policy = Exp3(["a", "b", "c"], gamma=0.1, seed=11)
    _run_exp3(policy, {"a": 0.2, "b": 0.5, "c": 0.7}, rounds=100, seed=12)
    restored = Exp3.from_dict(json.loads(json.dumps(policy.to_dict())))
    pickled = pickle.loads(pickle.dumps(policy))
    for copy in (restored, pickled):
        assert copy.weights() == pytest.approx(policy.weights())
        assert copy.rounds_ == policy.rounds_ == 100
    # Same random stream: the next draws agree.
    expected = [policy.select() for _ in range(20)]
    assert [restored.select() for _ in range(20)] == expected
    assert [pickled.select() for _ in range(20)] == expected


@pytest.mark.parametrize("reward", [1.5, -0.1, float("nan"), float("inf")])
def test_exp3_rejects_rewards_outside_unit_interval(reward):
    policy = Exp3(["a", "b"])
    with pytest.raises(ValueError, match=r"reward must lie in \[0, 1\].*1 - loss / max_loss"):
        policy.update("a", reward)
    assert policy.rounds_ == 0


def test_exp3_input_errors_are_clear():
    with pytest.raises(TypeError, match="number"):
        Exp3(["a"]).update("a", "1")
    with pytest.raises(ValueError, match="unknown model 'z'"):
        Exp3(["a"]).update("z", 1.0)
    with pytest.raises(ValueError, match=r"gamma must lie in \(0, 1\]"):
        Exp3(["a"], gamma=0.0)
    with pytest.raises(ValueError, match="at least one model"):
        Exp3([])
    with pytest.raises(ValueError, match="unique"):
        Exp3(["a", "a"])
    with pytest.raises(TypeError, match="wrap it in a list"):
        Exp3("a")
    with pytest.raises(ValueError, match="already has a model"):
        Exp3(["a"]).add_model("a")
    with pytest.raises(ValueError, match="share must lie strictly between 0 and 1"):
        Exp3(["a"]).add_model("b", share=1.0)
    empty = Exp3(["a"])
    empty.remove_model("a")
    with pytest.raises(RuntimeError, match="add_model"):
        empty.select()
    assert Exp3.from_dict(empty.to_dict()).models == []


@settings(max_examples=60, deadline=None)
@given(
    gamma=st.floats(0.01, 1.0),
    steps=st.lists(
        st.tuples(st.integers(0, 5), st.floats(0.0, 1.0), st.sampled_from(["update", "add", "rm"])),
        max_size=60,
    ),
)
def test_exp3_probabilities_sum_to_one_and_respect_exploration_floor(gamma, steps):
    policy = Exp3(["m0", "m1"], gamma=gamma, seed=0)
    for index, reward, op in steps:
        name = f"m{index}"
        if op == "add" and name not in policy:
            policy.add_model(name)
        elif op == "rm" and name in policy and len(policy) > 1:
            policy.remove_model(name)
        elif op == "update" and name in policy:
            policy.update(name, reward)
        probs = policy.probabilities()
        k = len(policy)
        assert sum(probs.values()) == pytest.approx(1.0)
        assert min(probs.values()) >= gamma / k * (1 - 1e-9)
        assert policy.select() in probs


# --------------------------------------------------------------------------- Exp4


def _noisy_model(rng: random.Random, label: int, accuracy: float, classes: int) -> list[float]:
    """Class probabilities of a model that puts 0.7 on the true class with chance ``accuracy``,
    else on a random wrong class."""
    if rng.random() < accuracy:
        top = label
    else:
        top = rng.choice([c for c in range(classes) if c != label])
    probs = [0.3 / (classes - 1)] * classes
    probs[top] = 0.7
    return probs


def test_exp4_moves_weight_to_the_accurate_model_and_ensemble_accuracy_follows():
    accuracy = {"good": 0.9, "mid": 0.7, "bad": 0.4}
    ens = Exp4(list(accuracy), eta=0.2)
    rng = random.Random(0)
    hits = {m: 0 for m in accuracy} | {"ensemble": 0}
    rounds = 1500
    for t in range(rounds):
        label = rng.randrange(5)
        outputs = {m: _noisy_model(rng, label, a, 5) for m, a in accuracy.items()}
        combined, confidence = ens.combine(outputs)
        assert 0.0 <= confidence <= 1.0
        if t >= rounds // 3:  # score after a short warm-up
            hits["ensemble"] += max(range(5), key=combined.__getitem__) == label
            for m, out in outputs.items():
                hits[m] += zero_one_loss(out, label) == 0.0
        ens.update(outputs, label)
    scored = rounds - rounds // 3
    acc = {m: h / scored for m, h in hits.items()}

    weights = ens.weights()
    assert weights["good"] > 0.95
    assert weights["good"] > weights["mid"] > weights["bad"]
    assert acc["ensemble"] > acc["bad"] + 0.3
    assert acc["ensemble"] >= acc["good"] - 0.02


def test_combine_with_a_missing_straggler_renormalises_and_lowers_confidence():
    ens = Exp4(["a", "b", "c"])  # uniform weights, 1/3 each
    full = {"a": [0.8, 0.2], "b": [0.6, 0.4], "c": [0.7, 0.3]}
    combined, confidence = ens.combine(full)
    assert combined == pytest.approx([0.7, 0.3])
    assert confidence == pytest.approx(0.7)

    combined, confidence = ens.combine({"a": [0.8, 0.2], "b": [0.6, 0.4]})  # "c" is late
    assert combined == pytest.approx([0.7, 0.3])  # average over the two that answered
    assert confidence == pytest.approx(2 / 3 * 0.7)  # coverage 2/3 times agreement 0.7
    assert ens.coverage(["a", "b"]) == pytest.approx(2 / 3)

    # A failed model (None) counts as missing too.
    assert ens.combine({"a": [0.8, 0.2], "b": None, "c": None}) == (
        pytest.approx([0.8, 0.2]),
        pytest.approx(0.8 / 3),
    )


def test_combine_confidence_falls_when_models_disagree():
    ens = Exp4(["a", "b"])
    _, agree = ens.combine({"a": [0.9, 0.1], "b": [0.9, 0.1]})
    _, disagree = ens.combine({"a": [0.9, 0.1], "b": [0.2, 0.8]})
    assert agree == pytest.approx(0.9)
    assert disagree == pytest.approx(0.55)  # combined [0.55, 0.45]


def test_combine_with_no_outputs_returns_none_for_the_default():
    ens = Exp4(["a", "b"])
    assert ens.combine({}) == (None, 0.0)
    assert ens.combine({"a": None, "b": None}) == (None, 0.0)
    ens.remove_model("a")
    ens.remove_model("b")
    assert ens.combine({}) == (None, 0.0)


def test_combine_scalar_labels_is_a_weighted_vote():
    ens = Exp4(["a", "b", "c"], eta=1.0)
    ens.update({"a": "cat", "b": "dog", "c": "dog"}, label="cat")  # b and c lose weight
    w = ens.weights()
    assert w["a"] == pytest.approx(math.e / (math.e + 2))
    label, confidence = ens.combine({"a": "cat", "b": "dog", "c": "dog"})
    assert label == "cat"
    assert confidence == pytest.approx(w["a"])
    label, confidence = ens.combine({"b": "dog", "c": "dog"})  # "a" straggles
    assert label == "dog"
    assert confidence == pytest.approx(w["b"] + w["c"])


def test_update_charges_missing_models_the_mean_loss_or_a_fixed_loss():
    ens = Exp4(["a", "b", "c"], eta=1.0)
    losses = ens.update({"a": [0.9, 0.1], "b": [0.2, 0.8]}, label=0)  # "c" missing
    assert losses == {"a": 0.0, "b": 1.0}
    w = ens.weights()
    # c is charged the weighted mean loss 0.5 of those that answered: between a and b.
    assert w["a"] / w["c"] == pytest.approx(math.exp(0.5))
    assert w["c"] / w["b"] == pytest.approx(math.exp(0.5))

    strict = Exp4(["a", "b", "c"], eta=1.0, missing_loss=1.0)
    strict.update({"a": [0.9, 0.1], "b": [0.2, 0.8]}, label=0)
    w = strict.weights()
    assert w["c"] == pytest.approx(w["b"])

    assert ens.update({}, label=0) == {}  # nothing answered: nothing learned


def test_probability_loss_and_custom_losses():
    assert probability_loss([0.25, 0.75], 1) == pytest.approx(0.25)
    assert probability_loss("cat", "cat") == 0.0
    ens = Exp4(["a", "b"], eta=1.0, loss="probability")
    ens.update({"a": [0.9, 0.1], "b": [0.6, 0.4]}, label=0)
    w = ens.weights()
    assert w["a"] / w["b"] == pytest.approx(math.exp(0.4 - 0.1))

    def half_loss(output, label):
        return 0.5

    custom = Exp4(["a"], loss=half_loss)
    custom.update({"a": [1.0, 0.0]}, label=0)
    with pytest.raises(ValueError, match="custom loss"):
        Exp4.from_dict(custom.to_dict())
    assert Exp4.from_dict(custom.to_dict(), loss=half_loss).rounds_ == 1

    bad = Exp4(["a"], loss=lambda output, label: 2.0)
    with pytest.raises(ValueError, match=r"loss of model 'a' must lie in \[0, 1\]"):
        bad.update({"a": [1.0, 0.0]}, label=0)


def test_exp4_runtime_models_and_state():
    ens = Exp4(["a", "b"], eta=0.5)
    ens.update({"a": [0.9, 0.1], "b": [0.1, 0.9]}, label=0)
    ens.add_model("c")  # starts at the best model's weight
    w = ens.weights()
    assert w["c"] == pytest.approx(w["a"])
    ens.remove_model("b")
    assert ens.models == ["a", "c"]
    assert sum(ens.weights().values()) == pytest.approx(1.0)

    restored = Exp4.from_dict(json.loads(json.dumps(ens.to_dict())))
    assert restored.weights() == pytest.approx(ens.weights())
    assert pickle.loads(pickle.dumps(ens)).weights() == pytest.approx(ens.weights())


def test_exp4_input_errors_are_clear():
    ens = Exp4(["a", "b"])
    with pytest.raises(ValueError, match="unknown models"):
        ens.combine({"z": [1.0]})
    with pytest.raises(ValueError, match="same classes"):
        ens.combine({"a": [0.5, 0.5], "b": [0.2, 0.3, 0.5]})
    with pytest.raises(ValueError, match="softmax"):
        ens.combine({"a": [2.0, -1.0]})
    with pytest.raises(TypeError, match="mix class probabilities and scalar labels"):
        ens.combine({"a": [0.5, 0.5], "b": 1})
    with pytest.raises(TypeError, match="flat lists of floats"):
        ens.combine({"a": [[0.5, 0.5]], "b": [[0.5, 0.5]]})
    with pytest.raises(TypeError, match="dict"):
        ens.combine([[0.5, 0.5]])
    with pytest.raises(ValueError, match="eta must be a finite number > 0"):
        Exp4(["a"], eta=0.0)
    with pytest.raises(ValueError, match="loss must be one of"):
        Exp4(["a"], loss="hinge")
    with pytest.raises(ValueError, match="class index"):
        probability_loss([0.5, 0.5], 3)


def test_combine_accepts_numpy_outputs():
    np = pytest.importorskip("numpy")
    ens = Exp4(["a", "b"])
    combined, confidence = ens.combine({"a": np.array([0.8, 0.2]), "b": np.array([0.6, 0.4])})
    assert combined == pytest.approx([0.7, 0.3])
    assert confidence == pytest.approx(0.7)
    assert ens.update({"a": np.array([0.8, 0.2])}, label=np.int64(0)) == {"a": 0.0}


_probs = st.lists(st.floats(0.0, 1.0), min_size=3, max_size=3).filter(lambda v: sum(v) > 0)


@settings(max_examples=80, deadline=None)
@given(
    outputs=st.dictionaries(st.sampled_from(["a", "b", "c", "d"]), _probs, max_size=4),
    feedback=st.lists(st.tuples(st.sampled_from(["a", "b", "c", "d"]), st.booleans()), max_size=8),
)
def test_combine_is_safe_for_any_subset(outputs, feedback):
    ens = Exp4(["a", "b", "c", "d"], eta=0.7)
    for model, right in feedback:
        ens.update({model: [1.0, 0.0, 0.0] if right else [0.0, 1.0, 0.0]}, label=0)
    outputs = {m: [p / sum(v) for p in v] for m, v in outputs.items()}  # normalise
    combined, confidence = ens.combine(outputs)
    if not outputs:
        assert (combined, confidence) == (None, 0.0)
        return
    assert sum(combined) == pytest.approx(1.0)
    assert 0.0 <= confidence <= ens.coverage(outputs) + 1e-12
    assert confidence == pytest.approx(ens.coverage(outputs) * max(combined))
