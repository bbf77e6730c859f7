"""The measurements behind ``mlcycle lowbit bench``, ``benchmarks/lowbit.py`` and the demo.

Each ``measure_*`` function returns plain JSON-ready data; :func:`run_bench` runs them all and
adds the summary fields that the issue names (``unbiased``, ``variance_ratios``,
``mem_reduction_2bit``, ``mem_reduction_4bit``, ``acc_fp32``, ``acc_drop_4bit``,
``acc_drop_2bit``, ``throughput_ratio_2bit``). Everything runs on the CPU with one thread and
nothing is downloaded: the accuracy runs train on scikit-learn's bundled 8x8 digits.
"""

from __future__ import annotations

import math
import statistics
import time
from collections.abc import Callable, Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from mlcycle.train.lowbit.activations import ActivationStats, compress_activations
from mlcycle.train.lowbit.fqt import FQTConfig, gradient_variance
from mlcycle.train.lowbit.quantize import make_quantizer

__all__ = [
    "DigitsCNN",
    "demo_summary",
    "load_digits",
    "measure_accuracy",
    "measure_gradient_variance",
    "measure_memory",
    "measure_throughput",
    "measure_unbiasedness",
    "measure_variance_ratios",
    "outlier_rows",
    "run_bench",
]

Progress = Callable[[str], None]
STOCHASTIC_KINDS = ("per_tensor", "per_sample", "householder")
MEMORY_MODELS = ("resnet18", "resnet50", "gpt2-small")


def _say(progress: Progress | None, text: str) -> None:
    if progress is not None:
        progress(text)


# ------------------------------------------------------------------------------------------
# (a) unbiasedness


def measure_unbiasedness(
    *, n: int = 10_000, bits: Sequence[int] = (2, 4, 8), seed: int = 0
) -> dict[str, Any]:
    """Mean of ``n`` roundings of a fixed 8x8 tensor against the input, per quantizer and width.

    For each element, ``z = (mean - x) / (sigma / sqrt(n))`` with ``sigma`` the exact standard
    deviation of one rounding. Unbiased rounding keeps about 99.7% of elements within 3 (they
    are the draws of a standard normal); nearest rounding is measured in the sigma of stochastic
    rounding on the same (per-tensor) grid, so its bias shows as hundreds of sigmas.

    Returns:
        ``{"rows": [...], "within_3sigma": fraction over every stochastic check, "unbiased":
        bool (fraction >= 0.99), "nearest_bias_sigmas": smallest max-|z| of nearest rounding over
        the widths}``.
    """
    gen = torch.Generator().manual_seed(seed)
    x = torch.rand(8, 8, generator=gen, dtype=torch.float64) * 4 - 1
    x[0] *= 25  # one outlier row, so that the three kinds use different grids
    rows: list[dict[str, Any]] = []
    inside = checks = 0
    nearest_sigmas: list[float] = []
    for b in bits:
        sr = make_quantizer("per_tensor", b)  # nearest's grid, rounded stochastically
        for kind in (*STOCHASTIC_KINDS, "nearest"):
            q = make_quantizer(kind, b)
            mean = q.sample(x, n, generator=gen).mean(dim=0)
            ref = q if q.stochastic else sr
            sigma = ref.variance(x).sqrt()
            err = (mean - x).abs()
            se = sigma / math.sqrt(n)
            tiny = 1e-9 * x.abs().max()
            exact = torch.where(err > tiny, math.inf, 0.0)  # sigma 0: a level, never moves
            z = torch.where(se > 0, err / se.clamp_min(1e-300), exact)
            row = {
                "kind": kind,
                "bits": b,
                "max_abs_z": float(z.max()),
                "within_3sigma": float((z <= 3).double().mean()),
                "max_abs_error": float(err.max()),
            }
            rows.append(row)
            if q.stochastic:
                inside += int((z <= 3).sum())
                checks += z.numel()
            else:
                nearest_sigmas.append(row["max_abs_z"])
    frac = inside / checks
    return {
        "n": n,
        "rows": rows,
        "within_3sigma": frac,
        "unbiased": frac >= 0.99,
        "nearest_bias_sigmas": min(nearest_sigmas),
    }


# ------------------------------------------------------------------------------------------
# (b) variance


def outlier_rows(
    rows: int = 128,
    cols: int = 512,
    *,
    outliers: int = 4,
    scale: float = 100.0,
    seed: int = 0,
    dtype: torch.dtype = torch.float64,
) -> Tensor:
    """A gradient-like matrix: Gaussian rows with log-normal magnitudes, ``outliers`` of them
    ``scale`` times larger (the few samples of a batch that dominate its gradient)."""
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(rows, cols, generator=gen, dtype=dtype)
    mags = torch.exp(0.5 * torch.randn(rows, 1, generator=gen, dtype=dtype))
    mags[torch.randperm(rows, generator=gen)[:outliers]] *= scale
    return x * mags


def measure_variance_ratios(
    *, bits: Sequence[int] = (4, 5, 8), draws: int = 64, seed: int = 0
) -> dict[str, Any]:
    """Expected squared error ``E||Q(x) - x||^2`` of each quantizer on an outlier-row matrix.

    The exact expectation comes from :meth:`Quantizer.variance`; ``draws`` Monte Carlo
    roundings check it (``mc_over_exact`` near 1).
    """
    x = outlier_rows(seed=seed)
    gen = torch.Generator().manual_seed(seed + 1)
    out: dict[str, Any] = {"shape": list(x.shape), "by_bits": {}}
    for b in bits:
        var = {}
        mc = {}
        for kind in STOCHASTIC_KINDS:
            q = make_quantizer(kind, b)
            var[kind] = float(q.variance(x).sum())
            s = q.sample(x, draws, generator=gen)
            mc[kind] = float((s - x).square().sum(dim=(1, 2)).mean()) / var[kind]
        out["by_bits"][str(b)] = {
            "variance": var,
            "mc_over_exact": mc,
            "per_tensor/per_sample": var["per_tensor"] / var["per_sample"],
            "per_sample/householder": var["per_sample"] / var["householder"],
            "per_tensor/householder": var["per_tensor"] / var["householder"],
        }
    return out


def measure_gradient_variance(
    model: nn.Module,
    inputs: Tensor,
    targets: Tensor,
    *,
    bits: Sequence[int] = (4, 5, 8),
    samples: int = 8,
) -> dict[str, Any]:
    """Relative variance of fully quantized gradients (8-bit forward) per backward quantizer."""
    out: dict[str, Any] = {}
    for b in bits:
        rel = {}
        for kind in STOCHASTIC_KINDS:
            cfg = FQTConfig(forward_bits=8, backward_bits=b, backward_kind=kind)
            r = gradient_variance(
                model, inputs, targets, F.cross_entropy, config=cfg, samples=samples
            )
            rel[kind] = {"relative_variance": r.relative_variance, "bias_z": r.bias_z}
        v = {k: rel[k]["relative_variance"] for k in rel}
        out[str(b)] = {
            "by_kind": rel,
            "per_tensor/per_sample": v["per_tensor"] / v["per_sample"],
            "per_sample/householder": v["per_sample"] / v["householder"],
        }
    return out


# ------------------------------------------------------------------------------------------
# (c) memory


def measure_memory(
    models: Sequence[str] = MEMORY_MODELS,
    *,
    bits: Sequence[int] = (2, 4, 8),
    batch: int = 1,
    group_size: int = 256,
    progress: Progress | None = None,
) -> list[dict[str, Any]]:
    """Saved-activation bytes of one forward pass per model, by the hooks' own count.

    The plain bytes (``original_bytes``) and the compressed ones (``stored_bytes``) come from
    the same pass; each width is a separate pass with the same weights and inputs.
    """
    from mlcycle.models import build

    rows = []
    for name in models:
        model, inputs = build(name, batch=batch)
        for b in bits:
            _say(progress, f"memory: {name} at {b} bits")
            t0 = time.perf_counter()
            with compress_activations(b, group_size=group_size, module=model) as stats:
                out = model(*inputs)
            del out
            rows.append(
                {
                    "model": name,
                    "batch": batch,
                    "bits": b,
                    "forward_s": time.perf_counter() - t0,
                    **stats.to_dict(),
                }
            )
        del model, inputs
    return rows


# ------------------------------------------------------------------------------------------
# (d) accuracy on the digits


class DigitsCNN(nn.Module):
    """A small CNN for 1x8x8 digits: three 3x3 conv-BN-ReLU layers, max-pool, global average.

    Args:
        width: channels of the first layer (then twice that).
    """

    def __init__(self, width: int = 16) -> None:
        super().__init__()
        w = width
        self.features = nn.Sequential(
            nn.Conv2d(1, w, 3, padding=1, bias=False),
            nn.BatchNorm2d(w),
            nn.ReLU(),
            nn.Conv2d(w, 2 * w, 3, padding=1, bias=False),
            nn.BatchNorm2d(2 * w),
            nn.ReLU(),
            nn.MaxPool2d(2),
            nn.Conv2d(2 * w, 2 * w, 3, padding=1, bias=False),
            nn.BatchNorm2d(2 * w),
            nn.ReLU(),
        )
        self.head = nn.Linear(2 * w, 10)

    def forward(self, x: Tensor) -> Tensor:
        return self.head(self.features(x).mean(dim=(2, 3)))


def load_digits(*, test_size: int = 450, seed: int = 0) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """scikit-learn's bundled 8x8 digits (1797 images, no download) as a fixed split.

    Returns:
        ``(x_train, y_train, x_test, y_test)``; images are (n, 1, 8, 8) float32 in [0, 1].
    """
    try:
        from sklearn.datasets import load_digits as sk_load
    except ImportError as exc:  # pragma: no cover - scikit-learn is a dev extra
        raise ImportError(
            "The accuracy benchmark trains on scikit-learn's bundled digits; install it with "
            "`pip install scikit-learn` (or `pip install -e '.[dev]'`)."
        ) from exc
    data = sk_load()
    x = torch.tensor(data.data, dtype=torch.float32).reshape(-1, 1, 8, 8) / 16.0
    y = torch.tensor(data.target, dtype=torch.long)
    perm = torch.randperm(len(x), generator=torch.Generator().manual_seed(seed))
    test, train = perm[:test_size], perm[test_size:]
    return x[train], y[train], x[test], y[test]


def train_digits(
    bits: int | None,
    *,
    seed: int,
    steps: int,
    batch: int = 64,
    width: int = 16,
    lr: float = 3e-3,
    data: tuple[Tensor, Tensor, Tensor, Tensor] | None = None,
    group_size: int = 256,
) -> dict[str, Any]:
    """Train :class:`DigitsCNN` with Adam for ``steps`` steps; ``bits`` None trains in fp32.

    The seed fixes the initial weights and the batch order, so runs at different widths differ
    only by the compression of the saved activations.
    """
    x_tr, y_tr, x_te, y_te = load_digits() if data is None else data
    torch.manual_seed(seed)
    model = DigitsCNN(width)
    opt = torch.optim.Adam(model.parameters(), lr=lr)
    gen = torch.Generator().manual_seed(seed)
    epochs = steps * batch // len(x_tr) + 1
    order = torch.cat([torch.randperm(len(x_tr), generator=gen) for _ in range(epochs)])
    t0 = time.perf_counter()
    saved_ratio = []
    for step in range(steps):
        idx = order[step * batch : (step + 1) * batch]
        if bits is None:
            loss = F.cross_entropy(model(x_tr[idx]), y_tr[idx])
        else:
            with compress_activations(bits, group_size=group_size, module=model) as stats:
                loss = F.cross_entropy(model(x_tr[idx]), y_tr[idx])
            saved_ratio.append(stats.reduction)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
    train_s = time.perf_counter() - t0
    model.eval()
    with torch.no_grad():
        acc = float((model(x_te).argmax(dim=1) == y_te).double().mean()) * 100
    model.train()
    return {
        "bits": bits,
        "seed": seed,
        "acc": acc,
        "train_s": train_s,
        "reduction": statistics.median(saved_ratio) if saved_ratio else 1.0,
        "model": model,
    }


def measure_accuracy(
    *,
    seeds: Sequence[int] = (0, 1, 2),
    steps: int = 300,
    bits: Sequence[int] = (8, 4, 2),
    width: int = 16,
    progress: Progress | None = None,
) -> dict[str, Any]:
    """Test accuracy of :class:`DigitsCNN` at fp32 and with activations at each width.

    Returns:
        ``{"runs": [...], "acc_fp32": mean, "drop": {bits: mean drop in points},
        "drop_range": {bits: [min, max] over seeds}, "fp32_models": [model per seed]}``.
    """
    data = load_digits()
    runs: list[dict[str, Any]] = []
    models = []
    for seed in seeds:
        for b in (None, *bits):
            _say(progress, f"accuracy: seed {seed}, {'fp32' if b is None else f'{b} bits'}")
            r = train_digits(b, seed=seed, steps=steps, width=width, data=data)
            model = r.pop("model")
            if b is None:
                models.append(model)
            runs.append(r)
    fp32 = {r["seed"]: r["acc"] for r in runs if r["bits"] is None}
    drop: dict[str, float] = {}
    spread: dict[str, list[float]] = {}
    for b in bits:
        d = [fp32[r["seed"]] - r["acc"] for r in runs if r["bits"] == b]
        drop[str(b)] = statistics.fmean(d)
        spread[str(b)] = [min(d), max(d)]
    accs = list(fp32.values())
    return {
        "steps": steps,
        "seeds": list(seeds),
        "test_images": int(data[3].numel()),
        "runs": runs,
        "acc_fp32": statistics.fmean(accs),
        "acc_fp32_range": [min(accs), max(accs)],
        "drop": drop,
        "drop_range": spread,
        "fp32_models": models,
    }


# ------------------------------------------------------------------------------------------
# (e) throughput


def measure_throughput(
    *,
    bits: int = 2,
    model_name: str = "resnet18",
    batch: int = 4,
    pairs: int = 8,
    progress: Progress | None = None,
) -> dict[str, Any]:
    """Training-step throughput with compressed activations over fp32, on one model.

    Steps alternate (fp32, compressed, then compressed, fp32, ...) after a warm-up of each, and
    the ratio is the median over pairs of ``fp32 time / compressed time``, so that load from
    other processes on a shared machine cancels out.
    """
    from mlcycle.models import build

    model, inputs = build(model_name, batch=batch)

    def step(compressed: bool) -> float:
        for p in model.parameters():
            p.grad = None
        t0 = time.perf_counter()
        if compressed:
            with compress_activations(bits, module=model):
                out = model(*inputs)
        else:
            out = model(*inputs)
        out.float().square().mean().backward()
        return time.perf_counter() - t0

    _say(progress, f"throughput: {model_name} batch {batch}, fp32 vs {bits} bits")
    step(False)
    step(True)
    ratios, plain, comp = [], [], []
    for i in range(pairs):
        order = (False, True) if i % 2 == 0 else (True, False)
        t = {c: step(c) for c in order}
        plain.append(t[False])
        comp.append(t[True])
        ratios.append(t[False] / t[True])
    return {
        "model": model_name,
        "batch": batch,
        "bits": bits,
        "fp32_step_s": statistics.median(plain),
        "compressed_step_s": statistics.median(comp),
        "throughput_ratio": statistics.median(ratios),
    }


# ------------------------------------------------------------------------------------------
# All of it


def run_bench(
    *,
    quick: bool = True,
    progress: Progress | None = None,
    memory_models: Sequence[str] = MEMORY_MODELS,
) -> dict[str, Any]:
    """Run (a) to (e) and return ``{"summary": {the issue's fields}, "details": {...}}``.

    ``quick`` (under 2 minutes on 2 cores): 2 seeds of 150 steps for accuracy, 32 Monte Carlo
    draws for the variance check, 3 timed step pairs. The full run: 3 seeds of 400 steps, 128
    draws, 8 pairs.
    """
    torch_threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        _say(progress, "unbiasedness: 10,000 roundings per quantizer")
        unbiased = measure_unbiasedness()
        _say(progress, "variance: outlier-row tensors at 4, 5, 8 bits")
        variance = measure_variance_ratios(draws=32 if quick else 128)
        memory = measure_memory(memory_models, progress=progress)
        acc = measure_accuracy(
            seeds=(0, 1) if quick else (0, 1, 2),
            steps=150 if quick else 400,
            progress=progress,
        )
        x_tr, y_tr, _, _ = load_digits()
        _say(progress, "gradient variance: fully quantized backward on the trained CNN")
        grad_var = measure_gradient_variance(
            acc["fp32_models"][0], x_tr[:64], y_tr[:64], samples=4 if quick else 8
        )
        throughput = measure_throughput(pairs=3 if quick else 8, progress=progress)
    finally:
        torch.set_num_threads(torch_threads)
    acc.pop("fp32_models")

    def reduction(b: int) -> float:
        return min(r["reduction"] for r in memory if r["bits"] == b)

    ratios = {}
    for b, v in variance["by_bits"].items():
        ratios[b] = {
            "per_tensor/per_sample": v["per_tensor/per_sample"],
            "per_sample/householder": v["per_sample/householder"],
            "per_tensor/householder": v["per_tensor/householder"],
        }
        if b in grad_var:
            ratios[b]["gradient per_tensor/per_sample"] = grad_var[b]["per_tensor/per_sample"]
            ratios[b]["gradient per_sample/householder"] = grad_var[b]["per_sample/householder"]
    summary = {
        "unbiased": bool(unbiased["unbiased"]),
        "variance_ratios": ratios,
        "mem_reduction_2bit": reduction(2),
        "mem_reduction_4bit": reduction(4),
        "acc_fp32": acc["acc_fp32"],
        "acc_drop_4bit": acc["drop"]["4"],
        "acc_drop_2bit": acc["drop"]["2"],
        "throughput_ratio_2bit": throughput["throughput_ratio"],
    }
    details = {
        "unbiasedness": unbiased,
        "variance": variance,
        "gradient_variance": grad_var,
        "memory": memory,
        "accuracy": acc,
        "throughput": throughput,
        "quick": quick,
    }
    return {"summary": summary, "details": details}


def demo_summary(*, quick: bool = True, bits: int = 2) -> dict[str, Any]:
    """Train the digits CNN a few steps with activations at ``bits`` bits; report the memory.

    Returns:
        ``{"bits", "steps", "saved_fp32_bytes", "saved_compressed_bytes", "reduction",
        "saved_bytes", "loss_first", "loss_last", "resnet50_reduction" (full run only)}``:
        the activation bytes of one step as the hooks counted them (batch 128).
    """
    steps = 12 if quick else 100
    x_tr, y_tr, _, _ = load_digits()
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # small ops: one thread is fastest on a shared machine
    try:
        torch.manual_seed(0)
        model = DigitsCNN(16)
        opt = torch.optim.Adam(model.parameters(), lr=3e-3)
        losses = []
        stats = ActivationStats()
        for step in range(steps):
            idx = torch.arange(step * 128, (step + 1) * 128) % len(x_tr)
            with compress_activations(bits, module=model) as step_stats:
                loss = F.cross_entropy(model(x_tr[idx]), y_tr[idx])
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            losses.append(float(loss.detach()))
            stats = step_stats
    finally:
        torch.set_num_threads(threads)
    out = {
        "bits": bits,
        "steps": steps,
        "model": "DigitsCNN(16), batch 128",
        "saved_fp32_bytes": stats.original_bytes,
        "saved_compressed_bytes": stats.stored_bytes,
        "saved_bytes": stats.original_bytes - stats.stored_bytes,
        "reduction": stats.reduction,
        "loss_first": losses[0],
        "loss_last": losses[-1],
    }
    if not quick:
        row = measure_memory(("resnet50",), bits=(bits,))[0]
        out["resnet50_reduction"] = row["reduction"]
    return out
