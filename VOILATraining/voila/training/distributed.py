"""Several processes under ``torchrun``: ranks, collective helpers, and errors that agree.

Without ``torchrun`` (``WORLD_SIZE`` unset or 1) every helper is a no-op on the one process, so
the trainer has a single code path.

    dist = Distributed()
    dist.start(device)                   # NCCL on CUDA, gloo on the CPU
    path = dist.agree(export)            # rank 0 runs it; every rank gets the result or the error
"""

from __future__ import annotations

import datetime
import os
from typing import Any, Callable

import torch

import voila.errors as errors_module
from voila.errors import VoilaError


class Distributed:
    """Rank bookkeeping and the collectives the trainer needs."""

    def __init__(self) -> None:
        self.world = int(os.environ.get("WORLD_SIZE", "1"))
        self.rank = int(os.environ.get("RANK", "0"))
        self.local_rank = int(os.environ.get("LOCAL_RANK", "0"))
        self.device = torch.device("cpu")
        self.started = False

    @property
    def active(self) -> bool:
        return self.world > 1

    @property
    def main(self) -> bool:
        return self.rank == 0

    def start(self, device: torch.device) -> None:
        self.device = device
        if not self.active or torch.distributed.is_initialized():
            return
        backend = "nccl" if device.type == "cuda" else "gloo"
        torch.distributed.init_process_group(backend, timeout=datetime.timedelta(hours=2))
        self.started = True

    def any(self, *flags: bool) -> list[bool]:
        """Element-wise OR of boolean flags over all processes."""
        if not self.active:
            return list(flags)
        tensor = torch.tensor([float(f) for f in flags], device=self.device)
        torch.distributed.all_reduce(tensor, op=torch.distributed.ReduceOp.MAX)
        return [bool(v > 0) for v in tensor.tolist()]

    def broadcast(self, value: Any) -> Any:
        if not self.active:
            return value
        holder = [value]
        torch.distributed.broadcast_object_list(holder, src=0)
        return holder[0]

    def gather(self, value: Any) -> list[Any]:
        if not self.active:
            return [value]
        values: list[Any] = [None] * self.world
        torch.distributed.all_gather_object(values, value)
        return values

    def barrier(self) -> None:
        if self.active:
            torch.distributed.barrier()

    def agree(self, function: Callable[[], Any], everywhere: bool = False) -> Any:
        """Run ``function`` on rank 0 (or on every rank) and raise the same error on all ranks;
        rank 0's result is broadcast unless every rank computed its own."""
        result, error = None, None
        if everywhere or self.main:
            try:
                result = function()
            except VoilaError as caught:
                error = caught
        errors = self.gather(None if error is None else (type(error).__name__, str(error)))
        failure = next((e for e in errors if e is not None), None)
        if failure is not None:
            if error is not None:
                raise error
            raise getattr(errors_module, failure[0], VoilaError)(failure[1])
        if not everywhere:
            result = self.broadcast(result)
        return result

    def stop(self) -> None:
        if self.started and torch.distributed.is_initialized():
            torch.distributed.destroy_process_group()
