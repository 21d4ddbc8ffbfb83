"""Where this process stands in a launch (torchrun, accelerate launch) and the few collectives the job uses.

The job has one path for one process and for many (nanoGPT's `master_process`): `ProcessGroup`
answers who is the main process and which device this rank trains on, and its collectives are
no-ops with one process. The launcher sets RANK, LOCAL_RANK and WORLD_SIZE; with WORLD_SIZE > 1
the group is NCCL on CUDA (one GPU per LOCAL_RANK) or gloo on the CPU.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from smolcord.settings import Settings

__all__ = ["ProcessGroup", "Ranks", "process_group", "ranks_from_env"]

# The other ranks wait for the main process's decision (store, data, tokenizing) and, after
# training, at a barrier: long steps on real models must not time the collectives out.
COLLECTIVE_TIMEOUT_S = 4 * 3600


@dataclass(frozen=True)
class Ranks:
    """This process's place in the launch (torchrun and accelerate launch set the variables)."""

    rank: int = 0
    local_rank: int = 0
    world_size: int = 1

    @property
    def main(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.world_size > 1


def ranks_from_env(environ: Any = None) -> Ranks:
    env = os.environ if environ is None else environ
    world = int(env.get("WORLD_SIZE", "1") or 1)
    rank = int(env.get("RANK", "0") or 0)
    local = int(env.get("LOCAL_RANK", str(rank)) or 0)
    return Ranks(rank, local, world)


class ProcessGroup:
    """The job's view of the launch: rank, device, and collectives that cost nothing alone."""

    def __init__(self, ranks: Ranks, device: str) -> None:
        self.ranks = ranks
        self.device = device  # what this rank trains on: the settings' device, or cuda:LOCAL_RANK
        self.decided = not ranks.distributed  # whether the other ranks have had the main process's decision

    @property
    def main(self) -> bool:
        return self.ranks.main

    @property
    def world_size(self) -> int:
        return self.ranks.world_size

    def share(self, message: dict[str, Any] | None) -> dict[str, Any]:
        """The main process's decision (whether to exit, and the data), on every rank."""
        if not self.ranks.distributed:
            assert message is not None
            return message
        import torch.distributed as dist

        box = [message]
        dist.broadcast_object_list(box, src=0)
        self.decided = True
        assert box[0] is not None
        return box[0]

    def exit_others(self, code: int) -> None:
        """Tell ranks still waiting for the decision to exit with `code` (once this one has reported)."""
        if self.main and not self.decided:
            with contextlib.suppress(Exception):
                self.share({"exit": code})

    def gather(self, value: Any) -> list[Any]:
        """Every rank's `value`, on every rank."""
        if not self.ranks.distributed:
            return [value]
        import torch.distributed as dist

        values: list[Any] = [None] * self.world_size
        dist.all_gather_object(values, value)
        return values

    def barrier(self) -> None:
        if self.ranks.distributed:
            import torch.distributed as dist

            dist.barrier()


@contextlib.contextmanager
def process_group(settings: Settings, ranks: Ranks) -> Iterator[ProcessGroup]:
    """The launch's process group, joined for the run and left after it (nothing to join alone).

    If the main process unwinds (SIGTERM, an error) before its decision went out, the other ranks
    are told to exit 1 rather than wait for it until the collective timeout.
    """
    if not ranks.distributed:
        yield ProcessGroup(ranks, settings.device)
        return
    import datetime

    import torch
    import torch.distributed as dist

    from model.devices import resolve_device

    cuda = resolve_device(settings.device).type == "cuda"
    device = torch.device("cuda", ranks.local_rank) if cuda else torch.device("cpu")
    if not dist.is_initialized():
        if cuda:
            torch.cuda.set_device(device)
        dist.init_process_group(
            backend="nccl" if cuda else "gloo", timeout=datetime.timedelta(seconds=COLLECTIVE_TIMEOUT_S)
        )
    group = ProcessGroup(ranks, str(device))
    try:
        yield group
    finally:
        group.exit_others(1)
        with contextlib.suppress(Exception):
            dist.destroy_process_group()
