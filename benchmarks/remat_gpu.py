"""Rematerialization on a real GPU: mlcycle's planned step against eager checkpointing.

One prepared script for a lent H100/H200 (no network; torch with CUDA there). Run from the
repository root::

    python benchmarks/remat_gpu.py --json            # on the GPU machine, ~5-7 min
    python benchmarks/remat_gpu.py --dry-run --json  # tiny models on the CPU, same code path

It imports ``mlcycle`` from ``src/`` (no installation needed) and the measuring code from
``benchmarks/remat_train.py``, and needs neither rich, typer nor ortools: without ortools the
planner's CP-SAT stage is skipped (its incumbents and, on small graphs, the MILP still run) and
the summary says so.

What is measured, on CUDA, fp32, one training step (forward, ``out.float().square().mean()``,
backward; no optimizer), ``torch.backends.cudnn.benchmark = False`` as in the anchors:

- ResNet-50 at batch 128 (224x224) and GPT-2 small at batch 16, sequence 1024 (this package's
  models: GPT-2 with written-out attention, untied head, dropout 0.1);
- per model: plain eager; ``checkpoint_sequential`` (non-reentrant) at 2, round(sqrt(n)) and
  n // 2 segments over the model's body; per-block ``checkpoint``; ours
  (``mlcycle.train.remat.rematerialize``) at budget fractions 0.5 and 0.35 of the plan's plain
  peak and at 0.35x plain's *measured* peak; then, as time allows, ours at each peer's measured
  peak (equal memory), and the largest ResNet-50 batch that ours trains within plain's peak;
- per row: step time (median and mean of 6 steps after 2 warm-up steps, synchronized),
  ``torch.cuda.max_memory_allocated()`` over those steps (absolute, and above what was allocated
  before them, as the anchors report it), ratios to plain; for ours also the plan's predicted
  peak and cost ratio, and whether the measured peak is within 10% of ``plan.peak_bytes``.

Only one model is on the GPU at a time (the other is parked on the CPU), so absolute peaks are
the model's own. torch.compile is not run here (50-150 s per compile): the H100 anchors in
``shared/anchors/`` hold it, and :data:`ANCHORS` repeats their ratios for the summary.

After the models, a profiler phase (``kind: "profile"``, :func:`profile_steps`) splits the
first model's step into host and device time for plain, ours at budget 1.0 and ours at 0.5:
the H200 run of 2026-11-27 measured ours ~20% above its plan on ResNet-50, and this says
whether that is the GPU waiting on Python or extra kernels.

Output: one JSON line per measurement as it is made (``kind``: ``env``, ``row``, ``phase``,
``profile``, ``search``), the same lines appended to ``$OUT/results.jsonl`` when ``OUT`` is
set, and a last line with ``kind: "summary"``. A time budget (``--budget-s``, default 400 s
from start) skips the remaining phases when it runs short, so the whole run ends well within
8 minutes.
Without CUDA (and without ``--dry-run``) it prints a one-line skip notice and exits 0, which is
what ``make bench`` sees on a machine without a GPU.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import math
import os
import sys
import time
from dataclasses import asdict
from pathlib import Path
from typing import Any

T0 = time.monotonic()
ROOT = Path(__file__).resolve().parent.parent
for _p in (ROOT / "benchmarks", ROOT / "src"):  # src first: mlcycle without installation
    if str(_p) not in sys.path:
        sys.path.insert(0, str(_p))

import torch  # noqa: E402

import remat_train as rt  # noqa: E402

NAME = "remat_gpu"

#: Ratios to eager of PyTorch's own tools on an H100 (shared/anchors/
#: gpu_remat_anchor_h100_2026-11-27.jsonl; HF GPT-2 with SDPA attention and cross-entropy there,
#: so GPT-2 figures are indicative only): ``(time_ratio, mem_ratio)`` by model and mode.
ANCHORS: dict[str, dict[str, tuple[float, float]]] = {
    "resnet50": {
        "checkpoint_sequential:2": (1.262, 0.851),
        "checkpoint_sequential:4": (1.291, 0.554),
        "checkpoint_sequential:9": (1.331, 0.338),
        "compile_budget:1.0": (0.618, 0.989),
        "compile_budget:0.5": (0.714, 0.543),
        "compile_budget:0.2": (0.743, 0.536),
    },
    "gpt2-small": {
        "per_block_checkpoint": (1.253, 0.361),
        "compile_budget:1.0": (0.986, 0.625),
        "compile_budget:0.5": (1.062, 0.473),
        "compile_budget:0.2": (1.136, 0.337),
    },
}


def emit(record: dict[str, Any]) -> None:
    """Print one JSON line now (and append it to $OUT/results.jsonl when OUT is set)."""
    record = {**record, "elapsed_s": round(time.monotonic() - T0, 1)}
    line = json.dumps(_clean(record), allow_nan=False, separators=(",", ":"))
    print(line, flush=True)
    out = os.environ.get("OUT")
    if out:
        with open(os.path.join(out, "results.jsonl"), "a") as f:
            f.write(line + "\n")


def _clean(value: Any) -> Any:
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, dict):
        return {str(k): _clean(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_clean(v) for v in value]
    if isinstance(value, Path):
        return str(value)
    return value


def profile_steps(bench: rt.ModelBench, fraction: float = 0.5, steps: int = 3) -> dict[str, Any]:
    """Where ours spends its time against plain's: ``torch.profiler`` over ``steps`` steps of
    plain, of ours planned at budget 1.0 (no recomputation: the executor's own cost) and of
    ours at ``fraction``. Per variant: wall time per step, CPU time of the ops, device (kernel)
    time, op calls per step, and the ops with the most device (on the CPU: CPU) time. A wall
    time well above the device time means the GPU waits for the host (Python dispatch); a
    device time above plain's means extra or slower kernels (copies, recomputation)."""
    from torch.profiler import ProfilerActivity, profile

    dev = bench.cfg.device
    acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if dev == "cuda" else [])
    variants: list[tuple[str, Any]] = [("plain", bench.plain_step)]
    keep: list[Any] = []  # the wrappers live until profiled
    for label, frac in (("ours@1.0", 1.0), (f"ours@{fraction:g}", fraction)):
        wrapper, _plan, _s = bench._plan(bench.inputs, budget_fraction=frac)
        keep.append(wrapper)
        step = rt.make_step(bench.model, lambda w=wrapper: w(*bench.inputs), returns_loss=True)
        variants.append((label, step))
    out: dict[str, Any] = {"model": bench.name, "steps": steps}
    for label, step in variants:
        step()
        rt._sync(dev)
        with profile(activities=acts) as prof:
            t0 = time.perf_counter()
            for _ in range(steps):
                step()
            rt._sync(dev)
            wall = (time.perf_counter() - t0) / steps
        events = [e for e in prof.key_averages() if e.key.startswith("aten::")]
        device_us = sum(getattr(e, "self_device_time_total", 0.0) for e in events)
        key = "self_device_time_total" if dev == "cuda" else "self_cpu_time_total"
        top = sorted(events, key=lambda e: getattr(e, key, 0.0), reverse=True)[:10]
        out[label] = {
            "wall_ms": round(wall * 1e3, 2),
            "cpu_ms": round(sum(e.self_cpu_time_total for e in events) / steps / 1e3, 2),
            "device_ms": round(device_us / steps / 1e3, 2) if dev == "cuda" else None,
            "op_calls": round(sum(e.count for e in events) / steps),
            "top": [
                [e.key, round(e.count / steps), round(getattr(e, key, 0.0) / steps / 1e3, 3)]
                for e in top
            ],
        }
    keep.clear()
    bench._recover()
    return out


def main() -> int:
    parser = argparse.ArgumentParser(
        prog=f"benchmarks/{NAME}.py",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--json", action="store_true", help="accepted; output is JSON lines")
    parser.add_argument("--quick", action="store_true", help="accepted (make bench); no effect")
    parser.add_argument("--out", type=Path, default=None, help="accepted; $OUT is used")
    parser.add_argument("--dry-run", action="store_true", help="tiny models on the CPU")
    parser.add_argument(
        "--budget-s",
        type=float,
        default=None,
        help="time budget from start (default 400; 150 with --dry-run)",
    )
    parser.add_argument("--no-search", action="store_true", help="skip the batch search")
    parser.add_argument("--no-profile", action="store_true", help="skip the profiler phase")
    args = parser.parse_args()

    cuda = torch.cuda.is_available()
    if not cuda and not args.dry_run:
        emit(
            {
                "kind": "summary",
                "skipped": "no CUDA device; run with --dry-run to exercise "
                "the code path on the CPU",
            }
        )
        return 0

    device = "cuda" if cuda and not args.dry_run else "cpu"
    budget = args.budget_s or (150.0 if args.dry_run else 400.0)
    deadline = T0 + budget
    if device == "cuda":
        torch.backends.cudnn.benchmark = False
        models = [("resnet50", {"batch": 128}), ("gpt2-small", {"batch": 16, "seq_len": 1024})]
        cfg = rt.Config(device="cuda", steps=6, warmup=2, time_limit_s=20.0, deadline=deadline)
        search_tries = 3
    else:
        torch.set_num_threads(1)
        models = [("resnet-tiny", {"batch": 16}), ("gpt2-tiny", {"batch": 32})]
        cfg = rt.Config(
            device="cpu", steps=3, warmup=1, min_time_s=0.3, time_limit_s=3.0, deadline=deadline
        )
        search_tries = 2
    fractions = (0.5, 0.35)

    cpsat_note = rt.skip_cpsat_if_missing()
    remat, remat_error = rt.load_rematerialize()
    env = {
        "kind": "env",
        "device": rt.device_name(device),
        "dry_run": bool(args.dry_run),
        "torch": torch.__version__,
        "cuda": torch.version.cuda,
        "ortools": importlib.util.find_spec("ortools") is not None,
        "cpsat_note": cpsat_note,
        "ours_available": remat is not None,
        "ours_error": remat_error,
        "budget_s": budget,
        "models": models,
        "loss": "out.float().square().mean()",
    }
    if device == "cuda":
        free, total = torch.cuda.mem_get_info()
        env.update(gpu_free_gib=round(free / 2**30, 1), gpu_total_gib=round(total / 2**30, 1))
    emit(env)

    def on_row(row: rt.Row) -> None:
        rec = {"kind": "row", **asdict(row)}
        gib = {
            "peak_bytes": "peak_gib",
            "peak_above_base": "peak_above_base_gib",
            "plan_peak_bytes": "plan_peak_gib",
        }
        for key, new in gib.items():
            if rec.get(key) is not None:
                rec[new] = round(rec[key] / 2**30, 3)
        emit(rec)

    phases: list[dict[str, Any]] = []

    def phase(name: str, t0: float) -> None:
        rec = {"phase": name, "s": round(time.monotonic() - t0, 1), "left_s": round(cfg.left())}
        phases.append(rec)
        emit({"kind": "phase", **rec})

    benches: list[rt.ModelBench] = []
    notes: list[str] = []
    for name, kw in models:
        if cfg.left() < 60:
            notes.append(f"{name}: skipped, {cfg.left():.0f} s left")
            continue
        t0 = time.monotonic()
        try:
            bench = rt.ModelBench(name, kw, cfg, on_row)
        except Exception as exc:  # noqa: BLE001 -- reported, next model
            notes.append(f"{name}: build failed: {rt.short_error(exc)}")
            continue
        benches.append(bench)
        if bench.body_note:
            notes.append(f"{name}: {bench.body_note}")
        with bench.active():
            bench.plain()
            bench.peers()
            phase(f"{name}: plain + peers", t0)
            t0 = time.monotonic()
            if bench.remat is None:
                bench.ours("missing")
            else:
                bench.ours_fractions(fractions)
                bench.ours_target()
            phase(f"{name}: ours", t0)
    for bench in benches:
        if bench.remat is not None and cfg.left() > 60:
            t0 = time.monotonic()
            with bench.active():
                bench.ours_at_peers()
            phase(f"{bench.name}: ours at peers' peaks", t0)
    profiles: list[dict[str, Any]] = []
    first = benches[0] if benches else None
    if args.no_profile:
        notes.append("profile: skipped (--no-profile)")
    elif first is not None and first.remat is not None and cfg.left() > 90:
        t0 = time.monotonic()
        try:
            with first.active():
                result = profile_steps(first)
            profiles.append(result)
            emit({"kind": "profile", **result})
        except Exception as exc:  # noqa: BLE001 -- the profile is a diagnostic
            notes.append(f"profile: {rt.short_error(exc)}")
        phase(f"{first.name}: profile", t0)
    else:
        notes.append(f"profile: skipped ({cfg.left():.0f} s left or ours missing)")
    searches: list[dict[str, Any]] = []
    resnet = next((b for b in benches if b.family == "resnet"), None)
    if args.no_search:
        notes.append("batch search: skipped (--no-search)")
    elif resnet is not None and resnet.remat is not None and cfg.left() > 90:
        t0 = time.monotonic()
        with resnet.active():
            result = resnet.batch_search(search_tries)
        searches.append(result)
        emit({"kind": "search", **result})
        phase(f"{resnet.name}: largest batch under plain's peak", t0)
    else:
        notes.append(f"batch search: skipped ({cfg.left():.0f} s left or ours missing)")

    rows = [r for b in benches for r in b.rows]
    claims, detail = rt.claims_of(rows, searches, cfg.mem_tol)
    checks = [
        {
            "model": r.model,
            "setting": r.setting,
            "measured_over_plan": r.measured_over_plan,
            "ok": r.plan_check_ok,
        }
        for r in rows
        if r.method == "ours" and r.ok
    ]
    for r in rows:
        if r.method in ("plain", *rt.EAGER_PEERS) and r.error:
            notes.append(f"{r.model} {r.method} {r.setting}: {r.error}")
    figure = None
    out = os.environ.get("OUT")
    if out:
        try:
            figure = rt.plot(rows, Path(out) / f"{NAME}.png")
        except Exception as exc:  # noqa: BLE001 -- the figure is optional
            notes.append(f"figure: {rt.short_error(exc)}")
    emit(
        {
            "kind": "summary",
            "benchmark": NAME,
            "claim": rt.CLAIM,
            "device": rt.device_name(device),
            "dry_run": bool(args.dry_run),
            "ortools": env["ortools"],
            "cpsat_note": cpsat_note,
            "ours_available": remat is not None,
            "ours_error": remat_error,
            "claims": claims,
            "claims_detail": detail,
            "plan_checks": checks,
            "plan_checks_ok": all(c["ok"] for c in checks) if checks else None,
            "rows": [
                {
                    k: getattr(r, k)
                    for k in (
                        "model",
                        "method",
                        "setting",
                        "step_s",
                        "peak_bytes",
                        "time_ratio",
                        "mem_ratio",
                        "error",
                    )
                }
                for r in rows
            ],
            "batch_search": [
                {k: v for k, v in s.items() if not k.endswith("_probes")} for s in searches
            ],
            "profiles": profiles,
            "anchors_h100": ANCHORS,
            "phases": phases,
            "notes": notes,
            "figure": figure,
        }
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
