"""A weighted ensemble driven by feedback: Exp4 (Clipper Sec. 5.2.2 and 5.2.3).

:class:`Exp4` (Clipper, Crankshaw et al., NSDI 2017, Sec. 5.2.2; Auer, Cesa-Bianchi, Freund and
Schapire, "The Nonstochastic Multiarmed Bandit Problem", SIAM J. Computing 2002, Sec. 7): every
model answers, the answers are combined with learned weights, and each model's weight shrinks
multiplicatively with its own loss. Straggler mitigation (Sec. 5.2.3): :meth:`Exp4.combine`
accepts the outputs of any subset of the models and lowers the confidence it reports by the
weight that is missing. Re-exported by :mod:`~mlcycle.serve.online.selection`, beside Exp3.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

from mlcycle.serve.online._weights import (
    _LOSSES,
    LogWeights,
    Loss,
    _add_log_weight,
    _argmax,
    _check_models,
    _check_unit,
    _label,
    _logsumexp,
    _normalized,
    _scores,
)

__all__ = ["Exp4"]


# --------------------------------------------------------------------------- Exp4


class Exp4(LogWeights):
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
        self._start(names)
        self._w: dict[str, float] | None = None  # cache of normalised weights

    # ---- inspection
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
            self._shift()
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
        models = list(state["log_weights"]) or ["_placeholder"]  # all may have been removed
        self = cls(models, eta=state["eta"], loss=loss_arg, missing_loss=state.get("missing_loss"))
        self._restore(state)
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
