"""The job queue: what a killed worker leaves behind, and what queueing costs a webhook, per backend.

In:  throwaway PostgreSQL and Redis servers (Debian's packages), a SQLite file; no models.
Out: two markdown tables.
     1. A task runs for 30 s; its worker is SIGKILLed after 2 s and started again. With huey's own
        consumer (SqliteHuey, RedisHuey): does the task run again? With this project's queue (jobs in
        the store, ids on huey, leases): is the job retried?
     2. Milliseconds for `Store.enqueue` of a new job (what a webhook waits for), median and p99 over
        N jobs, on each queue, against the store's row alone (the hand-written queue before huey).

Run: `.venv/bin/python bench/job_queue.py [--jobs 400]`.
"""

from __future__ import annotations

import argparse
import os
import platform
import signal
import statistics
import subprocess
import sys
import tempfile
import textwrap
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from backend.local_servers import start_postgres, start_redis, wait_for  # noqa: E402
from backend.store import JobRow, Store  # noqa: E402

TASK_SECONDS, KILL_AFTER, WAIT_AFTER_RESTART = 30, 2.0, 45

HUEY_APP = textwrap.dedent("""
    import sys, time
    from pathlib import Path
    from huey import RedisHuey, SqliteHuey
    kind, where, marks = sys.argv[1], sys.argv[2], Path(sys.argv[3])
    huey = SqliteHuey("bench", filename=where) if kind == "sqlite" else RedisHuey("bench", url=where)

    @huey.task(retries=3)
    def long_task():
        with marks.open("a") as f:
            f.write("start\\n")
        time.sleep(%d)
        with marks.open("a") as f:
            f.write("done\\n")

    if __name__ == "__main__" and sys.argv[4] == "enqueue":
        long_task()
    elif __name__ == "__main__":
        huey.create_consumer(workers=1, periodic=False).run()
""" % TASK_SECONDS)


def huey_consumer_loses_killed_task(kind: str, where: str, work: Path) -> str:
    """Enqueue a 30 s task, SIGKILL the consumer 2 s into it, start a new consumer: did it run again?"""
    app, marks = work / f"huey_app_{kind}.py", work / f"marks_{kind}.txt"
    app.write_text(HUEY_APP)
    run = [sys.executable, str(app), kind, where, str(marks)]
    subprocess.run([*run, "enqueue"], check=True)
    consumer = subprocess.Popen([*run, "consume"], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    wait_for(lambda: marks.exists() and "start" in marks.read_text(), 30, "the task to start")
    time.sleep(KILL_AFTER)
    consumer.send_signal(signal.SIGKILL)
    consumer.wait()
    consumer = subprocess.Popen([*run, "consume"], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    time.sleep(WAIT_AFTER_RESTART)
    consumer.terminate()
    consumer.wait()
    starts = marks.read_text().count("start")
    return "no: lost" if starts == 1 else f"yes ({starts} starts)"


CLAIMER = textwrap.dedent("""
    import sys, time
    from backend.store import Store
    store = Store(sys.argv[1], sys.argv[2])
    job = None
    while job is None:
        job = store.claim_job("bench-worker-" + sys.argv[3])
        time.sleep(0.05)
    store.beat("bench-worker-" + sys.argv[3], job.id)
    time.sleep(%d)
    store.finish_job(job.id)
""" % TASK_SECONDS)


def store_queue_retries_killed_job(store_url: str, redis_url: str, lease: float = 5.0) -> str:
    """The same kill against this project's queue: a worker claims the job and is SIGKILLed; a second
    worker's lease check (as `recover_jobs` does) puts it back and claims it."""
    store = Store(store_url, redis_url)
    store.create_schema()
    job_id = store.enqueue("train_policy", 1)
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    worker = subprocess.Popen([sys.executable, "-c", CLAIMER, store_url, redis_url, "1"], env=env)
    wait_for(lambda: store.job_state(job_id) == "running", 30, "the job to be claimed")
    time.sleep(KILL_AFTER)
    worker.send_signal(signal.SIGKILL)
    worker.wait()
    time.sleep(lease)
    store.requeue_stale_jobs(lease_seconds=lease, max_attempts=3)
    again = store.claim_job("bench-worker-2")
    with store.reading() as s:
        attempts = s.get(JobRow, job_id).attempts
    return f"yes (attempt {attempts})" if again is not None and again.id == job_id else "no"


def enqueue_milliseconds(store: Store, jobs: int, announce: bool) -> list[float]:
    """Time `jobs` enqueues of new jobs (distinct projects: none folds into another)."""
    if not announce:  # the row alone, as the hand-written queue did
        store._announce = lambda jobs: None
    times = []
    for project_id in range(1, jobs + 1):
        started = time.perf_counter()
        store.enqueue("fit_reward", project_id)
        times.append((time.perf_counter() - started) * 1000)
    return times


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--jobs", type=int, default=400)
    args = parser.parse_args()
    work = Path(tempfile.mkdtemp(prefix="bench-queue-"))
    redis_url, stop_redis = start_redis(work / "redis")
    postgres_url, stop_postgres = start_postgres(work / "pg")
    try:
        print(f"machine: {platform.machine()}, {os.cpu_count()} cores, Python {platform.python_version()}; "
              f"a {TASK_SECONDS} s job, its worker SIGKILLed {KILL_AFTER:.0f} s in\n")
        print("| queue | job run again after its worker was killed? |\n|---|---|")
        print(f"| huey consumer, SqliteHuey | {huey_consumer_loses_killed_task('sqlite', str(work / 'h.db'), work)} |")
        print(f"| huey consumer, RedisHuey | {huey_consumer_loses_killed_task('redis', redis_url, work)} |")
        sqlite_url = f"sqlite:///{work / 'retry.sqlite3'}"
        print(f"| this project's, SQLite | {store_queue_retries_killed_job(sqlite_url, '')} |")
        print(f"| this project's, Redis | {store_queue_retries_killed_job(f'sqlite:///{work}/retry2.sqlite3', redis_url)} |")

        print(f"\nStore.enqueue of a new job, {args.jobs} jobs each (ms)\n")
        print("| store | queue | median | p99 | median ratio to the row alone |\n|---|---|---|---|---|")
        cases = [("SQLite", f"sqlite:///{work}/{{}}.sqlite3", ""), ("SQLite", f"sqlite:///{work}/{{}}.sqlite3", redis_url),
                 ("PostgreSQL", postgres_url, "")]
        for n, (store_name, url, queue_url) in enumerate(cases):
            medians = {}
            for announce in (False, True):
                if store_name == "SQLite":
                    this_url = url.format(f"latency{n}{int(announce)}")
                else:  # a fresh database each
                    this_url = url
                store = Store(this_url, queue_url)
                store.create_schema()
                if store_name != "SQLite":
                    with store.session() as s:
                        s.query(JobRow).delete()
                times = enqueue_milliseconds(store, args.jobs, announce)
                medians[announce] = statistics.median(times)
                label = store.queue.backend if announce else "none (the row alone)"
                ratio = f"{medians[True] / medians[False]:.2f}" if announce else "1"
                print(f"| {store_name} | {label} | {medians[announce]:.2f} | {percentile(times, 0.99):.2f} | {ratio} |")
    finally:
        stop_redis()
        stop_postgres()


if __name__ == "__main__":
    main()
