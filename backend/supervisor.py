"""Worker supervision: a worker command in, that worker kept running out.

Each training worker (one per lane) runs as a child process. When one dies (a crash, the OOM killer, SIGKILL) the
supervisor logs it, releases the job it held at once (instead of after its lease) and starts it
again, backing off while it keeps dying fast. SIGTERM or SIGINT stop the child: it finishes its
job within the grace period, or is killed and its job goes back to the queue unspent.
"""

from __future__ import annotations

import logging
import signal
import subprocess
import threading
import time
from dataclasses import dataclass

from backend.store import MAX_JOB_ATTEMPTS, Store, worker_name

log = logging.getLogger(__name__)

BACKOFF_SECONDS = (1, 2, 4, 8, 16, 30)  # between restarts while the worker keeps dying
STEADY_SECONDS = 60  # a worker that ran this long before dying restarts without delay


@dataclass
class Child:
    """One supervised worker: its command, its process and how often it died fast in a row."""
    command: list[str]
    process: subprocess.Popen | None = None
    started: float = 0.0
    failures: int = 0
    restart_at: float = 0.0


def supervise(commands: list[list[str]], store: Store, grace_seconds: float = 20.0,
              stop: threading.Event | None = None) -> None:
    """Run every command (one per lane) until `stop` is set (or SIGTERM/SIGINT), restarting each that exits."""
    stop = stop_on_termination(stop or threading.Event())
    children = [Child(command) for command in commands]
    while not stop.is_set():
        for child in children:
            if child.process is None and time.monotonic() >= child.restart_at:
                child.process, child.started = subprocess.Popen(child.command), time.monotonic()
                log.info("training worker started (pid %d): %s", child.process.pid, " ".join(child.command[-3:]))
            elif child.process is not None and child.process.poll() is not None:
                restart_later(child, store)
        stop.wait(0.5)
    stop_children([child.process for child in children if child.process is not None], store, grace_seconds)


def stop_on_termination(stop: threading.Event) -> threading.Event:
    """SIGTERM and SIGINT set `stop` (from the main thread only: Python delivers signals there), so the
    loop that polls it ends its current work and exits cleanly."""
    if threading.current_thread() is threading.main_thread():
        for sig in (signal.SIGTERM, signal.SIGINT):
            signal.signal(sig, lambda *_: stop.set())
    return stop


def restart_later(child: Child, store: Store) -> None:
    """A worker exited on its own: release its job now, and restart it after a backoff if it died fast."""
    process, name = child.process, worker_name(child.process.pid)
    released = store.release_jobs_of(name, max_attempts=MAX_JOB_ATTEMPTS)
    store.retire_worker(name)
    child.failures = 0 if time.monotonic() - child.started > STEADY_SECONDS else child.failures + 1
    delay = 0 if child.failures == 0 else BACKOFF_SECONDS[min(child.failures, len(BACKOFF_SECONDS)) - 1]
    store.log_event("worker_restarted", f"training worker (pid {process.pid}) exited with {describe(process.returncode)}; "
                    f"{released} running job(s) requeued or failed; restarting in {delay}s",
                    pid=process.pid, returncode=process.returncode)
    log.warning("training worker %d exited with %s; restarting in %ss", process.pid, describe(process.returncode), delay)
    child.process, child.restart_at = None, time.monotonic() + delay


def stop_children(processes: list[subprocess.Popen], store: Store, grace_seconds: float) -> None:
    """SIGTERM to all at once, one shared grace period to finish their jobs, then SIGKILL and their jobs
    back in the queue (one after another, two lanes would need twice gunicorn's patience)."""
    for process in processes:
        process.terminate()
    deadline = time.monotonic() + grace_seconds
    for process in processes:
        try:
            process.wait(timeout=max(0.0, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()
            released = store.release_jobs_of(worker_name(process.pid), max_attempts=None)
            log.warning("training worker %d did not stop within %.0fs: killed, %d job(s) requeued",
                        process.pid, grace_seconds, released)
        store.retire_worker(worker_name(process.pid))


def describe(returncode: int) -> str:
    if returncode < 0:
        return f"signal {signal.Signals(-returncode).name}"
    return f"exit code {returncode}"
