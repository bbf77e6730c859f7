"""Model selection driven by feedback: Exp3 picks one model, Exp4 weighs an ensemble.

Clipper (Crankshaw et al., "Clipper: A Low-Latency Online Prediction Serving System", NSDI 2017,
Sec. 5) puts a selection layer above the models of an application. Feedback (the true label of
an earlier query, from ``POST /{app}/feedback``) turns into a reward or loss per model, and the
policy shifts traffic or ensemble weight towards the models that are right more often.

- :class:`Exp3` (Clipper Sec. 5.2.1; Auer, Cesa-Bianchi, Freund and Schapire, "The Nonstochastic
  Multiarmed Bandit Problem", SIAM J. Computing 2002, Sec. 3, Fig. 1): one model per query,
  chosen at random from weights learned with importance-weighted rewards. Only the chosen
  model's reward is seen, so the cost per query is one model evaluation.
- :class:`Exp4` (in :mod:`~mlcycle.serve.online.ensemble`, re-exported here; Clipper Sec. 5.2.2;
  Auer et al. 2002, Sec. 7): every model answers, the answers are combined with learned
  weights, and each model's weight shrinks multiplicatively with its own loss. With the label
  known and every model's output in hand the feedback is complete, so the update is the
  full-information multiplicative-weights rule that Clipper's Exp4 applies.
- Straggler mitigation (Clipper Sec. 5.2.3): :meth:`Exp4.combine` accepts the outputs of any
  subset of the models (those that returned before the deadline) and lowers the confidence it
  reports by the weight that is missing. With no output at all it returns ``(None, 0.0)`` and
  the server answers with the application's default.

Outputs a model may return: a sequence of class probabilities (list, tuple or 1-D numpy array;
the label is the argmax) or a scalar label (int, str, bool, ...). The classes are pure Python,
hold a lock so feedback and queries may come from different threads, pickle, and round-trip
through JSON with ``to_dict`` / ``from_dict``.
"""

from __future__ import annotations

import random
from collections.abc import Mapping, Sequence
from typing import Any

from mlcycle.serve.online._weights import (
    LogWeights,
    _add_log_weight,
    _check_models,
    _check_unit,
    _normalized,
    probability_loss,
    zero_one_loss,
)
from mlcycle.serve.online.ensemble import Exp4, _restore_exp4  # noqa: F401 - old pickles

__all__ = ["Exp3", "Exp4", "probability_loss", "zero_one_loss"]


# --------------------------------------------------------------------------- Exp3


class Exp3(LogWeights):
    """Exp3 bandit that picks one model per query (Clipper Sec. 5.2.1; Auer et al. 2002, Fig. 1).

    Each model ``i`` has a weight ``w_i``. A query goes to model ``i`` with probability

        p_i = (1 - gamma) * w_i / sum_j w_j + gamma / K,

    where ``K`` is the number of models, so every model keeps at least ``gamma / K`` of the
    traffic and a model that improves is noticed. Feedback on a query answered by model ``i``
    gives a reward ``r`` in [0, 1] (1 = correct); the reward is divided by the probability the
    model had when it was chosen, which keeps the estimate of every model's reward unbiased
    although only the chosen model is observed, and

        w_i <- w_i * exp(gamma * (r / p_i) / K).

    Weights are stored as logarithms and shifted so the largest is 0, so they never overflow.
    Against the best single model in hindsight, the expected regret is O(sqrt(T K ln K)) after
    ``T`` rounds with ``gamma`` tuned to ``T`` (Auer et al. 2002, Cor. 3.2); the default is a
    fixed exploration rate, since the server runs indefinitely.

    Models may be added and removed at runtime (:meth:`add_model`, :meth:`remove_model`), as
    when a new version is deployed or a model is unlinked from its application.

    Args:
        models: Names of the models to choose among (unique, at least one).
        gamma: Exploration rate in (0, 1]: the share of traffic spread uniformly over all
            models, and the learning rate of the weights.
        seed: Seed of the random generator that draws the model; None seeds from the OS.

    Example:
        >>> policy = Exp3(["small", "large"], gamma=0.1, seed=0)
        >>> model = policy.select()
        >>> policy.update(model, 1.0)  # the model's answer was right
    """

    def __init__(self, models: Sequence[str], *, gamma: float = 0.1, seed: int | None = None):
        names = _check_models(models, "Exp3")
        if isinstance(gamma, bool) or not isinstance(gamma, (int, float)):
            raise TypeError(f"gamma must be a float in (0, 1], got {type(gamma).__name__}")
        if not 0.0 < gamma <= 1.0:
            raise ValueError(
                f"gamma must lie in (0, 1], got {gamma!r}; 0.05 to 0.2 is typical (gamma is the "
                f"share of queries spread evenly over all models)"
            )
        self.gamma = float(gamma)
        self.seed = seed
        self._start(names)
        self._rng = random.Random(seed)
        self._probs: dict[str, float] | None = None  # cache, cleared by every change

    # ---- inspection
    def weights(self) -> dict[str, float]:
        """The learned weights ``w_i / sum_j w_j`` (they sum to 1, no exploration mixed in)."""
        with self._lock:
            return _normalized(self._log_w)

    def probabilities(self) -> dict[str, float]:
        """The selection probabilities ``p_i`` (they sum to 1 and each is at least gamma / K)."""
        with self._lock:
            return dict(self._probabilities())

    def probability(self, model: str) -> float:
        """The probability that :meth:`select` returns ``model`` now.

        Servers that answer feedback long after the query should record this at selection time
        and pass it to :meth:`update` (see there).
        """
        with self._lock:
            self._check_known(model)
            return self._probabilities()[model]

    def _probabilities(self) -> dict[str, float]:
        if self._probs is None:
            k = len(self._log_w)
            self._probs = {
                m: (1.0 - self.gamma) * w + self.gamma / k
                for m, w in _normalized(self._log_w).items()
            }
        return self._probs

    def _check_known(self, model: str) -> None:
        if model not in self._log_w:
            raise ValueError(
                f"unknown model {model!r}; Exp3 knows {self.models}. Add it with add_model, or "
                f"drop feedback for models that were removed (check `model in policy`)"
            )

    # ---- the loop
    def select(self) -> str:
        """Draw the model that answers the next query, with the probabilities ``p_i``.

        Returns:
            A model name.

        Raises:
            RuntimeError: If every model was removed.
        """
        with self._lock:
            if not self._log_w:
                raise RuntimeError("Exp3 has no models left; add_model one before select()")
            u = self._rng.random()
            cum = 0.0
            last = ""
            for model, p in self._probabilities().items():
                cum += p
                last = model
                if u < cum:
                    return model
            return last  # u landed in the rounding gap at the top

    def update(self, model: str, reward: float, *, probability: float | None = None) -> None:
        """Apply the feedback for one query answered by ``model`` (Auer et al. 2002, Fig. 1).

        Args:
            model: The model that answered (what :meth:`select` returned).
            reward: The reward in [0, 1]; 1 when the answer was correct. Scale other rewards into
                [0, 1] first, e.g. ``1 - loss / max_loss``.
            probability: The probability ``model`` had when it was selected (from
                :meth:`probability` at that time). None uses the current probability, which is
                the same when feedback arrives before the next update.

        Raises:
            ValueError: If the model is unknown or the reward or probability is outside its range.
            TypeError: If the reward is not a number.
        """
        r = _check_unit(reward, "reward", "scale it into [0, 1], e.g. reward = 1 - loss / max_loss")
        with self._lock:
            self._check_known(model)
            if probability is None:
                p = self._probabilities()[model]
            else:
                p = _check_unit(probability, "probability", "pass policy.probability(model)")
                if p == 0.0:
                    raise ValueError("probability must be > 0: a selected model had p_i >= gamma/K")
            self._log_w[model] += self.gamma * (r / p) / len(self._log_w)
            self._shift()
            self._probs = None
            self.rounds_ += 1

    # ---- runtime changes
    def add_model(self, model: str, *, share: float | None = None) -> None:
        """Add a model at runtime (a new deployment linked to the application).

        Args:
            model: The new model's name.
            share: Its fraction of the total weight right after adding, in (0, 1). None gives it
                the weight of the current best model: a new version gets a fair trial, and the
                bandit moves traffic away again if it is worse.

        Raises:
            ValueError: If the name is taken or ``share`` is outside (0, 1).
        """
        with self._lock:
            _add_log_weight(self._log_w, model, share, "Exp3")
            self._probs = None

    def remove_model(self, model: str) -> None:
        """Remove a model at runtime; the others keep their weights (renormalised)."""
        with self._lock:
            self._check_known(model)
            del self._log_w[model]
            self._probs = None

    # ---- state
    def to_dict(self) -> dict[str, Any]:
        """The full state as JSON-serialisable data, random generator included."""
        with self._lock:
            version, internal, gauss = self._rng.getstate()
            return {
                "policy": "exp3",
                "gamma": self.gamma,
                "seed": self.seed,
                "log_weights": dict(self._log_w),
                "rounds": self.rounds_,
                "rng_state": [version, list(internal), gauss],
            }

    @classmethod
    def from_dict(cls, state: Mapping[str, Any]) -> Exp3:
        """Rebuild a policy from :meth:`to_dict` output; it continues the same random stream."""
        if state.get("policy") != "exp3":
            raise ValueError(f"not an Exp3 state (policy={state.get('policy')!r}); use to_dict()")
        models = list(state["log_weights"]) or ["_placeholder"]  # all may have been removed
        self = cls(models, gamma=state["gamma"], seed=state.get("seed"))
        self._restore(state)
        if state.get("rng_state") is not None:
            version, internal, gauss = state["rng_state"]
            self._rng.setstate((version, tuple(internal), gauss))
        return self

    def __reduce__(self) -> tuple[Any, ...]:
        return (type(self).from_dict, (self.to_dict(),))

    def __repr__(self) -> str:
        probs = ", ".join(f"{m}={p:.3f}" for m, p in self.probabilities().items())
        return f"Exp3(gamma={self.gamma}, rounds={self.rounds_}, p=[{probs}])"
