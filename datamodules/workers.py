"""DataLoader worker set-up shared by every loader of the package."""

from __future__ import annotations

import atexit
import functools
import multiprocessing
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


def _kill_daemonic_children() -> None:
    for child in multiprocessing.active_children():
        if child.daemon:
            child.kill()
            child.join(timeout=10)


@functools.cache
def end_workers_at_exit() -> None:
    """(main process, once) At exit, SIGKILL the daemonic children still alive.

    multiprocessing ends a process's daemonic children at exit with SIGTERM and then joins them.
    Workers that ignore SIGTERM outlive that whenever their iterator was not shut down: an
    exception inside a validation within fit (an out-of-memory, a signal stop) leaves the
    training iterator's workers waiting for work, and the exit then waited for them forever.
    Registered after multiprocessing's own exit hook, so it runs before it (atexit is LIFO)."""
    atexit.register(_kill_daemonic_children)
