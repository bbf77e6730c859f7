"""What the feedback-driven policies share: losses on model outputs, argument checks, and
log-weights behind a lock (:class:`LogWeights`), for :mod:`~mlcycle.serve.online.selection`
(Exp3) and :mod:`~mlcycle.serve.online.ensemble` (Exp4).
"""

from __future__ import annotations

import math
import threading
from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import Any

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


# --------------------------------------------------------------------------- the shared base


class LogWeights:
    """Named models with log-weights behind a lock: the state Exp3 and Exp4 share.

    Weights are kept as logarithms, shifted after each update so that the largest is 0
    (:meth:`_shift`), so they never overflow however long the server runs.
    """

    _log_w: dict[str, float]
    _lock: threading.Lock

    def _start(self, names: list[str]) -> None:
        self._log_w = dict.fromkeys(names, 0.0)
        self._lock = threading.Lock()
        self.rounds_ = 0  # number of updates applied

    @property
    def models(self) -> list[str]:
        """The model names, in the order they were added."""
        return list(self._log_w)

    def __contains__(self, model: object) -> bool:
        return model in self._log_w

    def __len__(self) -> int:
        return len(self._log_w)

    def _shift(self) -> None:
        """Subtract the largest log-weight from all (the normalised weights do not change)."""
        top = max(self._log_w.values())
        for model in self._log_w:
            self._log_w[model] -= top

    def _restore(self, state: Mapping[str, Any]) -> None:
        """Take the weights and round count of a ``to_dict`` state."""
        self._log_w = {m: float(v) for m, v in dict(state["log_weights"]).items()}
        self.rounds_ = int(state.get("rounds", 0))
