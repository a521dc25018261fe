"""Which rank this process is, and process-group start-up with a deadline of its own.

:func:`world_from_env` is the one place that reads the launcher's rank variables (torchrun,
submitit, `proseco train --nproc`, SLURM's ``srun``); everything else asks it. torch is imported
only by the functions that start the process group: the `--nproc` launcher asks too and stays light.

``dist.init_process_group(backend)`` (env://) makes rank 0 wait for its peers as long as the
collective timeout (30 minutes for gloo, 10 for nccl): a rank that dies before the group forms
leaves the others waiting that long. :func:`init_process_group` separates the two: the ranks first meet
on a TCPStore at MASTER_ADDR:MASTER_PORT within ``startup_timeout_s`` (every rank counts itself in,
so a rank that gives up can say how many arrived), then the group is built on that store with the
usual collective timeout.

Under ``torchrun`` the elastic agent already hosts the rendezvous and restarts or stops all
workers when one dies, so its workers keep torch's own env:// start-up.
"""

from __future__ import annotations

import os
import time
from datetime import timedelta
from typing import TYPE_CHECKING

from pipeline.errors import ProsecoError

if TYPE_CHECKING:
    import torch.distributed as dist

ARRIVED_KEY = "proseco/startup/arrived"  # a counter: each rank adds 1 when it reaches the store
ALL_ARRIVED_KEY = "proseco/startup/all"  # set by the last rank to arrive


def world_from_env() -> tuple[int, int, int]:
    """(rank, world size, local rank): torchrun's / submitit's RANK, WORLD_SIZE, LOCAL_RANK, else
    SLURM's per-task variables under ``srun`` (SLURM_PROCID, SLURM_NTASKS, SLURM_LOCALID), else (0, 1, 0).

    Under ``srun`` the SLURM values are exported as RANK, WORLD_SIZE and LOCAL_RANK as well, for
    ``init_process_group(env://)``."""
    env = os.environ
    if "RANK" in env or "SLURM_STEP_ID" not in env:
        return int(env.get("RANK", "0")), int(env.get("WORLD_SIZE", "1")), int(env.get("LOCAL_RANK", "0"))
    rank, world, local = int(env["SLURM_PROCID"]), int(env["SLURM_NTASKS"]), int(env.get("SLURM_LOCALID", "0"))
    env.update(RANK=str(rank), WORLD_SIZE=str(world), LOCAL_RANK=str(local))
    return rank, world, local


def started_by_launcher() -> bool:
    """Whether a launcher that sets RANK (torchrun, submitit, `proseco train --nproc`) started this process."""
    return "RANK" in os.environ


def init_process_group(backend: str, rank: int, world: int, startup_timeout_s: float) -> None:
    """Initialise the default process group; raise ProsecoError when the ranks have not all met
    at the rendezvous within ``startup_timeout_s`` seconds."""
    import torch.distributed as dist
    from torch.distributed.constants import default_pg_nccl_timeout, default_pg_timeout

    env = os.environ
    if world == 1 and "MASTER_ADDR" not in env:  # one process without a launcher
        dist.init_process_group(backend, store=dist.HashStore(), rank=0, world_size=1)
        return
    if "TORCHELASTIC_USE_AGENT_STORE" in env:  # a torchrun worker: the agent watches the start-up
        dist.init_process_group(backend)
        return
    missing = [k for k in ("MASTER_ADDR", "MASTER_PORT") if not env.get(k)]
    if missing:
        raise ProsecoError(f"{world} ranks need {' and '.join(missing)} in the environment (rank 0's host and"
                           " a free port): launch with torchrun, srun + slurm/train.sbatch or proseco launch")
    store = rendezvous(env["MASTER_ADDR"], int(env["MASTER_PORT"]), rank, world, startup_timeout_s)
    nccl = backend == "nccl" and default_pg_nccl_timeout is not None  # from here on, torch's usual timeouts
    store.set_timeout(default_pg_nccl_timeout if nccl else default_pg_timeout)
    dist.init_process_group(backend, store=store, rank=rank, world_size=world)


def rendezvous(addr: str, port: int, rank: int, world: int, startup_timeout_s: float) -> dist.TCPStore:
    """Meet the other ranks on a TCPStore hosted by rank 0; returns once all ``world`` arrived."""
    import torch.distributed as dist

    where = f"{addr}:{port}"
    setting = f"cluster.startup_timeout_s={startup_timeout_s:g}"
    deadline = time.monotonic() + startup_timeout_s
    timeout = timedelta(seconds=startup_timeout_s)
    try:
        store = dist.TCPStore(addr, port, world, is_master=rank == 0, timeout=timeout, wait_for_workers=False)
    except RuntimeError as exc:
        why = (f"could not host the start-up rendezvous at {where} (is the port free?)" if rank == 0 else
               f"could not reach rank 0's start-up rendezvous at {where} within {setting} s")
        raise ProsecoError(f"rank {rank} of {world} {why}: {' '.join(str(exc).split())[:200]}") from None
    if store.add(ARRIVED_KEY, 1) == world:
        store.set(ALL_ARRIVED_KEY, "1")
    try:
        store.wait([ALL_ARRIVED_KEY], timedelta(seconds=max(deadline - time.monotonic(), 0.1)))
    except RuntimeError:
        try:
            arrived = f"{store.add(ARRIVED_KEY, 0)} of {world} ranks arrived within {setting} s"
        except RuntimeError:  # rank 0, which hosts the store, is gone
            arrived = "rank 0, which hosts it, went away"
        raise ProsecoError(f"rank {rank}: the ranks did not all meet at the start-up rendezvous at {where}: "
                           f"{arrived}. A rank died or never started (see the other ranks' logs); raise "
                           "cluster.startup_timeout_s if ranks start slowly") from None
    return store
