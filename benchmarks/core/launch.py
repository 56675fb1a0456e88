"""How this process was launched: one process, or a rank of a torchrun or srun launch.

Read from the environment only, without torch, so that commands which never train (`--help`, `status`,
`tables`) can ask whether they are rank 0 without paying torch's start-up (benchmarks/core/distributed.py
joins the process group and holds the collectives).
"""

from __future__ import annotations

import os
import subprocess


def slurm_master() -> str:
    nodelist = os.environ.get("SLURM_JOB_NODELIST") or os.environ.get("SLURM_NODELIST", "")
    try:
        hosts = subprocess.run(["scontrol", "show", "hostnames", nodelist], capture_output=True, text=True,
                               timeout=30).stdout.split()
    except (OSError, subprocess.SubprocessError):
        hosts = []
    return hosts[0] if hosts else "127.0.0.1"


def detect() -> tuple[str, int, int, int] | None:
    """(launcher, rank, world_size, local_rank) of a multi-process launch, or None for one process.

    torchrun (or a hand-set environment) sets RANK and WORLD_SIZE. srun sets SLURM_PROCID in each task
    of a job step; the batch script's own step has no SLURM_STEP_ID, so a python started there without
    srun stays one process even when the allocation has several tasks.
    """
    env = os.environ
    if "WORLD_SIZE" in env and "RANK" in env:
        launch = ("torchrun", int(env["RANK"]), int(env["WORLD_SIZE"]), int(env.get("LOCAL_RANK", 0)))
    elif "SLURM_PROCID" in env and env.get("SLURM_STEP_ID") is not None:
        launch = ("srun", int(env["SLURM_PROCID"]), int(env.get("SLURM_NTASKS", "1")),
                  int(env.get("SLURM_LOCALID", 0)))
    else:
        return None
    return launch if launch[2] > 1 else None


def is_rank_zero() -> bool:
    """Whether this process speaks for its run (one process, or rank 0 of a data-parallel launch)."""
    launch = detect()
    return launch is None or launch[1] == 0


def environment() -> dict | None:
    """rank, world_size, local_rank, master_addr, master_port from torchrun's or Slurm's variables;
    None for a single process. Under srun the master is the first host of the allocation and the
    port derives from the job id (array tasks on one node get different ports)."""
    launch = detect()
    if launch is None:
        return None
    launcher, rank, world, local = launch
    env = os.environ
    if launcher == "torchrun":
        addr, port = env.get("MASTER_ADDR", "127.0.0.1"), env.get("MASTER_PORT", "29500")
    else:
        addr = env.get("MASTER_ADDR") or slurm_master()
        port = env.get("MASTER_PORT") or str(20000 + int(env.get("SLURM_JOB_ID", "0")) % 20000)
    return {"rank": rank, "world_size": world, "local_rank": local, "master_addr": addr, "master_port": port}
