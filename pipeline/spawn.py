"""``proseco train --nproc N``: N training ranks on this machine, without torchrun.

Each rank is ``python -m pipeline train ...`` (the same arguments, minus ``--nproc``) with RANK,
LOCAL_RANK, WORLD_SIZE, LOCAL_WORLD_SIZE, MASTER_ADDR and MASTER_PORT set, in a process group of
its own so that this process alone receives the terminal's Ctrl-C. What it adds over torchrun:

* **Stops that save.** SIGINT, SIGTERM, SIGUSR1, SIGUSR2 and SIGHUP (as SIGTERM) are passed on
  to every rank, which then save together at the next step boundary; there is no kill deadline
  (torchrun SIGKILLs ranks still saving after 30 s) and the exit code is the ranks' own: 3 after
  a stop that saved, 0 when done. A second Ctrl-C is passed on as well: the ranks abort.
* **No hang when a rank dies.** When a rank exits with an error, the others get SIGTERM (their
  collectives fail once a peer is gone), then SIGKILL after ``KILL_AFTER_S``; the exit code is
  the failed rank's.
* **No orphans.** On Linux each rank asks the kernel for SIGTERM when the launcher dies (even by
  ``kill -9``): the ranks then save and stop instead of training on unsupervised.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time

FORWARDED = (signal.SIGINT, signal.SIGTERM, signal.SIGUSR1, signal.SIGUSR2, signal.SIGHUP)
KILL_AFTER_S = 60.0  # after a rank failed: how long the others get to exit before SIGKILL
EXIT_REQUEUE = 3  # pipeline.train.EXIT_REQUEUE (not imported: this module must stay light)
LAUNCHER_ENV = "PROSECO_LAUNCHER_PID"  # set for the ranks: they follow the launcher (follow_launcher)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def strip_nproc(argv: list[str]) -> list[str]:
    """``argv`` without ``--nproc N`` / ``--nproc=N``."""
    out, skip = [], False
    for arg in argv:
        if skip:
            skip = False
        elif arg == "--nproc":
            skip = True
        elif not arg.startswith("--nproc="):
            out.append(arg)
    return out


def follow_launcher() -> None:
    """Called by a rank at start-up: ask for SIGTERM when the launcher that started it dies
    (Linux prctl PR_SET_PDEATHSIG; elsewhere nothing happens)."""
    parent = int(os.environ.get(LAUNCHER_ENV, "0") or 0)
    if not parent:
        return
    try:
        import ctypes

        ctypes.CDLL(None, use_errno=True).prctl(1, int(signal.SIGTERM))  # 1 = PR_SET_PDEATHSIG
    except (OSError, AttributeError):  # not Linux: no such call
        return
    if os.getppid() != parent:  # the launcher died before the call: no signal would come
        os.kill(os.getpid(), signal.SIGTERM)


def exit_code(codes: list[int], first_failure: int | None = None) -> int:
    """The launcher's exit code from the ranks' codes (negative: killed by that signal): the
    first failure seen (``first_failure``, the root cause: the others fail after it), else 3
    when a rank stopped early, else 0."""
    failed = [c for c in codes if c not in (0, EXIT_REQUEUE)]
    if failed:
        code = failed[0] if first_failure is None else first_failure
        return 128 - code if code < 0 else code
    return EXIT_REQUEUE if EXIT_REQUEUE in codes else 0


def run(argv: list[str], nproc: int) -> int:
    """Run ``proseco <argv>`` as ``nproc`` ranks; returns the exit code (see :func:`exit_code`)."""
    port = free_port()
    procs: list[subprocess.Popen] = []
    base = {**os.environ, "WORLD_SIZE": str(nproc), "LOCAL_WORLD_SIZE": str(nproc),
            "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port), LAUNCHER_ENV: str(os.getpid())}

    def forward(signum, frame):
        sig = signal.SIGTERM if signum == signal.SIGHUP else signum
        for p in procs:
            if p.poll() is None:
                p.send_signal(sig)

    old = {sig: signal.signal(sig, forward) for sig in FORWARDED}
    try:
        for rank in range(nproc):
            env = {**base, "RANK": str(rank), "LOCAL_RANK": str(rank)}
            procs.append(subprocess.Popen([sys.executable, "-m", "pipeline", *argv], env=env,
                                          start_new_session=True))
        return _wait(procs)
    finally:
        for p in procs:  # an exception here (never expected) must not leave ranks behind
            if p.poll() is None:
                p.kill()
        for sig, handler in old.items():
            signal.signal(sig, handler)


def _wait(procs: list[subprocess.Popen]) -> int:
    failed_at, first = None, None
    while True:
        codes = [p.poll() for p in procs]
        if all(c is not None for c in codes):
            return exit_code(codes, first)
        bad = [(r, c) for r, c in enumerate(codes) if c is not None and c not in (0, EXIT_REQUEUE)]
        if bad and failed_at is None:
            failed_at = time.monotonic()
            rank, first = bad[0]
            print(f"proseco: rank {rank} failed (exit {first}); stopping the other ranks", file=sys.stderr,
                  flush=True)
            for p in procs:
                if p.poll() is None:
                    p.terminate()
        if failed_at is not None and time.monotonic() - failed_at > KILL_AFTER_S:
            for p in procs:
                if p.poll() is None:
                    p.kill()
        time.sleep(0.1)
