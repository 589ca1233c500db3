"""The ranks of one job: torchrun's processes, the shards of a job array, or one process.

    ranks = Ranks.from_environment()     # torchrun: WORLD_SIZE, RANK, LOCAL_RANK; else one process
    ranks = Ranks.shard(i, n)            # `meddap run --shard i/N`: no process group
    with ranks:                          # torchrun: joins the process group, leaves it at the end
        with ranks.step("lora"):         # a failure on any rank stops every rank with its message
            for unit in ranks.mine(units):   # the static rule: unit k goes to rank k mod N
                ...

The assignment rule is the same for torchrun and shards, and the units are
the same as in one process, so each unit's files are the same bytes whoever
makes them. Under torchrun `step` ends with a barrier that also exchanges
each rank's error (nccl on CUDA is the process group's backend, but barriers
and these small messages go over a gloo group, which has timeouts); a rank
that does not arrive within `timeout_s` stops the others with a message
saying so. Shards have no barriers: a shard does the units that are ready,
and a last run without --shard does the rest and assembles the tables.
"""
from __future__ import annotations

import contextlib
import os
from dataclasses import dataclass, field
from datetime import timedelta
from enum import Enum
from typing import Iterator, Sequence, TypeVar

from meddap.errors import MeddapError

T = TypeVar("T")
DEFAULT_TIMEOUT_S = 48 * 3600        # ranks may finish a stage far apart (a resume skips work unevenly)


class Mode(Enum):
    SINGLE = "single"
    TORCHRUN = "torchrun"
    SHARD = "shard"


@dataclass
class Ranks:
    rank: int = 0
    world: int = 1
    local_rank: int = 0
    mode: Mode = Mode.SINGLE
    timeout_s: float = DEFAULT_TIMEOUT_S
    _control: object = field(default=None, repr=False)      # the gloo group of barriers and messages
    _owns_group: bool = field(default=False, repr=False)

    @classmethod
    def from_environment(cls, timeout_s: float = DEFAULT_TIMEOUT_S) -> "Ranks":
        world = int(os.environ.get("WORLD_SIZE", "1"))
        if world <= 1:
            return cls(timeout_s=timeout_s)
        return cls(rank=int(os.environ["RANK"]), world=world, local_rank=int(os.environ.get("LOCAL_RANK", "0")),
                   mode=Mode.TORCHRUN, timeout_s=timeout_s)

    @classmethod
    def shard(cls, index: int, count: int) -> "Ranks":
        if not (count >= 1 and 0 <= index < count):
            raise MeddapError(f"--shard {index}/{count}: use i/N with N >= 1 and 0 <= i < N, e.g. 0/4.")
        return cls(rank=index, world=count, mode=Mode.SHARD)

    @classmethod
    def parse_shard(cls, text: str) -> "Ranks":
        try:
            i, n = (int(x) for x in text.split("/"))
        except ValueError:
            raise MeddapError(f"--shard {text!r} is not i/N; e.g. --shard 0/4 for the first of 4 shards.") from None
        return cls.shard(i, n)

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def job_id(self) -> str | None:
        """What the processes of one job share (the output-folder lock is held by the job)."""
        if self.mode is Mode.TORCHRUN:
            from meddap.outdir import torchrun_job_id
            return torchrun_job_id() or f"torchrun-{os.environ.get('MASTER_ADDR')}:{os.environ.get('MASTER_PORT')}"
        if self.mode is Mode.SHARD:
            return os.environ.get("SLURM_ARRAY_JOB_ID") or f"shards-of-{self.world}"
        return None

    def mine(self, units: Sequence[T]) -> list[T]:
        """This rank's units: unit k belongs to rank k mod world."""
        return [u for k, u in enumerate(units) if k % self.world == self.rank]

    def owns(self, k: int) -> bool:
        return k % self.world == self.rank

    # ---------------------------------------------------------------- process group

    def __enter__(self) -> "Ranks":
        if self.mode is Mode.TORCHRUN:
            import torch
            import torch.distributed as dist
            if not dist.is_initialized():
                backend = "nccl" if torch.cuda.is_available() else "gloo"
                dist.init_process_group(backend, timeout=timedelta(seconds=self.timeout_s))
                self._owns_group = True
            self._control = dist.new_group(backend="gloo", timeout=timedelta(seconds=self.timeout_s))
        return self

    def __exit__(self, *exc) -> None:
        if self._owns_group:
            import torch.distributed as dist
            dist.destroy_process_group()
            self._owns_group = False

    def barrier(self, name: str, error: str | None = None) -> None:
        """Wait for every rank; if any rank reports an error, raise it on every rank."""
        if self.mode is not Mode.TORCHRUN:
            if error is not None:
                raise MeddapError(error)
            return
        import torch.distributed as dist
        statuses: list = [None] * self.world
        try:
            dist.all_gather_object(statuses, error, group=self._control)
        except RuntimeError as e:
            raise MeddapError(f"{name}: not every rank reached the barrier within {self.timeout_s:g} s "
                              f"(a rank died or hangs: {str(e).splitlines()[0][:200]}); every rank stops.") from None
        failed = [(r, s) for r, s in enumerate(statuses) if s is not None]
        if failed:
            r, message = failed[0]
            raise MeddapError(message if r == self.rank else f"rank {r} failed during {name}: {message} "
                                                             f"(rank {self.rank} stops too)")

    @contextlib.contextmanager
    def step(self, name: str) -> Iterator[None]:
        """A stage's share on this rank, then the barrier (which carries this rank's error, if any)."""
        if self.mode is not Mode.TORCHRUN:
            yield
            return
        try:
            yield
        except Exception as e:
            message = str(e) if isinstance(e, MeddapError) else f"{type(e).__name__}: {e}"
            try:
                self.barrier(name, message)
            except MeddapError as stop:
                raise stop from e
            raise
        self.barrier(name)
