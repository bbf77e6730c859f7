"""Compressed activations on a real GPU: ResNet-50's peak memory with and without them.

Claim (issue 7): saved-activation memory falls >= 10x at 2 bits and >= 7x at 4 bits. The CPU
benchmark (``benchmarks/lowbit.py``) measures it by the hooks' own byte count; this script checks
it on CUDA with the allocator's own counter, ``torch.cuda.max_memory_allocated()``.

One prepared script for a lent H100/H200 (no network; torch with CUDA there). From the
repository root::

    python benchmarks/lowbit_gpu.py --json            # on the GPU machine, about a minute
    python benchmarks/lowbit_gpu.py --dry-run --json  # resnet-tiny on the CPU, same code path

It imports ``mlcycle`` from ``src/`` (no installation needed) and needs only torch.

What is measured, per mode (fp32, then activations at 8, 4 and 2 bits), for one training step of
``mlcycle.models``' ResNet-50 (224x224, fp32, ``out.float().square().mean()``, no optimizer) at
``--batch`` (64 by default): one warm-up step, then ``--steps`` timed steps, each with gradients
set to None first. Per step the peak is ``max_memory_allocated()`` after
``reset_peak_memory_stats()``, and ``base`` is ``memory_allocated()`` just before it (parameters
and inputs). ``activation_peak = peak - base``: what the step itself adds (saved activations,
their float copies while they are made and read, gradients, temporaries).
``held_after_forward`` is ``memory_allocated() - base`` between forward and backward, when the
step holds only its saved activations and the loss: the allocator's view of what the hooks
count. ``gpu_reduction`` (whole-step peaks) and ``held_reduction`` are fp32 over the mode; the
hooks' own count of the saved bytes (``hook_reduction``) is reported beside them. The step's
peak falls less than the held bytes: it also holds gradients, backward temporaries, and each
activation in float while it is made and while backward reads it. On the CPU (``--dry-run``)
the bytes come from ``mlcycle.train.remat.memory.LiveBytes`` instead.

Output: one JSON line per mode as it is measured, the same lines in ``$OUT/lowbit_gpu.jsonl``
when ``OUT`` is set, then a last line ``{"kind": "summary", ...}`` with
``gpu_reduction_2bit``, ``held_reduction_2bit``, ``hook_reduction_2bit`` (and the same at 4 and
8 bits) and the device. Without CUDA (and without ``--dry-run``) it prints one skip line and
exits 0 (``make bench`` runs it with ``--quick``, which is accepted and changes nothing). A mode
that fails (e.g. out of memory) is reported as a row with ``error`` and the others still run; the
exit code is 1 only when the fp32 baseline itself fails.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
import traceback
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT / "src") not in sys.path:  # src first: mlcycle without installation
    sys.path.insert(0, str(ROOT / "src"))

import torch  # noqa: E402

NAME = "lowbit_gpu"
MODES: tuple[int | None, ...] = (None, 8, 4, 2)  # None: fp32 activations


def emit(row: dict[str, Any], as_json: bool) -> None:
    """Print one result line (JSON, or a short text line) and append it to $OUT."""
    line = json.dumps(row, separators=(",", ":"), default=str)
    print(line if as_json else "  ".join(f"{k}={v}" for k, v in row.items()), flush=True)
    out = os.environ.get("OUT")
    if out:
        with open(Path(out) / f"{NAME}.jsonl", "a") as fh:
            fh.write(line + "\n")


def one_step(
    model: torch.nn.Module,
    inputs: tuple[torch.Tensor, ...],
    bits: int | None,
    live_bytes: Any = None,
) -> tuple[Any, int | None]:
    """Forward (with activations at ``bits`` when given), loss and backward.

    Returns the hooks' stats and, when ``live_bytes`` (a function returning the bytes in use)
    is given, the bytes in use between forward and backward, when the saved activations (and
    the loss) are all that the step holds.
    """
    from mlcycle.train.lowbit import compress_activations

    for p in model.parameters():
        p.grad = None
    stats = None
    if bits is None:
        out = model(*inputs)
    else:
        with compress_activations(bits, module=model) as stats:
            out = model(*inputs)
    loss = out.float().square().mean()
    del out
    held = None if live_bytes is None else live_bytes()
    loss.backward()
    return stats, held


def measure(
    model: torch.nn.Module, inputs: tuple[torch.Tensor, ...], bits: int | None, steps: int
) -> dict[str, Any]:
    """Warm-up, then ``steps`` measured steps: peak and base bytes, time, hook counts."""
    cuda = inputs[0].is_cuda
    one_step(model, inputs, bits)  # warm-up: cuDNN workspaces, allocator pools
    peaks, bases, times, helds = [], [], [], []
    stats = None
    for _ in range(steps):
        for p in model.parameters():
            p.grad = None
        if cuda:
            torch.cuda.synchronize()
            base = torch.cuda.memory_allocated()
            torch.cuda.reset_peak_memory_stats()
            t0 = time.perf_counter()

            def in_use() -> int:
                torch.cuda.synchronize()
                return torch.cuda.memory_allocated()

            stats, held = one_step(model, inputs, bits, in_use)
            torch.cuda.synchronize()
            times.append(time.perf_counter() - t0)
            peaks.append(torch.cuda.max_memory_allocated())
        else:
            from mlcycle.train.remat.memory import LiveBytes

            with LiveBytes(baseline=[*model.parameters(), *model.buffers(), *inputs]) as mem:
                base = mem.baseline_bytes
                t0 = time.perf_counter()
                stats, held = one_step(model, inputs, bits, lambda m=mem: m.live_bytes)
                times.append(time.perf_counter() - t0)
            peaks.append(mem.peak_bytes)
        bases.append(base)
        helds.append(held - base)
    peak, base = max(peaks), min(bases)
    row: dict[str, Any] = {
        "bits": bits,
        "peak_bytes": peak,
        "base_bytes": base,
        "activation_peak_bytes": peak - base,
        "held_after_forward_bytes": max(helds),
        "step_s": sorted(times)[len(times) // 2],
    }
    if stats is not None:
        row.update(
            hook_original_bytes=stats.original_bytes,
            hook_stored_bytes=stats.stored_bytes,
            hook_reduction=stats.reduction,
        )
    return row


def main() -> int:
    parser = argparse.ArgumentParser(
        prog=f"benchmarks/{NAME}.py",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--json", action="store_true", help="one JSON object per line")
    parser.add_argument("--quick", action="store_true", help="accepted (make bench); no effect")
    parser.add_argument("--batch", type=int, default=64, help="ResNet-50 batch (default 64)")
    parser.add_argument("--steps", type=int, default=3, help="measured steps per mode")
    parser.add_argument(
        "--dry-run", action="store_true", help="resnet-tiny on the CPU: checks the code path"
    )
    args = parser.parse_args()

    if not args.dry_run and not torch.cuda.is_available():
        emit({"kind": "skip", "reason": "no CUDA device; nothing measured"}, args.json)
        return 0
    from mlcycle.models import build

    if args.dry_run:
        device, name, batch = "cpu", "resnet-tiny", 8
        torch.set_num_threads(1)
    else:
        device, name, batch = "cuda", "resnet50", args.batch
        torch.backends.cudnn.benchmark = False
    model, inputs = build(name, batch=batch, device=device)
    env = {
        "kind": "env",
        "model": name,
        "batch": batch,
        "device": torch.cuda.get_device_name() if device == "cuda" else "cpu",
        "torch": torch.__version__,
    }
    emit(env, args.json)

    rows: dict[int | None, dict[str, Any]] = {}
    for bits in MODES:
        try:
            row = measure(model, inputs, bits, max(1, args.steps))
        except Exception as exc:  # noqa: BLE001 (report every failure, keep measuring)
            row = {"bits": bits, "error": f"{type(exc).__name__}: {exc}"}
            traceback.print_exc(file=sys.stderr)
            if device == "cuda":
                torch.cuda.empty_cache()
        else:
            rows[bits] = row
        emit({"kind": "row", "model": name, "batch": batch, **row}, args.json)

    fp32 = rows.get(None)
    summary: dict[str, Any] = {
        "kind": "summary",
        **{k: env[k] for k in ("model", "batch", "device")},
    }
    if fp32 is None:
        summary["error"] = "the fp32 step failed; no reductions"
        emit(summary, args.json)
        return 1
    for bits in (2, 4, 8):
        row = rows.get(bits)
        if row is None:
            continue
        summary[f"gpu_reduction_{bits}bit"] = fp32["activation_peak_bytes"] / max(
            1, row["activation_peak_bytes"]
        )
        summary[f"held_reduction_{bits}bit"] = fp32["held_after_forward_bytes"] / max(
            1, row["held_after_forward_bytes"]
        )
        summary[f"hook_reduction_{bits}bit"] = row["hook_reduction"]
        summary[f"time_ratio_{bits}bit"] = row["step_s"] / fp32["step_s"]
    emit(summary, args.json)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
