"""Worker supervision: a worker command in, that worker kept running out.

The training worker runs as a child process. When it dies (a crash, the OOM killer, SIGKILL) the
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

from backend.store import MAX_JOB_ATTEMPTS, Store, worker_name

log = logging.getLogger(__name__)

BACKOFF_SECONDS = (1, 2, 4, 8, 16, 30)  # between restarts while the worker keeps dying
STEADY_SECONDS = 60  # a worker that ran this long before dying restarts without delay


def supervise(command: list[str], store: Store, grace_seconds: float = 20.0,
              stop: threading.Event | None = None) -> None:
    """Run `command` until `stop` is set (or SIGTERM/SIGINT arrives), restarting it whenever it exits."""
    stop = stop or threading.Event()
    if threading.current_thread() is threading.main_thread():
        for sig in (signal.SIGTERM, signal.SIGINT):
            signal.signal(sig, lambda *_: stop.set())
    failures = 0
    while not stop.is_set():
        child = subprocess.Popen(command)
        started = time.monotonic()
        log.info("training worker started (pid %d)", child.pid)
        while child.poll() is None and not stop.is_set():
            stop.wait(0.5)
        if stop.is_set():
            stop_child(child, store, grace_seconds)
            return
        released = store.release_jobs_of(worker_name(child.pid), max_attempts=MAX_JOB_ATTEMPTS)
        store.retire_worker(worker_name(child.pid))
        failures = 0 if time.monotonic() - started > STEADY_SECONDS else failures + 1
        delay = 0 if failures == 0 else BACKOFF_SECONDS[min(failures, len(BACKOFF_SECONDS)) - 1]
        store.log_event("worker_restarted", f"training worker (pid {child.pid}) exited with {describe(child.returncode)}; "
                        f"{released} running job(s) requeued or failed; restarting in {delay}s",
                        pid=child.pid, returncode=child.returncode)
        log.warning("training worker %d exited with %s; restarting in %ss", child.pid, describe(child.returncode), delay)
        stop.wait(delay)


def stop_child(child: subprocess.Popen, store: Store, grace_seconds: float) -> None:
    """SIGTERM, the grace period to finish its job, then SIGKILL and the job back in the queue."""
    child.terminate()
    try:
        child.wait(timeout=grace_seconds)
    except subprocess.TimeoutExpired:
        child.kill()
        child.wait()
        released = store.release_jobs_of(worker_name(child.pid), max_attempts=None)
        log.warning("training worker %d did not stop within %.0fs: killed, %d job(s) requeued",
                    child.pid, grace_seconds, released)
    store.retire_worker(worker_name(child.pid))


def describe(returncode: int) -> str:
    if returncode < 0:
        return f"signal {signal.Signals(-returncode).name}"
    return f"exit code {returncode}"
