"""IDK cascade routing: cheap models answer the easy queries, harder ones go further down.

Wang, Luo, Crankshaw, Tumanov, Yu and Gonzalez, "IDK Cascades: Fast Deep Learning by Learning
not to Overthink" (UAI 2018), observe that most inputs are easy, and that an accurate but
expensive model "overthinks" them. An IDK cascade runs models from cheapest to most expensive;
each stage either answers or says "I don't know" (IDK) and defers to the next, and the last
stage always answers. A query answered at stage ``k`` costs the sum of the costs of stages
``0..k``, since every stage before it ran too. The paper's simplest IDK decision, used here, is
a threshold on the model's confidence (by default its largest class probability); the
thresholds are set by the user for now, and fitting them to a cost/accuracy target comes later.

The server drives a query through the cascade with :meth:`IDKCascade.first` and
:meth:`IDKCascade.decide`; :meth:`IDKCascade.evaluate` replays labelled data offline to show
the accuracy and mean cost that a choice of thresholds buys. Pure Python; numpy arrays are
accepted wherever sequences are.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, Literal

__all__ = ["CascadeDecision", "IDKCascade", "max_probability"]

Confidence = Callable[[Any], float]


def _as_list(output: Any) -> Any:
    return output.tolist() if hasattr(output, "tolist") else output


def max_probability(output: Any) -> float:
    """The largest class probability of an output: the default confidence of a stage.

    Args:
        output: A sequence (list, tuple, 1-D numpy array) of class probabilities.

    Returns:
        ``max(output)``.

    Raises:
        TypeError: If the output is not a sequence of class probabilities.
        ValueError: If it is empty.
    """
    scores = _as_list(output)
    if isinstance(scores, (str, bytes)) or not isinstance(scores, Sequence):
        raise TypeError(
            f"the default cascade confidence is the largest class probability, but the output "
            f"is {type(output).__name__} ({output!r}); return class probabilities, or pass "
            f"IDKCascade(..., confidence=fn) with fn(output) -> float in [0, 1]"
        )
    if not scores:
        raise ValueError("the output is an empty list of class probabilities; return one per class")
    return float(max(scores))


def _label(output: Any) -> Any:
    """The label an output stands for: the argmax of class probabilities, else the output."""
    out = _as_list(output)
    if isinstance(out, (str, bytes)) or not isinstance(out, Sequence):
        return out
    return max(range(len(out)), key=out.__getitem__)  # first of the tied classes


@dataclass(frozen=True, slots=True)
class CascadeDecision:
    """What a cascade stage decided for one query.

    Attributes:
        stage: Index of the stage that produced ``output``.
        model: Name of that stage's model.
        answered: True when this stage answers; False when it defers ("I don't know").
        output: The stage's output (the answer when ``answered``).
        confidence: The stage's confidence in its output, in [0, 1] (0.0 for a missing output).
        confident: Whether ``confidence`` reached the stage's threshold. The last stage answers
            either way; without a threshold of its own it counts as confident.
        next_model: The model to query next when deferring, else None.
    """

    stage: int
    model: str
    answered: bool
    output: Any
    confidence: float
    confident: bool
    next_model: str | None

    @property
    def action(self) -> Literal["answer", "defer"]:
        """``"answer"`` or ``"defer"``."""
        return "answer" if self.answered else "defer"


class IDKCascade:
    """A cascade of models where each stage answers only when confident (Wang et al., UAI 2018).

    Stage ``i`` answers when ``confidence(output) >= thresholds[i]`` and otherwise defers to
    stage ``i + 1``; the last stage always answers. Order stages from cheapest to most
    expensive. A threshold of 0 makes a stage always answer (later stages are never reached);
    a threshold above every confidence the model produces makes it always defer.

    A stage whose output is missing (None: the model failed or missed its deadline) counts as
    "I don't know" with confidence 0.0 and defers; at the last stage the decision answers with
    ``output=None``, and the server answers with the application's default.

    Args:
        stages: Model names, cheapest first (unique, at least one).
        thresholds: Confidence thresholds in [0, 1]: one per stage but the last
            (``len(stages) - 1`` values), or one per stage, in which case the last threshold
            does not stop the last stage from answering; it only sets
            :attr:`CascadeDecision.confident` (so a server can flag unsure final answers).
        confidence: Function ``output -> float in [0, 1]``; default :func:`max_probability`.

    Example:
        >>> cascade = IDKCascade(["small", "large"], thresholds=[0.9])
        >>> cascade.first()
        'small'
        >>> cascade.decide(0, [0.6, 0.4]).next_model  # unsure: ask the large model
        'large'
        >>> cascade.decide(1, [0.6, 0.4]).answered  # the last stage always answers
        True
    """

    def __init__(
        self,
        stages: Sequence[str],
        thresholds: Sequence[float],
        *,
        confidence: Confidence | None = None,
    ):
        if isinstance(stages, str) or not isinstance(stages, Sequence):
            raise TypeError(
                f"stages must be a list of model names, cheapest first, got {stages!r}; "
                f"e.g. IDKCascade(['small', 'large'], thresholds=[0.9])"
            )
        names = list(stages)
        if not names:
            raise ValueError("an IDK cascade needs at least one stage (model name)")
        for name in names:
            if not isinstance(name, str) or not name:
                raise TypeError(f"stage names must be non-empty strings, got {name!r}")
        if len(set(names)) != len(names):
            dupes = sorted({n for n in names if names.count(n) > 1})
            raise ValueError(f"stage names must be unique; {dupes} appear more than once")
        thresholds = _as_list(thresholds)
        if isinstance(thresholds, (str, bytes)) or not isinstance(thresholds, Sequence):
            raise TypeError(f"thresholds must be a list of floats in [0, 1], got {thresholds!r}")
        if len(thresholds) not in (len(names) - 1, len(names)):
            raise ValueError(
                f"{len(names)} stages need {len(names) - 1} thresholds (one per stage but the "
                f"last, which always answers) or {len(names)}, got {len(thresholds)}"
            )
        checked = []
        for i, t in enumerate(thresholds):
            if isinstance(t, bool) or not isinstance(t, (int, float)):
                raise TypeError(f"thresholds[{i}] must be a float in [0, 1], got {t!r}")
            if not 0.0 <= t <= 1.0:  # also rejects nan
                raise ValueError(
                    f"thresholds[{i}] must lie in [0, 1] (a confidence level), got {t!r}; "
                    f"0.9 means: answer when the largest class probability is at least 0.9"
                )
            checked.append(float(t))
        if confidence is not None and not callable(confidence):
            raise TypeError(
                f"confidence must be a function output -> float in [0, 1], got {confidence!r}"
            )
        self.stages: tuple[str, ...] = tuple(names)
        self.thresholds: tuple[float, ...] = tuple(checked)
        self.confidence: Confidence = confidence or max_probability
        self._index = {name: i for i, name in enumerate(names)}

    def __len__(self) -> int:
        return len(self.stages)

    def __repr__(self) -> str:
        return f"IDKCascade(stages={list(self.stages)}, thresholds={list(self.thresholds)})"

    def first(self) -> str:
        """The model that sees every query first (stage 0)."""
        return self.stages[0]

    def index(self, stage: int | str) -> int:
        """The stage index of a stage given by index or model name.

        Raises:
            ValueError: For an unknown model or an index out of range.
            TypeError: For anything but an int or a str.
        """
        if isinstance(stage, str):
            if stage not in self._index:
                raise ValueError(
                    f"unknown model {stage!r}: the cascade's stages are {list(self.stages)}"
                )
            return self._index[stage]
        if isinstance(stage, bool) or not isinstance(stage, int):
            raise TypeError(f"stage must be a stage index (int) or model name, got {stage!r}")
        if not 0 <= stage < len(self.stages):
            raise ValueError(
                f"stage index {stage} is out of range: the cascade has {len(self.stages)} "
                f"stages (0 to {len(self.stages) - 1})"
            )
        return stage

    def decide(self, stage: int | str, output: Any) -> CascadeDecision:
        """Decide whether stage ``stage`` answers with ``output`` or defers to the next stage.

        Args:
            stage: The stage index, or the stage's model name.
            output: What that stage's model returned for the query; None when it returned
                nothing in time.

        Returns:
            A :class:`CascadeDecision`: answered with ``(output, confidence)``, or deferred to
            ``next_model``.

        Raises:
            ValueError: For an unknown stage, or a confidence outside [0, 1].
        """
        i = self.index(stage)
        last = i == len(self.stages) - 1
        if output is None:
            conf = 0.0
        else:
            raw = self.confidence(output)
            try:
                conf = float(raw)
            except (TypeError, ValueError):
                raise TypeError(
                    f"the confidence function returned {raw!r}; it must return a float in [0, 1]"
                ) from None
            if not 0.0 <= conf <= 1.0:
                raise ValueError(
                    f"the confidence of stage {i} ({self.stages[i]!r}) is {raw!r}, outside "
                    f"[0, 1]; return probabilities (softmax of logits) or rescale the "
                    f"confidence function"
                )
        confident = output is not None and (i >= len(self.thresholds) or conf >= self.thresholds[i])
        if last or confident:
            return CascadeDecision(i, self.stages[i], True, output, conf, confident, None)
        return CascadeDecision(i, self.stages[i], False, output, conf, False, self.stages[i + 1])

    def evaluate(
        self,
        outputs_per_stage: Sequence[Sequence[Any]],
        labels: Sequence[Any],
        costs: Sequence[float] | None = None,
    ) -> dict[str, Any]:
        """Replay labelled data through the cascade: accuracy, mean cost, where queries stop.

        Every stage's output must be known for every example (run each model on the whole
        set once); the replay uses :meth:`decide`, so it makes exactly the online decisions.

        Args:
            outputs_per_stage: ``outputs_per_stage[i][n]`` is stage ``i``'s output for example
                ``n`` (a list of lists, or one ``(n_examples, n_classes)`` array per stage).
            labels: The true label of each example (class indices for probability outputs).
            costs: The cost of running each stage once (e.g. ms or FLOPs; all > 0 or = 0);
                None counts 1 per stage, so ``mean_cost`` is the mean number of stages run.

        Returns:
            A dict with ``accuracy`` (share of examples whose answer's label is right),
            ``mean_cost`` (mean over examples of the summed cost of the stages that ran),
            ``cost_vs_last`` (``mean_cost`` over running the last stage alone; None when the
            last stage is free),
            ``stage_share`` (share of examples answered at each stage; sums to 1),
            ``stage_accuracy`` (accuracy of the answers given at each stage; None where a
            stage answered nothing), ``stage_accuracy_alone`` (each stage's accuracy on all
            examples, for comparison) and ``n`` (number of examples).

        Raises:
            ValueError: If the shapes disagree or a cost is negative.
        """
        k = len(self.stages)
        if len(outputs_per_stage) != k:
            raise ValueError(
                f"outputs_per_stage has {len(outputs_per_stage)} entries; the cascade has {k} "
                f"stages: pass one list of outputs per stage"
            )
        outs = [_as_list(o) for o in outputs_per_stage]
        labels = list(_as_list(labels))
        n = len(labels)
        if n == 0:
            raise ValueError("evaluate needs at least one labelled example")
        for i, o in enumerate(outs):
            if len(o) != n:
                raise ValueError(
                    f"stage {i} ({self.stages[i]!r}) has {len(o)} outputs for {n} labels; give "
                    f"every stage's output for every example"
                )
        if costs is None:
            cost = [1.0] * k
        else:
            cost = [float(c) for c in _as_list(costs)]
            if len(cost) != k:
                raise ValueError(f"costs has {len(cost)} values for {k} stages: give one per stage")
            if any(not (c >= 0.0 and math.isfinite(c)) for c in cost):
                raise ValueError(f"costs must be finite and >= 0, got {cost}")
        cum_cost = [sum(cost[: i + 1]) for i in range(k)]  # answered at i: stages 0..i ran

        answered = [0] * k
        right_at = [0] * k
        right_alone = [0] * k
        correct = 0
        total_cost = 0.0
        for j in range(n):
            for i in range(k):
                if _label(outs[i][j]) == labels[j]:
                    right_alone[i] += 1
            for i in range(k):
                decision = self.decide(i, outs[i][j])
                if decision.answered:
                    hit = decision.output is not None and _label(decision.output) == labels[j]
                    answered[i] += 1
                    right_at[i] += hit
                    correct += hit
                    total_cost += cum_cost[i]
                    break
        mean_cost = total_cost / n
        return {
            "accuracy": correct / n,
            "mean_cost": mean_cost,
            "cost_vs_last": mean_cost / cost[-1] if cost[-1] > 0 else None,
            "stage_share": [a / n for a in answered],
            "stage_accuracy": [
                r / a if a else None for r, a in zip(right_at, answered, strict=True)
            ],
            "stage_accuracy_alone": [r / n for r in right_alone],
            "n": n,
        }
