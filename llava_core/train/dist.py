"""Where a training process runs: its device, its place in a torchrun process group, its
module wrapped for DistributedDataParallel, its batches moved to the device and drawn ahead.

Device: `init_distributed(device)` puts the run on "cpu" (the default) or "cuda"; the stages
move their model there and each batch as it is used. Batches are still drawn on the CPU, and
`Prefetch` draws them ahead in worker processes so a GPU does not wait for Pillow.

Distributed: under `torchrun` (WORLD_SIZE > 1) `init_distributed` starts a process group
(gloo on CPUs, nccl on GPUs, one GPU per process by LOCAL_RANK); the stage wraps its
trainable module in DistributedDataParallel and reads the samples of its rank; only rank 0
logs and writes files.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, fields, is_dataclass, replace
from typing import Callable

import torch
import torch.nn as nn


@dataclass
class Dist:
    rank: int = 0
    world: int = 1
    device: torch.device = torch.device("cpu")  # where this process trains

    @property
    def main(self) -> bool:
        return self.rank == 0

    @property
    def enabled(self) -> bool:
        return self.world > 1

    def barrier(self) -> None:
        if self.enabled:
            torch.distributed.barrier()

    def from_main(self, value: float) -> float:
        """Rank 0's value on every rank: decisions taken from each rank's own clock (the planned
        step count, whether the budget is spent) must agree, or one rank waits forever."""
        if not self.enabled:
            return value
        t = torch.tensor([value], dtype=torch.float64, device=self.device)  # nccl sends GPU tensors only
        torch.distributed.broadcast(t, src=0)
        return float(t)


def check_device(name: str | torch.device) -> torch.device:
    """`name` as a torch.device that training can use (cpu, or cuda where torch sees a GPU)."""
    try:
        device = torch.device(name)
    except RuntimeError:
        raise ValueError(f"device {str(name)!r}: training runs on cpu or cuda") from None
    if device.type not in ("cpu", "cuda"):
        raise ValueError(f"device {str(name)!r}: training runs on cpu or cuda")
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"device {str(name)!r}: torch sees no CUDA GPU on this machine")
    return device


def init_distributed(device: str | torch.device = "cpu") -> Dist:
    """This process's place in the run: a process group when launched by torchrun with
    WORLD_SIZE > 1 (gloo on "cpu", nccl on "cuda" with GPU LOCAL_RANK), else a single process;
    `device` "cpu", "cuda" or "cuda:N" (a single process only)."""
    device = check_device(device)
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world > 1 and device.type == "cuda":
        if device.index is not None:
            raise ValueError(f"device {str(device)!r}: under torchrun give 'cuda'; each process takes GPU LOCAL_RANK")
        device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
    if device.type == "cuda":
        device = torch.device("cuda", torch.cuda.current_device() if device.index is None else device.index)
        torch.cuda.set_device(device)
    if world <= 1:
        return Dist(device=device)
    if not torch.distributed.is_initialized():
        torch.distributed.init_process_group("nccl" if device.type == "cuda" else "gloo")
    return Dist(rank=torch.distributed.get_rank(), world=torch.distributed.get_world_size(), device=device)


def wrap_ddp(module: nn.Module, dist: Dist) -> nn.Module:
    if not dist.enabled:
        return module
    from torch.nn.parallel import DistributedDataParallel
    ids = [dist.device.index] if dist.device.type == "cuda" else None
    return DistributedDataParallel(module, device_ids=ids)


def to_device(x, device: torch.device):
    """Tensors, and the tensors inside dicts, lists and dataclasses of them, moved to `device`."""
    if isinstance(x, torch.Tensor):
        return x.to(device, non_blocking=True)
    if isinstance(x, dict):
        return {k: to_device(v, device) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return type(x)(to_device(v, device) for v in x)
    if is_dataclass(x):
        return replace(x, **{f.name: to_device(getattr(x, f.name), device) for f in fields(x)})
    return x


class Prefetch:
    """`fn(step)` for the steps ahead, drawn in `workers` forked processes; `workers=0` calls it
    in place. `fn` must be a pure function of the step (every stage's batches are), so the
    batches, and the run, are the same with or without workers; only the waiting differs."""

    def __init__(self, fn: Callable[[int], object], workers: int = 0, ahead: int | None = None):
        if workers < 0:
            raise ValueError(f"workers={workers}: expected 0 (draw in place) or more")
        self.fn, self.workers = fn, workers
        self.ahead = ahead or 2 * workers
        self.pool = None
        self.pending: dict = {}

    def __call__(self, step: int):
        if self.workers == 0:
            return self.fn(step)
        if self.pool is None:
            import torch.multiprocessing as mp
            global _PREFETCH_FN
            _PREFETCH_FN = self.fn  # the forked workers inherit it; nothing is pickled but steps
            self.pool = mp.get_context("fork").Pool(self.workers, initializer=_prefetch_worker_init)
        for s in range(step, step + self.ahead):
            if s not in self.pending:
                self.pending[s] = self.pool.apply_async(_prefetch_call, (s,))
        for s in [s for s in self.pending if s < step]:  # a resumed run skips steps
            del self.pending[s]
        return self.pending.pop(step).get()

    def close(self) -> None:
        """Wait for the batches still being drawn, then stop the workers. Not terminate() with
        results outstanding: CPython's Pool can then fail its own check ("Cannot have cache with
        result_hander not alive"), which made a test fail now and then in CI."""
        if self.pool is not None:
            for r in self.pending.values():
                r.wait()
            self.pool.close()
            self.pool.join()
            self.pool, self.pending = None, {}


_PREFETCH_FN: Callable[[int], object] | None = None


def _prefetch_worker_init() -> None:
    torch.set_num_threads(1)


def _prefetch_call(step: int):
    return _PREFETCH_FN(step)
