"""The real workload: a small CNN on scikit-learn's bundled digits, data-parallel over N atoms.

Data: ``sklearn.datasets.load_digits`` (1797 8x8 images, shipped inside scikit-learn, nothing
downloaded), split once into 1437 training and 360 validation images. One iteration is one
epoch of SGD over the training set in global batches of ``batch_size`` (rounded down to a
multiple of N), then the validation accuracy.

Data parallelism: the trainer (rank 0) runs inside the Tune trial's process and starts N-1
helper processes (``python -m mlcycle.develop._digits``), one per further atom, each on one
thread. Every rank holds a replica; each global batch is split into N equal shards, every
rank computes its shard's mean-loss gradient, the gradients are averaged with one all-reduce
(torch.distributed, gloo) and every replica takes the same step. Averaging equal shards gives
the full batch's gradient, so N workers train the same model as one, faster (a unit test
checks the equality). Commands (train an epoch, load a checkpoint, stop) travel from rank 0 to
the helpers as a broadcast over the same process group.
"""

from __future__ import annotations

import argparse
import copy
import ctypes
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
from datetime import timedelta
from typing import Any

import torch
import torch.distributed as dist
from torch import nn

__all__ = ["DigitsTrainer", "build_model", "load_digits_split"]

_CMD_STOP, _CMD_EPOCH, _CMD_LOAD = 0, 1, 2
_SPLIT_SEED = 0
_N_VAL = 360


def load_digits_split() -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(x_train, y_train, x_val, y_val)``: images as float32 ``[n, 1, 8, 8]`` in [0, 1]."""
    from sklearn.datasets import load_digits

    data = load_digits()
    x = torch.tensor(data.images, dtype=torch.float32).unsqueeze(1) / 16.0  # [1797, 1, 8, 8]
    y = torch.tensor(data.target, dtype=torch.long)
    perm = torch.randperm(len(y), generator=torch.Generator().manual_seed(_SPLIT_SEED))
    val, train = perm[:_N_VAL], perm[_N_VAL:]
    return x[train], y[train], x[val], y[val]


def build_model(seed: int, width: int = 1) -> nn.Module:
    """Two 3x3 convolutions, a 2x2 max-pool and two linear layers; ``width`` multiplies the
    channels (width 1: 32 and 64 channels, 151k parameters; width 2: 340k)."""
    torch.manual_seed(seed)
    c1, c2 = 32 * width, 64 * width
    return nn.Sequential(
        nn.Conv2d(1, c1, 3, padding=1),  # [b, c1, 8, 8]
        nn.ReLU(),
        nn.Conv2d(c1, c2, 3, padding=1),  # [b, c2, 8, 8]
        nn.ReLU(),
        nn.MaxPool2d(2),  # [b, c2, 4, 4]
        nn.Flatten(),  # [b, 16 * c2]
        nn.Linear(c2 * 4 * 4, 128),
        nn.ReLU(),
        nn.Linear(128, 10),
    )


class _Replica:
    """One rank's model, optimiser and data."""

    def __init__(self, config: dict[str, Any]) -> None:
        self.config = config
        self.seed = int(config.get("seed", 0))
        self.model = build_model(self.seed, int(config.get("width", 1)))
        self.optimizer = torch.optim.SGD(
            self.model.parameters(),
            lr=float(config["lr"]),
            momentum=float(config.get("momentum", 0.0)),
            weight_decay=float(config.get("weight_decay", 0.0)),
        )
        if self.optimizer.defaults["momentum"] > 0:
            for p in self.model.parameters():  # zeros behave as torch's lazy first buffer
                self.optimizer.state[p]["momentum_buffer"] = torch.zeros_like(p)
        self.x, self.y, self.x_val, self.y_val = load_digits_split()
        self.batch_size = int(config.get("batch_size", 64))

    def run_epoch(self, epoch: int, rank: int, world: int) -> None:
        per_rank = max(1, self.batch_size // world)
        global_batch = per_rank * world
        order = torch.randperm(
            len(self.y), generator=torch.Generator().manual_seed(self.seed * 1000 + epoch)
        )
        params = [p for p in self.model.parameters()]
        self.model.train()
        for start in range(0, len(order) - global_batch + 1, global_batch):
            shard = order[start + rank * per_rank : start + (rank + 1) * per_rank]
            loss = nn.functional.cross_entropy(self.model(self.x[shard]), self.y[shard])
            self.optimizer.zero_grad(set_to_none=False)
            loss.backward()
            if world > 1:
                flat = torch.cat([p.grad.reshape(-1) for p in params])
                dist.all_reduce(flat)
                flat /= world
                offset = 0
                for p in params:
                    n = p.numel()
                    p.grad.copy_(flat[offset : offset + n].view_as(p))
                    offset += n
            self.optimizer.step()

    def evaluate(self) -> float:
        self.model.eval()
        with torch.no_grad():
            pred = self.model(self.x_val).argmax(dim=1)
        return float((pred == self.y_val).float().mean())

    def tensors(self) -> list[torch.Tensor]:
        """Everything that must agree across ranks: parameters and momentum buffers."""
        out = [p.data for p in self.model.parameters()]
        for p in self.model.parameters():
            buf = self.optimizer.state.get(p, {}).get("momentum_buffer")
            if buf is not None:
                out.append(buf)
        return out


class DigitsTrainer:
    """Rank 0 of an N-process data-parallel run; N=1 trains in this process alone.

    Args:
        config: ``lr``, ``momentum``, ``weight_decay``, ``seed``, ``batch_size``, ``width``.
        world_size: processes (atoms), >= 1.
    """

    def __init__(self, config: dict[str, Any], world_size: int = 1) -> None:
        if not isinstance(world_size, int) or world_size < 1:
            raise ValueError(f"world_size must be an int >= 1, got {world_size!r}.")
        torch.set_num_threads(1)
        self.world_size = world_size
        self._helpers: list[subprocess.Popen] = []
        self._tmpdir: str | None = None
        if world_size > 1:
            self._tmpdir = tempfile.mkdtemp(prefix="mlcycle-ddp-")
            init_file = os.path.join(self._tmpdir, "rendezvous")
            for rank in range(1, world_size):
                cmd = [
                    sys.executable,
                    "-m",
                    "mlcycle.develop._digits",
                    "--rank",
                    str(rank),
                    "--world-size",
                    str(world_size),
                    "--init-file",
                    init_file,
                    "--parent-pid",
                    str(os.getpid()),
                    "--config",
                    json.dumps(config),
                ]
                env = {**os.environ, "OMP_NUM_THREADS": "1"}
                self._helpers.append(subprocess.Popen(cmd, env=env))
            dist.init_process_group(
                "gloo",
                init_method=f"file://{init_file}",
                rank=0,
                world_size=world_size,
                timeout=timedelta(seconds=120),
            )
        self.replica = _Replica(config)

    def _command(self, cmd: int, arg: int = 0) -> None:
        if self.world_size > 1:
            dist.broadcast(torch.tensor([cmd, arg], dtype=torch.long), src=0)

    def train_epoch(self, epoch: int) -> None:
        """One epoch over the training set, on every rank."""
        self._command(_CMD_EPOCH, epoch)
        self.replica.run_epoch(epoch, 0, self.world_size)

    def evaluate(self) -> float:
        """Validation accuracy (rank 0)."""
        return self.replica.evaluate()

    def state_dict(self) -> dict[str, Any]:
        """A copy of the model's and the optimiser's state (rank 0 holds what all hold)."""
        return copy.deepcopy(
            {
                "model": self.replica.model.state_dict(),
                "optimizer": self.replica.optimizer.state_dict(),
            }
        )

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Load a checkpoint on rank 0 and broadcast it to the helpers."""
        self.replica.model.load_state_dict(state["model"])
        self.replica.optimizer.load_state_dict(state["optimizer"])
        if self.world_size > 1:
            self._command(_CMD_LOAD)
            for tensor in self.replica.tensors():
                dist.broadcast(tensor, src=0)

    def close(self) -> None:
        """Stop the helpers and leave the process group."""
        if self.world_size > 1 and dist.is_initialized():
            try:
                self._command(_CMD_STOP)
            finally:
                dist.destroy_process_group()
        for proc in self._helpers:
            try:
                proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                proc.kill()
        self._helpers = []
        if self._tmpdir is not None:
            shutil.rmtree(self._tmpdir, ignore_errors=True)
            self._tmpdir = None

    def __del__(self) -> None:
        for proc in getattr(self, "_helpers", []):
            if proc.poll() is None:
                proc.kill()


def _die_with_parent(parent_pid: int) -> None:
    """Ask Linux to kill this helper when its parent dies (best effort elsewhere)."""
    try:
        libc = ctypes.CDLL("libc.so.6", use_errno=True)
        libc.prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG
    except OSError:
        pass
    if os.getppid() != parent_pid:
        os._exit(0)


def _helper_main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description="a data-parallel helper rank (internal)")
    parser.add_argument("--rank", type=int, required=True)
    parser.add_argument("--world-size", type=int, required=True)
    parser.add_argument("--init-file", required=True)
    parser.add_argument("--parent-pid", type=int, required=True)
    parser.add_argument("--config", required=True)
    args = parser.parse_args(argv)
    _die_with_parent(args.parent_pid)
    torch.set_num_threads(1)
    dist.init_process_group(
        "gloo",
        init_method=f"file://{args.init_file}",
        rank=args.rank,
        world_size=args.world_size,
        timeout=timedelta(seconds=120),
    )
    replica = _Replica(json.loads(args.config))
    command = torch.zeros(2, dtype=torch.long)
    try:
        while True:
            dist.broadcast(command, src=0)
            cmd, arg = int(command[0]), int(command[1])
            if cmd == _CMD_EPOCH:
                replica.run_epoch(arg, args.rank, args.world_size)
            elif cmd == _CMD_LOAD:
                for tensor in replica.tensors():
                    dist.broadcast(tensor, src=0)
            else:
                break
    finally:
        dist.destroy_process_group()


if __name__ == "__main__":
    _helper_main()
