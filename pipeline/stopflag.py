"""The graceful-stop flag of the train loop: signals become a flag read at step boundaries."""

from __future__ import annotations

import os
import signal
import time


class StopFlag:
    """SIGTERM / SIGUSR1 / SIGUSR2 / SIGINT -> flag (the signal number, the largest if several); the
    previous handlers come back on exit. SLURM sends SIGUSR2 before the time limit (``--signal``)
    and SIGTERM on ``scancel``, preemption and ``scontrol requeue``; SIGUSR1 is for users
    (``scancel -s USR1``); SIGINT is Ctrl-C. A second Ctrl-C (at least ``ABORT_AFTER_S`` after the
    first: a launcher that forwards the terminal's SIGINT to its workers must not count twice)
    aborts at once with KeyboardInterrupt, without saving."""

    SIGNALS = (signal.SIGTERM, signal.SIGUSR1, signal.SIGUSR2, signal.SIGINT)
    ABORT_AFTER_S = 1.0

    def __init__(self, loud: bool = True):
        self.loud = loud  # say so on stderr (rank 0)

    def __enter__(self):
        self.seen, self._old, self._first_int = 0, {}, None
        for sig in self.SIGNALS:
            self._old[sig] = signal.signal(sig, self._handle)
        return self

    def _handle(self, signum, frame):
        if signum == signal.SIGINT:
            now = time.monotonic()
            if self._first_int is not None and now - self._first_int >= self.ABORT_AFTER_S:
                raise KeyboardInterrupt
            if self._first_int is None:
                self._first_int = now
                if self.loud:  # os.write: print() is not safe inside a signal handler (reentrant buffer)
                    os.write(2, b"\nCtrl-C: saving at the end of this step, then stopping "
                                b"(Ctrl-C again to abort without saving)\n")
        self.seen = max(self.seen, int(signum))

    def __exit__(self, *exc):
        for sig, old in self._old.items():
            signal.signal(sig, old)
