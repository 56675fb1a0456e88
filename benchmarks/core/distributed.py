"""Data-parallel runs with torch.distributed: who this process is, and the few collectives the harness uses.

Launch with `torchrun --nproc-per-node N -m benchmarks run ...` (RANK, WORLD_SIZE, LOCAL_RANK,
MASTER_ADDR, MASTER_PORT), or with `srun` inside a Slurm allocation (SLURM_PROCID, SLURM_NTASKS,
SLURM_LOCALID, the first host of SLURM_JOB_NODELIST as the master, a port derived from the job id).
NCCL on GPUs, gloo on CPUs. Without either environment a run is one process and nothing here is used.

How a run is spread (benchmarks/core/train.py does it; the rules are here so they are in one place):
- Every rank builds the same global batch from the epoch's visiting order and augments it from the
  same seeded generator, then trains on its contiguous share (`shard`): the union of one global step is
  the single-process batch, augmentations and views included. Gradients are averaged by DDP; each
  rank's loss is scaled so that the average is the global batch's mean loss even when the last
  batch does not split evenly.
- Methods see the whole batch: per-example outcomes are all-gathered in rank order before `observe`,
  so score tables, forgetting counts and error sets are identical on every rank. A step's outcomes
  travel in one all-gather (gather_rows_packed), and its agreements (stop, non-finite loss, the
  examples of an online selection) in one all-reduce. `select` decides per
  rank, on the rank's shard of the candidate batch (each rank keeps its share of k): the selection
  compute summed over ranks equals one process's, and with one rank it is exactly the
  single-process rule. Online selection with views is refused (the ranks' view draws would differ).
- `prepare` runs once, on rank 0, and its result (the method's state_dict, which a checkpoint must
  hold anyway) is broadcast; its cost is counted once.
- Each rank meters its own passes; the meters are summed at every synchronisation point (epoch ends,
  checkpoints, the record), so the record counts the global work once.
- Evaluation is sharded and gathered (accuracy), or runs on rank 0 (a linear probe, a method's own).
- Rank 0 alone writes records, checkpoints, saved models and W&B. A checkpoint holds global state
  only (the visiting order, the step within it, one model), so it resumes on any number of ranks.
- A method whose state would follow a rank's own shard says why (Method.single_process_only) and
  is refused before the run starts (Group DRO, RELA).
- BatchNorm statistics are per rank (a rank normalises with its shard's statistics) unless the
  protocol asks for `sync_batchnorm` (torch's SyncBatchNorm, GPUs only); the record says which.
"""

from __future__ import annotations

import atexit
import gc
import math
import os
import sys
from dataclasses import dataclass
from typing import NoReturn

import torch
import torch.distributed as dist

from benchmarks.core.launch import environment
from benchmarks.errors import BenchError


@dataclass
class Dist:
    rank: int
    world_size: int
    local_rank: int
    backend: str
    control: object = None  # a gloo group for CPU flags, so agreeing on a flag never syncs a GPU

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def shard(self, n: int) -> slice:
        """This rank's contiguous share of n items (sizes differ by at most one, larger first)."""
        return shard_of(n, self.rank, self.world_size)

    def shard_sizes(self, n: int) -> list[int]:
        """Every rank's number of items in its share of n, in rank order."""
        return [len(range(n)[shard_of(n, rank, self.world_size)]) for rank in range(self.world_size)]

    def any(self, flag: bool) -> bool:
        """True on every rank if it is True on some rank."""
        value = torch.tensor([1 if flag else 0], dtype=torch.int32)
        dist.all_reduce(value, op=dist.ReduceOp.MAX, group=self.control)
        return bool(value.item())

    def sum(self, values: list[int]) -> list[int]:
        """Element-wise sum over the ranks (exact integers)."""
        tensor = torch.tensor(values, dtype=torch.int64)  # FLOP counts pass 2^53 (an ImageNet epoch)
        dist.all_reduce(tensor, op=dist.ReduceOp.SUM, group=self.control)
        return [int(v) for v in tensor.tolist()]

    def sum_floats(self, values: list[float]) -> list[float]:
        tensor = torch.tensor(values, dtype=torch.float64)
        dist.all_reduce(tensor, op=dist.ReduceOp.SUM, group=self.control)
        return tensor.tolist()

    def average_(self, tensors: list[torch.Tensor]) -> None:
        """In place: each tensor averaged over the ranks, as DDP averages gradients."""
        for tensor in tensors:
            dist.all_reduce(tensor, op=dist.ReduceOp.SUM)
            tensor.div_(self.world_size)

    def gather_rows(self, tensor: torch.Tensor) -> torch.Tensor:
        """Every rank's tensor concatenated along dim 0, in rank order (the rows may differ in number)."""
        size = torch.tensor([len(tensor)], device=tensor.device)
        sizes = [torch.zeros_like(size) for _ in range(self.world_size)]
        dist.all_gather(sizes, size)
        sizes = [int(s.item()) for s in sizes]
        longest = max(sizes)
        dtype = tensor.dtype
        padded = tensor.to(torch.uint8) if dtype == torch.bool else tensor  # gloo cannot gather bools
        if len(tensor) < longest:
            padding = padded.new_zeros((longest - len(tensor), *tensor.shape[1:]))
            padded = torch.cat([padded, padding])
        pieces = [torch.empty_like(padded) for _ in range(self.world_size)]
        dist.all_gather(pieces, padded.contiguous())
        out = torch.cat([piece[:n] for piece, n in zip(pieces, sizes)])
        return out.to(dtype) if dtype == torch.bool else out

    def gather_rows_packed(self, tensors: list[torch.Tensor | None],
                           sizes: list[int] | None = None) -> list[torch.Tensor | None]:
        """`gather_rows` of several tensors that share their rows, in one all-gather (None stays None).

        A training step's outcomes (index, loss, label, logits) would otherwise cost two all-gathers
        each. They travel as one float64 tensor [rows, columns]: float64 holds every float16, bfloat16,
        float32 and integer below 2^53 (indices, labels) exactly, so each comes back bit for bit in its
        own dtype. `sizes`: every rank's row count when the caller knows them (a shard of a batch whose
        global size is known), which saves the all-gather of the counts; otherwise it is gathered.
        """
        present = [t for t in tensors if t is not None]
        rows = len(present[0])
        if sizes is None:
            size = torch.tensor([rows], device=present[0].device)
            gathered = [torch.zeros_like(size) for _ in range(self.world_size)]
            dist.all_gather(gathered, size)
            sizes = [int(s.item()) for s in gathered]
        if sizes[self.rank] != rows:
            raise ValueError(f"rank {self.rank} has {rows} rows where its share is {sizes[self.rank]}")
        flat = [t.reshape(rows, math.prod(t.shape[1:])) for t in present]  # (-1 is ambiguous with no rows)
        packed = torch.cat([t.to(torch.float64) for t in flat], dim=1)
        longest = max(sizes)
        if rows < longest:
            packed = torch.cat([packed, packed.new_zeros((longest - rows, packed.shape[1]))])
        pieces = [torch.empty_like(packed) for _ in range(self.world_size)]
        dist.all_gather(pieces, packed.contiguous())
        whole = torch.cat([piece[:n] for piece, n in zip(pieces, sizes)])
        out, column = [], 0
        for tensor in tensors:
            if tensor is None:
                out.append(None)
                continue
            width = math.prod(tensor.shape[1:])
            part = whole[:, column:column + width].to(tensor.dtype)
            out.append(part.reshape(len(whole), *tensor.shape[1:]))
            column += width
        return out

    def broadcast(self, obj):
        """Rank 0's object on every rank (pickled)."""
        holder = [obj if self.is_main else None]
        dist.broadcast_object_list(holder, src=0, group=self.control)
        return holder[0]

    def gather_objects(self, obj) -> list:
        out = [None] * self.world_size
        dist.all_gather_object(out, obj, group=self.control)
        return out


def shard_of(n: int, rank: int, world_size: int) -> slice:
    base, extra = divmod(n, world_size)
    start = rank * base + min(rank, extra)
    return slice(start, start + base + (1 if rank < extra else 0))


_CURRENT: Dist | None = None


def setup(device_type: str) -> Dist | None:
    """Join (once per process) the process group the environment describes; None for one process."""
    global _CURRENT
    if _CURRENT is not None:
        return _CURRENT
    info = environment()
    if info is None:
        return None
    backend = "nccl" if device_type == "cuda" else "gloo"
    os.environ.setdefault("MASTER_ADDR", info["master_addr"])
    os.environ.setdefault("MASTER_PORT", str(info["master_port"]))
    if not dist.is_initialized():
        try:
            dist.init_process_group(backend, rank=info["rank"], world_size=info["world_size"])
        except Exception as exc:  # noqa: BLE001 - a rendezvous failure is one readable line
            raise BenchError(f"cannot join the process group (rank {info['rank']} of {info['world_size']}, "
                             f"{backend}, master {os.environ['MASTER_ADDR']}:{os.environ['MASTER_PORT']}): "
                             f"{exc}") from None
    control = dist.new_group(backend="gloo") if backend != "gloo" else None
    # A run that ends with an exception leaves the group on its way out; a finished one leaves it in
    # end_process, which also skips the interpreter's finalisation.
    atexit.register(_leave)
    _CURRENT = Dist(info["rank"], info["world_size"], info["local_rank"], backend, control)
    return _CURRENT


def _leave() -> None:
    if dist.is_initialized():
        gc.collect()  # whatever still holds the group (a DDP reducer in a reference cycle) lets it go now
        dist.destroy_process_group()


def end_process(code: int) -> NoReturn:
    """Exit with `code`; a rank of a data-parallel run leaves its group cleanly first.

    A rank that finished waits for the others (rank 0 may still be writing the record and the model),
    leaves the group, and exits without the interpreter's finalisation. Finalisation is where gloo's
    thread teardown can abort a process that has finished its work ("terminate called without an
    active exception", SIGABRT; seen once in a CI run of the test suite, on a rank whose run had
    completed), and torchrun or srun then count the run as failed. Leaving the group at exit
    (atexit) did not prevent that. Everything the process writes is written and flushed by then;
    the caller's `finally` blocks have run.
    """
    if _CURRENT is None or not dist.is_initialized():
        sys.exit(code)
    if code == 0:
        try:
            dist.barrier(group=_CURRENT.control)
        except Exception:  # noqa: BLE001 - a rank that failed has gone: nothing left to wait for
            pass
    _leave()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)


def current() -> Dist | None:
    return _CURRENT
