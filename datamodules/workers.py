"""DataLoader worker set-up shared by every loader of the package."""

from __future__ import annotations

import signal

# what a cluster or a terminal sends to every process of a job step (SLURM's scancel / time limit:
# SIGTERM, SIGUSR1 before it; Ctrl-C: SIGINT to the foreground group). The main process handles
# them (callbacks.interrupt) and ends its workers; a worker that died of one would fail the batch
# in flight ("DataLoader worker (pid N) is killed by signal") before anything is saved.
STOP_SIGNALS = (signal.SIGINT, signal.SIGTERM, signal.SIGUSR1)


def ignore_stop_signals(worker_id: int) -> None:
    """DataLoader `worker_init_fn`: the worker ignores SIGINT/SIGTERM/SIGUSR1."""
    for s in STOP_SIGNALS:
        signal.signal(s, signal.SIG_IGN)
