"""Process-group start-up with a deadline of its own.

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

import torch.distributed as dist
from torch.distributed.constants import default_pg_nccl_timeout, default_pg_timeout

from pipeline.errors import ProsecoError

ARRIVED_KEY = "proseco/startup/arrived"  # a counter: each rank adds 1 when it reaches the store
ALL_ARRIVED_KEY = "proseco/startup/all"  # set by the last rank to arrive


def init_process_group(backend: str, rank: int, world: int, startup_timeout_s: float) -> None:
    """Initialise the default process group; raise ProsecoError when the ranks have not all met
    at the rendezvous within ``startup_timeout_s`` seconds."""
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
