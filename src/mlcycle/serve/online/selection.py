"""Model selection driven by feedback: Exp3 picks one model, Exp4 weighs an ensemble.

Clipper (Crankshaw et al., "Clipper: A Low-Latency Online Prediction Serving System", NSDI 2017,
Sec. 5) puts a selection layer above the models of an application. Feedback (the true label of
an earlier query, from ``POST /{app}/feedback``) turns into a reward or loss per model, and the
policy shifts traffic or ensemble weight towards the models that are right more often.

- :class:`Exp3` (Clipper Sec. 5.2.1; Auer, Cesa-Bianchi, Freund and Schapire, "The Nonstochastic
  Multiarmed Bandit Problem", SIAM J. Computing 2002, Sec. 3, Fig. 1): one model per query,
  chosen at random from weights learned with importance-weighted rewards. Only the chosen
  model's reward is seen, so the cost per query is one model evaluation.
- :class:`Exp4` (Clipper Sec. 5.2.2; Auer et al. 2002, Sec. 7): every model answers, the answers
  are combined with learned weights, and each model's weight shrinks multiplicatively with its
  own loss. With the label known and every model's output in hand the feedback is complete, so
  the update is the full-information multiplicative-weights rule that Clipper's Exp4 applies.
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

import math
import random
import threading
from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import Any

__all__ = ["Exp3", "Exp4", "probability_loss", "zero_one_loss"]

Loss = Callable[[Any, Any], float]


# --------------------------------------------------------------------------- outputs and losses


def _scores(output: Any) -> list[float] | None:
    """Class probabilities of an output as a list, or None when the output is a scalar label."""
    if hasattr(output, "tolist"):  # numpy arrays and numpy scalars
        output = output.tolist()
    if isinstance(output, (str, bytes)) or not isinstance(output, Sequence):
        return None
    return list(output)


def _argmax(values: Sequence[float]) -> int:
    best = 0
    for i in range(1, len(values)):
        if values[i] > values[best]:
            best = i
    return best


def _label(output: Any) -> Any:
    """The label an output stands for: the argmax of class probabilities, else the output."""
    scores = _scores(output)
    if scores is None:
        return output.item() if hasattr(output, "item") else output
    if not scores:
        raise ValueError("an output of class probabilities is empty; return one score per class")
    return _argmax(scores)


def zero_one_loss(output: Any, label: Any) -> float:
    """0.0 when the output's label (argmax of its class probabilities) equals ``label``, else 1.0.

    Args:
        output: Class probabilities or a scalar label.
        label: The true label (a class index when outputs are probabilities).

    Returns:
        The loss in {0.0, 1.0}.
    """
    return 0.0 if _label(output) == label else 1.0


def probability_loss(output: Any, label: Any) -> float:
    """One minus the probability the output gave to the true class, in [0, 1].

    Smoother than :func:`zero_one_loss`: a model that was nearly right loses little. For a
    scalar-label output it equals the zero-one loss.

    Args:
        output: Class probabilities or a scalar label.
        label: The true class index (an int in ``range(len(output))`` for probabilities).

    Returns:
        The loss in [0, 1].

    Raises:
        ValueError: If ``label`` is not a class index of ``output``.
    """
    scores = _scores(output)
    if scores is None:
        return zero_one_loss(output, label)
    if isinstance(label, bool) or not isinstance(label, int) or not 0 <= label < len(scores):
        raise ValueError(
            f"probability_loss needs the label as a class index in [0, {len(scores)}), got "
            f"{label!r}; map labels to indices or use loss='zero_one'"
        )
    return min(1.0, max(0.0, 1.0 - float(scores[label])))


_LOSSES: dict[str, Loss] = {"zero_one": zero_one_loss, "probability": probability_loss}


# --------------------------------------------------------------------------- shared checks


def _check_models(models: Iterable[str], owner: str) -> list[str]:
    if isinstance(models, str):
        raise TypeError(
            f"{owner} models must be a sequence of model names, got the string {models!r}; "
            f"wrap it in a list: [{models!r}]"
        )
    names = list(models)
    if not names:
        raise ValueError(f"{owner} needs at least one model name, e.g. {owner}(['a', 'b'])")
    for name in names:
        _check_name(name, owner)
    if len(set(names)) != len(names):
        dupes = sorted({n for n in names if names.count(n) > 1})
        raise ValueError(f"{owner} model names must be unique; {dupes} appear more than once")
    return names


def _check_name(name: Any, owner: str) -> None:
    if not isinstance(name, str) or not name:
        raise TypeError(f"{owner} model names must be non-empty strings, got {name!r}")


def _check_unit(value: Any, field: str, fix: str) -> float:
    """A finite float in [0, 1] (bools count as 0/1), else ValueError/TypeError naming ``field``."""
    if not isinstance(value, (int, float)) and not hasattr(value, "__float__"):
        raise TypeError(f"{field} must be a number in [0, 1], got {type(value).__name__}; {fix}")
    x = float(value)
    if not (0.0 <= x <= 1.0):  # also rejects nan
        raise ValueError(f"{field} must lie in [0, 1], got {value!r}; {fix}")
    return x


def _check_share(share: float | None) -> float | None:
    if share is None:
        return None
    x = float(share)
    if not 0.0 < x < 1.0:
        raise ValueError(
            f"share must lie strictly between 0 and 1 (the new model's fraction of the total "
            f"weight), got {share!r}; pass share=None to start it at the best model's weight"
        )
    return x


def _logsumexp(values: Iterable[float]) -> float:
    vals = list(values)
    top = max(vals)
    return top + math.log(sum(math.exp(v - top) for v in vals))


def _add_log_weight(log_w: dict[str, float], name: str, share: float | None, owner: str) -> None:
    """Insert ``name`` with the log-weight of the current best model, or so that it holds
    ``share`` of the total weight."""
    _check_name(name, owner)
    if name in log_w:
        raise ValueError(f"{owner} already has a model named {name!r}; remove_model it first")
    share = _check_share(share)
    if not log_w:
        log_w[name] = 0.0
    elif share is None:
        log_w[name] = max(log_w.values())
    else:
        log_w[name] = _logsumexp(log_w.values()) + math.log(share / (1.0 - share))


def _normalized(log_w: Mapping[str, float]) -> dict[str, float]:
    if not log_w:
        return {}
    top = max(log_w.values())
    raw = {m: math.exp(v - top) for m, v in log_w.items()}
    total = sum(raw.values())
    return {m: w / total for m, w in raw.items()}


# --------------------------------------------------------------------------- Exp3


class Exp3:
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
        self._log_w: dict[str, float] = dict.fromkeys(names, 0.0)
        self._rng = random.Random(seed)
        self._probs: dict[str, float] | None = None  # cache, cleared by every change
        self._lock = threading.Lock()
        self.rounds_ = 0  # number of updates applied

    # ---- inspection
    @property
    def models(self) -> list[str]:
        """The model names, in the order they were added."""
        return list(self._log_w)

    def __contains__(self, model: object) -> bool:
        return model in self._log_w

    def __len__(self) -> int:
        return len(self._log_w)

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
            top = max(self._log_w.values())
            for m in self._log_w:
                self._log_w[m] -= top
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
        log_w = dict(state["log_weights"])
        models = list(log_w) or ["_placeholder"]  # every model may have been removed
        self = cls(models, gamma=state["gamma"], seed=state.get("seed"))
        self._log_w = {m: float(v) for m, v in log_w.items()}
        self.rounds_ = int(state.get("rounds", 0))
        if state.get("rng_state") is not None:
            version, internal, gauss = state["rng_state"]
            self._rng.setstate((version, tuple(internal), gauss))
        return self

    def __reduce__(self) -> tuple[Any, ...]:
        return (type(self).from_dict, (self.to_dict(),))

    def __repr__(self) -> str:
        probs = ", ".join(f"{m}={p:.3f}" for m, p in self.probabilities().items())
        return f"Exp3(gamma={self.gamma}, rounds={self.rounds_}, p=[{probs}])"


# --------------------------------------------------------------------------- Exp4


class Exp4:
    """Weighted ensemble whose weights follow each model's loss (Clipper Sec. 5.2.2).

    Every model answers each query; :meth:`combine` merges the answers with the normalised
    weights ``w_i``. Feedback with the true label gives every model that answered its own loss
    ``l_i`` in [0, 1], and

        w_i <- w_i * exp(-eta * l_i),

    so weight flows to the models that are right. Because the label reveals every answering
    model's loss, this is the full-information exponential-weights update Clipper uses for its
    Exp4 ensemble (Auer et al. 2002, Sec. 7 give the bandit variant).

    Combination and confidence, for the set ``A`` of models whose output is present (not
    missing and not None), with ``W(S) = sum_{i in S} w_i`` and weights normalised over all
    models (``W(all) = 1``):

    - class probabilities: ``combined[c] = sum_{i in A} w_i * p_i[c] / W(A)``; the answer's label
      is ``y = argmax_c combined[c]``;
    - scalar labels: a weighted vote, ``y`` is the label with the most weight;
    - ``confidence = W(A) * s(y)``, where ``s(y)`` is ``combined[y]`` for probabilities and the
      weight share of ``A`` that voted for ``y`` for labels. It is the weight that answered
      (coverage ``W(A)``) times how much that weight backs the answer (agreement), in [0, 1].
      It falls when a straggler's weight is missing and when models disagree or are unsure.

    Args:
        models: Names of the ensemble's models (unique, at least one).
        eta: Learning rate > 0; after ``n`` more mistakes a model's weight is ``exp(-eta * n)``
            times that of an otherwise equal model.
        loss: ``"zero_one"`` (default: 1 when the model's label is wrong), ``"probability"``
            (1 - the probability given to the true class) or a function ``(output, label) ->
            float in [0, 1]``.
        missing_loss: The loss charged in :meth:`update` to models whose output is missing.
            None (default) charges the weighted mean loss of the models that answered, which
            leaves a missing model's share about unchanged; 1.0 penalises stragglers.

    Example:
        >>> ens = Exp4(["a", "b"], eta=0.5)
        >>> ens.combine({"a": [0.9, 0.1]})  # "b" missed the deadline: half the weight is missing
        ([0.9, 0.1], 0.45)
        >>> ens.update({"a": [0.9, 0.1], "b": [0.2, 0.8]}, label=0)  # "b" was wrong
        {'a': 0.0, 'b': 1.0}
    """

    def __init__(
        self,
        models: Sequence[str],
        *,
        eta: float = 0.1,
        loss: str | Loss = "zero_one",
        missing_loss: float | None = None,
    ):
        names = _check_models(models, "Exp4")
        if isinstance(eta, bool) or not isinstance(eta, (int, float)):
            raise TypeError(f"eta must be a positive float, got {type(eta).__name__}")
        if not (eta > 0.0 and math.isfinite(eta)):
            raise ValueError(f"eta must be a finite number > 0, got {eta!r}; 0.1 to 1 is typical")
        if isinstance(loss, str):
            if loss not in _LOSSES:
                raise ValueError(
                    f"loss must be one of {sorted(_LOSSES)} or a function (output, label) -> "
                    f"float in [0, 1], got {loss!r}"
                )
            self._loss_fn, self._loss_name = _LOSSES[loss], loss
        elif callable(loss):
            self._loss_fn, self._loss_name = loss, "custom"
        else:
            raise TypeError(f"loss must be a string or a function, got {type(loss).__name__}")
        if missing_loss is not None:
            missing_loss = _check_unit(missing_loss, "missing_loss", "or None to charge the mean")
        self.eta = float(eta)
        self.missing_loss = missing_loss
        self._log_w: dict[str, float] = dict.fromkeys(names, 0.0)
        self._w: dict[str, float] | None = None  # cache of normalised weights
        self._lock = threading.Lock()
        self.rounds_ = 0

    # ---- inspection
    @property
    def models(self) -> list[str]:
        """The model names, in the order they were added."""
        return list(self._log_w)

    def __contains__(self, model: object) -> bool:
        return model in self._log_w

    def __len__(self) -> int:
        return len(self._log_w)

    def weights(self) -> dict[str, float]:
        """The ensemble weights, normalised to sum to 1."""
        with self._lock:
            return dict(self._weights())

    def _weights(self) -> dict[str, float]:
        if self._w is None:
            self._w = _normalized(self._log_w)
        return self._w

    def coverage(self, models: Iterable[str]) -> float:
        """The weight share ``W(A)`` of the given models, in [0, 1].

        A server may answer before the deadline once the models that have returned cover
        enough weight; the confidence of :meth:`combine` is at most this value.
        """
        with self._lock:
            w = self._weights()
            return min(1.0, sum(w[m] for m in set(models) if m in w))

    def _present(self, outputs: Mapping[str, Any]) -> list[tuple[str, Any]]:
        if not isinstance(outputs, Mapping):
            raise TypeError(
                f"outputs must be a dict model name -> output, got {type(outputs).__name__}"
            )
        unknown = [m for m in outputs if m not in self._log_w]
        if unknown:
            raise ValueError(
                f"outputs name unknown models {unknown}; the ensemble has {self.models}. "
                f"add_model them, or leave out outputs of removed models"
            )
        return [(m, out) for m, out in outputs.items() if out is not None]

    # ---- combine
    def combine(self, outputs: Mapping[str, Any]) -> tuple[Any, float]:
        """Merge the outputs of the models that answered in time (any subset, even none).

        Args:
            outputs: Model name -> output, for the models that returned before the deadline.
                Models left out, or mapped to None (failed), count as missing.

        Returns:
            ``(combined, confidence)``: the combined class probabilities (a list of floats) or
            the voted label, and the confidence in [0, 1] defined in the class docstring.
            ``(None, 0.0)`` when no output is present; the server then answers with the default.

        Raises:
            ValueError: On unknown models, probability lists of different lengths or values
                outside [0, 1].
            TypeError: If some outputs are probability lists and others scalar labels.
        """
        with self._lock:
            present = self._present(outputs)
            if not present:
                return None, 0.0
            log_w = [self._log_w[m] for m, _ in present]
            top = max(log_w)
            rel = [math.exp(v - top) for v in log_w]  # relative weights within A, no underflow
            total_rel = sum(rel)
            mix = [r / total_rel for r in rel]
            coverage = min(1.0, math.exp(_logsumexp(log_w) - _logsumexp(self._log_w.values())))

        scores = [_scores(out) for _, out in present]
        if all(s is None for s in scores):
            votes: dict[Any, float] = {}
            for (_, out), share in zip(present, mix, strict=True):
                label = _label(out)
                votes[label] = votes.get(label, 0.0) + share
            answer = max(votes, key=votes.__getitem__)  # first of the tied labels
            return answer, min(1.0, coverage * votes[answer])
        if any(s is None for s in scores):
            kinds = {
                m: ("labels" if s is None else "probabilities")
                for (m, _), s in zip(present, scores, strict=True)
            }
            raise TypeError(
                f"outputs mix class probabilities and scalar labels ({kinds}); make every model "
                f"return the same kind"
            )
        n_classes = len(scores[0])
        combined = [0.0] * n_classes
        for (model, _), probs, share in zip(present, scores, mix, strict=True):
            if len(probs) != n_classes:
                raise ValueError(
                    f"model {model!r} returned {len(probs)} class probabilities, others "
                    f"{n_classes}; every model of an ensemble must score the same classes"
                )
            for c, raw in enumerate(probs):
                try:
                    p = float(raw)
                except (TypeError, ValueError):
                    raise TypeError(
                        f"model {model!r} returned {raw!r} as a class probability; outputs must "
                        f"be flat lists of floats (one per class) or scalar labels"
                    ) from None
                if not 0.0 <= p <= 1.0:
                    raise ValueError(
                        f"model {model!r} returned class probability {p!r} outside [0, 1]; "
                        f"apply a softmax to logits before returning them"
                    )
                combined[c] += share * p
        if n_classes == 0:
            raise ValueError("outputs hold empty class-probability lists; return one per class")
        answer = _argmax(combined)
        return combined, min(1.0, max(0.0, coverage * combined[answer]))

    # ---- feedback
    def update(self, outputs: Mapping[str, Any], label: Any) -> dict[str, float]:
        """Apply feedback: shrink each model's weight by ``exp(-eta * loss)``.

        Args:
            outputs: Model name -> output the model gave for the query (missing or None for
                models that did not answer; they are charged ``missing_loss``).
            label: The true label (a class index when outputs are class probabilities).

        Returns:
            The loss charged to each model that answered.

        Raises:
            ValueError: On unknown models or a loss function returning a value outside [0, 1].
        """
        with self._lock:
            present = self._present(outputs)
        losses: dict[str, float] = {}
        for model, out in present:
            loss = self._loss_fn(out, label)
            losses[model] = _check_unit(
                loss, f"loss of model {model!r}", "the loss function must return values in [0, 1]"
            )
        if not losses:
            return losses
        with self._lock:
            w = self._weights()
            if self.missing_loss is not None:
                charge = self.missing_loss
            else:
                mass = sum(w[m] for m in losses)
                if mass > 0.0:
                    charge = sum(w[m] * loss for m, loss in losses.items()) / mass
                else:
                    charge = sum(losses.values()) / len(losses)
            for model in self._log_w:
                self._log_w[model] -= self.eta * losses.get(model, charge)
            top = max(self._log_w.values())
            for model in self._log_w:
                self._log_w[model] -= top
            self._w = None
            self.rounds_ += 1
        return losses

    # ---- runtime changes
    def add_model(self, model: str, *, share: float | None = None) -> None:
        """Add a model at runtime.

        Args:
            model: The new model's name.
            share: Its fraction of the total weight right after adding, in (0, 1). None gives it
                the weight of the current best model.

        Raises:
            ValueError: If the name is taken or ``share`` is outside (0, 1).
        """
        with self._lock:
            _add_log_weight(self._log_w, model, share, "Exp4")
            self._w = None

    def remove_model(self, model: str) -> None:
        """Remove a model at runtime; the others keep their weights (renormalised). Removing the
        last one leaves an empty ensemble whose :meth:`combine` returns ``(None, 0.0)``."""
        with self._lock:
            if model not in self._log_w:
                raise ValueError(f"unknown model {model!r}; the ensemble has {self.models}")
            del self._log_w[model]
            self._w = None

    # ---- state
    def to_dict(self) -> dict[str, Any]:
        """The state as JSON-serialisable data (a custom loss function is recorded as "custom"
        and must be passed again to :meth:`from_dict`)."""
        with self._lock:
            return {
                "policy": "exp4",
                "eta": self.eta,
                "loss": self._loss_name,
                "missing_loss": self.missing_loss,
                "log_weights": dict(self._log_w),
                "rounds": self.rounds_,
            }

    @classmethod
    def from_dict(cls, state: Mapping[str, Any], *, loss: Loss | None = None) -> Exp4:
        """Rebuild an ensemble from :meth:`to_dict` output.

        Args:
            state: What :meth:`to_dict` returned.
            loss: The loss function, required when the state's loss is "custom".
        """
        if state.get("policy") != "exp4":
            raise ValueError(f"not an Exp4 state (policy={state.get('policy')!r}); use to_dict()")
        name = state.get("loss", "zero_one")
        if loss is None:
            if name == "custom":
                raise ValueError(
                    "this Exp4 state was saved with a custom loss function; pass it again: "
                    "Exp4.from_dict(state, loss=my_loss)"
                )
            loss_arg: str | Loss = name
        else:
            loss_arg = loss
        log_w = dict(state["log_weights"])
        models = list(log_w) or ["_placeholder"]  # every model may have been removed
        self = cls(models, eta=state["eta"], loss=loss_arg, missing_loss=state.get("missing_loss"))
        self._log_w = {m: float(v) for m, v in log_w.items()}
        self.rounds_ = int(state.get("rounds", 0))
        return self

    def __reduce__(self) -> tuple[Any, ...]:
        if self._loss_name == "custom":
            return (_restore_exp4, (self.to_dict(), self._loss_fn))
        return (type(self).from_dict, (self.to_dict(),))

    def __repr__(self) -> str:
        weights = ", ".join(f"{m}={w:.3f}" for m, w in self.weights().items())
        return f"Exp4(eta={self.eta}, rounds={self.rounds_}, w=[{weights}])"


def _restore_exp4(state: dict[str, Any], loss: Loss) -> Exp4:
    return Exp4.from_dict(state, loss=loss)
